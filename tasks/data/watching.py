"""New-data detection: scan a drop folder (a local path or any fsspec URL), wait until each file is
complete (size and modification time unchanged over a window), hash its content, and announce every
distinct content once as a `dataset.updated` Prefect event.

A re-saved identical file, the same bytes under another name, or a file still being copied announce
nothing. What has been announced is kept in a small JSON state file (sha256 -> where and when), so
the CLI watcher (`finetune watch`) and the scheduled sensor flow (`watch-data`) survive restarts.

Plain functions; the emitter is a parameter (the default sends a real Prefect event), so the logic is
testable without a server. Heavy imports stay out: fsspec, filelock and prefect are imported lazily.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.data.sources import SUPPORTED
from tasks.files import read_json, write_json

EVENT = "dataset.updated"
RESOURCE_PREFIX = "finetune.dataset."
STATE_VERSION = 1
# Names that are never data: hidden files, editor/temp files, partial downloads.
IGNORED_PREFIXES = (".", "~", "_")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", ".lock", ".filepart")
_CHUNK = 1 << 20


class WatchError(RuntimeError):
    """A watched location or the event destination that cannot be used; the message says the fix."""


@dataclass
class SeenFile:
    """One file as listed by the storage: where, how big, last modified (None if unknown)."""

    url: str  # what the flow reads: an absolute local path, or protocol://path for other storage
    path: str  # the path inside the filesystem (no protocol)
    size: int
    mtime: float | None


@dataclass
class Announcement:
    """A complete file with new content: the `dataset.updated` payload."""

    dataset: str
    path: str
    sha256: str
    size: int
    name: str
    location: str

    def payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PollResult:
    announced: list[Announcement] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # present but not yet stable (still growing, or seen once)
    duplicates: list[str] = field(default_factory=list)  # complete, content already announced
    unchanged: int = 0  # files whose size and time match the last hash


@dataclass
class WatchState:
    """What a watcher remembers between polls (and restarts)."""

    location: str = ""
    announced: dict[str, dict] = field(default_factory=dict)  # sha256 -> {path, size, at, event_id}
    pending: dict[str, dict] = field(default_factory=dict)  # url -> {size, mtime, since}
    hashed: dict[str, dict] = field(default_factory=dict)  # url -> {size, mtime, sha256}

    def to_json(self) -> dict:
        return {"version": STATE_VERSION, **asdict(self)}


# ---- storage ----------------------------------------------------------------------------------------


def open_location(location: str):
    """(filesystem, root path) for a local path or an fsspec URL (memory://, s3://, gcs://, ...)."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise WatchError(
            f"cannot open {location!r}: {exc}; fix: install the fsspec backend for this protocol "
            "(e.g. s3fs for s3://, gcsfs for gs://)"
        ) from None


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "mtime_ns"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v) / (1e9 if key == "mtime_ns" else 1)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def is_data_file(name: str, suffixes: tuple[str, ...] = SUPPORTED) -> bool:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    low = base.lower()
    if not base or base.startswith(IGNORED_PREFIXES) or low.endswith(IGNORED_SUFFIXES):
        return False
    return low.endswith(tuple(s.lower() for s in suffixes))


def scan(location: str, suffixes: tuple[str, ...] = SUPPORTED, recursive: bool = False) -> list[SeenFile]:
    """The data files at `location` (a folder: its files; a file: itself), sorted by path."""
    fs, root = open_location(location)
    if not fs.exists(root):
        raise WatchError(f"{location}: does not exist; fix: create the drop folder or check the path/URL")
    if fs.isfile(root):
        infos = [fs.info(root)]
    elif recursive:
        infos = list(fs.find(root, detail=True, withdirs=False).values())
    else:
        infos = [i for i in fs.ls(root, detail=True) if i.get("type") == "file"]
    local = _is_local(fs)
    out = []
    for info in infos:
        path = info["name"]
        if not is_data_file(path, suffixes):
            continue
        url = path if local else fs.unstrip_protocol(path)
        out.append(SeenFile(url=url, path=path, size=int(info.get("size") or 0), mtime=_mtime(info)))
    return sorted(out, key=lambda f: f.path)


def hash_url(url: str) -> str:
    """sha256 of a file's bytes, read in chunks through fsspec (local paths too)."""
    fs, path = open_location(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- state ------------------------------------------------------------------------------------------


def canonical_location(location: str) -> str:
    """A local path made absolute (so `data/incoming` and its absolute form share one state); URLs as given."""
    if "://" in location:
        return location
    return str(Path(location).expanduser().resolve())


def default_state_path(workspace: str | Path, location: str) -> Path:
    """`<workspace>/watch/<slug>-<hash of the location>.json`: one state file per watched location."""
    location = canonical_location(location)
    slug = "".join(c if c.isalnum() else "-" for c in location.rstrip("/").rsplit("/", 1)[-1])[:40].strip("-") or "root"
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    return Path(workspace).expanduser().resolve() / "watch" / f"{slug}-{digest}.json"


def load_state(path: str | Path, location: str = "") -> WatchState:
    p = Path(path)
    if not p.exists():
        return WatchState(location=location)
    try:
        raw = read_json(p)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WatchError(
            f"{p} is not readable JSON ({type(exc).__name__}); fix: move the file away to start fresh "
            "(the watcher then treats every file in the drop folder as new)"
        ) from None
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        raise WatchError(
            f"{p}: unknown watch state version {raw.get('version') if isinstance(raw, dict) else raw!r}; fix: move the file away to start fresh"
        )
    return WatchState(
        location=raw.get("location", location),
        announced=raw.get("announced", {}),
        pending=raw.get("pending", {}),
        hashed=raw.get("hashed", {}),
    )


def save_state(path: str | Path, state: WatchState) -> None:
    write_json(path, state.to_json())


# ---- events -----------------------------------------------------------------------------------------


def resource_id(dataset: str) -> str:
    return f"{RESOURCE_PREFIX}{dataset}"


def emit_dataset_updated(ann: Announcement, drain: bool = True) -> str:
    """Send `dataset.updated` for one announcement through Prefect's events client; return the event id.

    Outside a flow run the events worker is drained (`drain=True`) so the event has left this process
    before the state file records it. Needs PREFECT_API_URL (a running server): without it Prefect
    would start a throw-away ephemeral server and the event would reach nobody.
    """
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise WatchError(
            "PREFECT_API_URL is not set, so the event would reach no server; fix: start one with "
            "`make server` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(ann.dataset), "prefect.resource.name": ann.dataset},
        payload=ann.payload(),
    )
    if event is None:
        raise WatchError("Prefect did not accept the event (events are disabled for this API); nothing recorded")
    if drain and FlowRunContext.get() is None:
        quiet = logging.getLogger("EventsWorker")  # its "still processing" warning is the drain working
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            EventsWorker.drain_all(timeout=30)
        finally:
            quiet.setLevel(level)
    return str(event.id)


# ---- the watcher ------------------------------------------------------------------------------------

Emitter = Callable[[Announcement], str | None]


def poll(
    location: str,
    state: WatchState,
    *,
    dataset: str,
    stable_seconds: float = 5.0,
    emit: Emitter = emit_dataset_updated,
    now: float | None = None,
    suffixes: tuple[str, ...] = SUPPORTED,
    recursive: bool = False,
) -> PollResult:
    """One look at the location: update `state` in place; announce files that became complete with new content.

    A file is complete when two looks at least `stable_seconds` apart saw the same size and modification
    time. It is then hashed; content already announced (a re-save, a copy) is recorded, not announced.
    The state records an announcement only after `emit` returned, so a failed send is retried next poll.
    """
    now = time.time() if now is None else now
    result = PollResult()
    files = scan(location, suffixes, recursive)
    present = {f.url for f in files}
    for f in files:
        sig = {"size": f.size, "mtime": f.mtime}
        known = state.hashed.get(f.url)
        if known and known["size"] == f.size and known["mtime"] == f.mtime:
            result.unchanged += 1
            continue
        seen = state.pending.get(f.url)
        if seen is None or seen["size"] != f.size or seen["mtime"] != f.mtime:
            state.pending[f.url] = {**sig, "since": now}
            result.waiting.append(f.url)
            continue
        if now - seen["since"] < stable_seconds or f.size == 0:
            result.waiting.append(f.url)  # not stable long enough yet (an empty file waits for its bytes)
            continue
        sha = hash_url(f.url)
        after = next((g for g in scan(location, suffixes, recursive) if g.url == f.url), None)
        if after is None or after.size != f.size or after.mtime != f.mtime:
            state.pending.pop(f.url, None)  # changed while hashing: start the window again
            result.waiting.append(f.url)
            continue
        if sha in state.announced:
            result.duplicates.append(f.url)
        else:
            ann = Announcement(
                dataset=dataset, path=f.url, sha256=sha, size=f.size, name=f.url.rsplit("/", 1)[-1], location=location
            )
            event_id = emit(ann)
            state.announced[sha] = {"path": f.url, "size": f.size, "at": now, "event_id": event_id}
            result.announced.append(ann)
        state.pending.pop(f.url, None)
        state.hashed[f.url] = {**sig, "sha256": sha}
    for url in list(state.pending):
        if url not in present:
            del state.pending[url]
    for url in list(state.hashed):
        if url not in present:
            del state.hashed[url]  # a file that comes back is looked at again (its content decides)
    return result


def _merge(total: PollResult, part: PollResult) -> None:
    total.announced += part.announced
    total.duplicates += part.duplicates
    total.waiting = part.waiting
    total.unchanged = part.unchanged


def check_location(
    location: str,
    state_path: str | Path,
    *,
    dataset: str,
    stable_seconds: float = 5.0,
    settle: bool = True,
    max_wait_s: float | None = None,
    emit: Emitter = emit_dataset_updated,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
    recursive: bool = False,
) -> PollResult:
    """One complete check (the sensor flow and `finetune watch --once`): poll, and while files are still
    settling, wait `stable_seconds` and poll again (up to `max_wait_s`, default 10 windows).

    The state file is locked for the whole check, so two watchers of the same state never announce twice.
    """
    from filelock import FileLock

    state_path = Path(state_path)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = clock() + (max_wait_s if max_wait_s is not None else 10 * max(stable_seconds, 1.0))
    total = PollResult()
    with FileLock(str(state_path) + ".lock", timeout=600):
        state = load_state(state_path, location)
        try:
            while True:
                _merge(
                    total,
                    poll(
                        location,
                        state,
                        dataset=dataset,
                        stable_seconds=stable_seconds,
                        emit=emit,
                        now=clock(),
                        recursive=recursive,
                    ),
                )
                if not (settle and total.waiting) or clock() + stable_seconds > deadline:
                    break
                sleep(stable_seconds)
        finally:
            save_state(state_path, state)
    return total


def watch_forever(
    location: str,
    state_path: str | Path,
    *,
    dataset: str,
    interval_s: float = 10.0,
    stable_seconds: float = 5.0,
    emit: Emitter = emit_dataset_updated,
    on_result: Callable[[PollResult], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
    recursive: bool = False,
) -> None:
    """Poll every `interval_s` until `stop()` is true (the CLI watcher; Ctrl-C ends it)."""
    while not stop():
        result = check_location(
            location,
            state_path,
            dataset=dataset,
            stable_seconds=stable_seconds,
            settle=False,
            emit=emit,
            recursive=recursive,
        )
        if on_result is not None:
            on_result(result)
        sleep(interval_s)
