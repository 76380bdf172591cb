"""Content-hash cache policies for Prefect (DESIGN.md rule 3).

Prefect's INPUTS policy hashes a path as a string and its default policy includes the run id, so neither caches
correctly across runs. Here each stage supplies a cheap `key_fn(**inputs) -> (key, path)` computed from content
(data bytes, the config fields that matter to the stage, upstream keys, the base-model fingerprint) and the cache
key also hashes the stage's code version (the source of the import closure of its module). Before Prefect looks a
cache record up, `StageCache` drops it (a miss: the stage runs again) when the stage's output is gone, or when the
record is not ours: Prefect picks the deserializer the stored record names, so a record must name our
`RecordSerializer` ("finetune-record": JSON {"record": NAME, "data": {...}}, rebuilt only as the allow-listed
classes of STAGE_RECORDS, never unpickled; DESIGN.md rule 11) and its result must parse as one of our records.
A pickle, a crafted or a damaged file is discarded with a warning naming it. Records are written atomically
(`AtomicLocalFileSystem`).

Two runs of the same config at once: SERIALIZABLE isolation with a file lock manager makes the second wait for
the first's cache record and reuse it; a stale lock never blocks (`ProcessLockManager`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.serializers import Serializer
from pydantic import Field

from tasks.code_version import code_version
from tasks.workspace import WorkspaceError

log = logging.getLogger("finetune.caching")

KeyFn = Callable[..., tuple[str, Path]]


# ---- stage results: JSON records from an allow-list, never pickles ---------------------------------------------

RECORD_SERIALIZER = "finetune-record"
# The allow-list: the only classes a stored stage result is ever rebuilt as, by short name -> defining module.
STAGE_RECORDS = {
    "DataVersion": "tasks.data.versions",
    "PreparedData": "tasks.records",
    "TokenizedData": "tasks.records",
    "PlanRecord": "tasks.stages",
    "Trial": "tasks.records",
    "TrainResult": "tasks.records",
    "EvalResult": "tasks.records",
    "ExportResult": "tasks.records",
    "RegistryResult": "tasks.records",
}


class RecordError(ValueError):
    """A stored stage result that is not one of the allow-listed records."""


class StageError(RuntimeError):
    """A failed attempt's exception as Prefect stores it: its type and message only, never the object."""


def _record_class(name: Any) -> type:
    import importlib

    module = STAGE_RECORDS.get(name) if isinstance(name, str) else None
    cls = getattr(importlib.import_module(module), name, None) if module else None
    if cls is None or not is_dataclass(cls):
        raise RecordError(f"record type {name!r} is not one of the stage records ({', '.join(STAGE_RECORDS)})")
    return cls


def encode_record(obj: Any) -> bytes:
    """{"record": <short name>, "data": <the dataclass's fields>} as JSON bytes (an exception: a StageError)."""
    if isinstance(obj, BaseException):  # Prefect stores a failed attempt's exception too
        return json.dumps({"record": "StageError", "data": {"error": f"{type(obj).__name__}: {obj}"}}).encode()
    name = type(obj).__name__
    if not is_dataclass(obj) or STAGE_RECORDS.get(name) != type(obj).__module__:
        raise RecordError(f"{type(obj).__module__}.{type(obj).__qualname__} is not a stage record")
    return json.dumps({"record": name, "data": asdict(obj)}).encode()


def decode_record(blob: bytes) -> Any:
    """The record in `blob`, rebuilt only as an allow-listed class; anything else is a RecordError."""
    try:
        doc = json.loads(blob)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise RecordError(f"not a JSON record ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"record", "data"} or not isinstance(doc["data"], dict):
        raise RecordError("not a stage record (expected {record, data})")
    if doc["record"] == "StageError" and set(doc["data"]) == {"error"} and isinstance(doc["data"]["error"], str):
        return StageError(doc["data"]["error"])
    cls = _record_class(doc["record"])
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(doc["data"]) - names)
    if unknown:
        raise RecordError(f"{doc['record']} has no field(s) {', '.join(unknown)}")
    try:
        return cls(**doc["data"])
    except TypeError as exc:
        raise RecordError(f"{doc['record']}: {exc}") from None


class RecordSerializer(Serializer):
    """Prefect serializer of stage results: JSON records from the allow-list (STAGE_RECORDS), never pickles."""

    type: str = Field(default=RECORD_SERIALIZER, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return encode_record(obj)

    def loads(self, blob: bytes) -> Any:
        return decode_record(blob)


class AtomicLocalFileSystem(LocalFileSystem):
    """Prefect's local storage writing each file atomically (a temporary sibling, then a rename), for the cache
    records. (A task's result storage must be a saved block or a path, so results are written in place; Prefect
    writes a result before its record, and a record whose result does not parse is discarded.)"""

    _block_type_name = "Finetune Atomic Local File System"

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        target = Path(self._resolve_path(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def stored_record_problem(record: Path, results_dir: Path) -> str | None:
    """Why the cache record at `record` must not be used, or None when it is ours and its result is a record."""
    try:
        meta = json.loads(record.read_bytes())
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or meta.get("serializer") != {"type": RECORD_SERIALIZER}:
        found = meta.get("serializer") if isinstance(meta, dict) else meta
        return f"its serializer is {found!r}, not {RECORD_SERIALIZER!r}"
    expected = results_dir / record.name
    if meta.get("storage_block_id") is not None or Path(str(meta.get("storage_key") or "")) != expected:
        return f"its result is stored at {meta.get('storage_key')!r}, not {expected}"
    try:
        stored = decode_record(expected.read_bytes())
    except OSError as exc:
        return f"its result {expected} is unreadable ({type(exc).__name__}: {exc})"
    except RecordError as exc:
        return f"its result {expected} is damaged: {exc}"
    return f"its result {expected} is a failure, not a record" if isinstance(stored, StageError) else None


@dataclass
class StageCache(CachePolicy):
    """Cache key = stage name + code version + content key + whether the output folder exists."""

    stage: str = ""
    key_fn: KeyFn | None = None
    module: str = ""  # the module of the stage's implementation: its import closure is the code version
    records_dir: str | None = None
    results_dir: str | None = None

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.key_fn is None:
            return None
        try:
            key, path = self.key_fn(**inputs)
        except WorkspaceError as exc:  # a damaged fact file: the stage itself runs (uncached) and reports it
            log.warning("stage %s runs uncached: %s", self.stage, exc)
            return None
        raw = "|".join([self.stage, code_version(self.module), key])
        cache_key = f"{self.stage}-{hashlib.sha256(raw.encode()).hexdigest()[:32]}"
        if self.records_dir:
            self._check_record(Path(self.records_dir) / cache_key, Path(path))
        return cache_key

    def _check_record(self, record: Path, output: Path) -> None:
        """Drop the stored record before Prefect looks it up when its output is gone, or when it is not ours or
        its result is not one of our records (a pickle, a crafted or damaged file): a miss, never a hit."""
        if not output.exists():
            record.unlink(missing_ok=True)  # output gone: a miss, not a hit
            return
        if not record.exists() or self.results_dir is None:
            return
        problem = stored_record_problem(record, Path(self.results_dir))
        if problem:
            log.warning(
                "discarding the cached result of stage %s: %s %s; the stage runs again", self.stage, record, problem
            )
            record.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ProcessLockManager(FileSystemLockManager):
    """File locks recording the holder's host, pid and thread. A lock is stale, not blocking forever, when its
    process is gone (SIGKILL, OOM killer), its thread here has ended, the same thread asks again with a new holder
    (a retry: Prefect keeps the lock of an attempt whose cached result could not be read; a thread runs one stage
    at a time), or past `hold_timeout_s` (when set)."""

    # Prefect creates a lock file empty (touch) and writes its JSON just after: a reader in between used to
    # fail with "EOF while parsing" (seen once in two concurrent runs of one config). Reads retry for about
    # READ_RETRIES x READ_PAUSE_S; a lock file still unreadable after that lost its writer and counts as stale.
    READ_RETRIES, READ_PAUSE_S = 50, 0.02

    def __init__(self, lock_files_directory: Path, hold_timeout_s: float | None = None) -> None:
        super().__init__(lock_files_directory)
        self.hold_timeout_s = hold_timeout_s

    def _stamp(self, key: str) -> None:
        path = Path(self._lock_path_for_key(key))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            info = json.loads(path.read_bytes() or b"{}")
            info.update(pid=os.getpid(), host=socket.gethostname(), thread=threading.get_ident())
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)  # readers see the old or the new content, never a truncated file
        except (OSError, ValueError):
            tmp.unlink(missing_ok=True)

    def _get_lock_info(self, key: str, use_cache: bool = True):
        for _ in range(self.READ_RETRIES):
            try:
                return super()._get_lock_info(key, use_cache=use_cache)
            except ValueError:  # empty or half-written: its writer is between touch and write
                time.sleep(self.READ_PAUSE_S)
        self._reclaim(key, why=f"still unreadable after {self.READ_RETRIES * self.READ_PAUSE_S:.1f} s")
        return None

    def _stale(self, key: str, holder: str | None = None) -> str | None:
        """Why the lock on `key` is stale (its holder cannot release it any more), or None."""
        try:
            info = json.loads(Path(self._lock_path_for_key(key)).read_bytes() or b"{}")
        except (OSError, ValueError):
            return None
        pid, thread = info.get("pid"), info.get("thread")
        if not pid or info.get("host") != socket.gethostname():
            return None
        if int(pid) != os.getpid():
            return None if _alive(int(pid)) else f"its holder (pid {pid}) is gone"
        if thread is None:
            return None
        if thread not in {t.ident for t in threading.enumerate()}:
            return f"its holder's thread ({thread}) in this process has ended"
        if holder is not None and thread == threading.get_ident() and info.get("holder") != holder:
            return "this thread holds it from an earlier attempt (a retry does not wait for itself)"
        return None

    def _reclaim(self, key: str, holder: str | None = None, why: str | None = None) -> bool:
        """Remove the lock on `key` when it is stale (or `why` says so); True when removed."""
        why = why or self._stale(key, holder)
        if why:
            path = Path(self._lock_path_for_key(key))
            log.warning("removing stale lock %s: %s", path.name, why)
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)
        return why is not None

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        self._reclaim(key, holder)
        if ok := super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_timeout_s):
            self._stamp(key)
        return ok

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        self._reclaim(key, holder)
        if ok := await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_timeout_s):
            self._stamp(key)
        return ok

    def release_lock(self, key: str, holder: str) -> None:
        try:
            super().release_lock(key, holder)
        except ValueError as exc:  # expired or reclaimed meanwhile: nothing of this holder's is left to release
            log.warning("lock %s was no longer held by this run (%s)", key, exc)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if self._reclaim(key):
            return False
        try:
            return super().is_locked(key, use_cache=use_cache)
        except FileNotFoundError:  # expired, and removed by another process first
            self._locks.pop(key, None)
            return False


def stage_policy(
    stage: str, key_fn: KeyFn, module: str, workspace: Path, hold_timeout_s: float | None = None
) -> StageCache:
    """A StageCache storing its records under the workspace, serializable with file locks."""
    from prefect.transactions import IsolationLevel

    records, results = workspace / "prefect" / "cache-keys", str(result_storage(workspace).resolve())
    policy = StageCache(stage=stage, key_fn=key_fn, module=module, records_dir=str(records), results_dir=results)
    return policy.configure(
        key_storage=AtomicLocalFileSystem(basepath=str(records)),
        lock_manager=ProcessLockManager(workspace / "prefect" / "locks", hold_timeout_s),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )


def result_storage(workspace: Path) -> Path:
    """Where the stages' results are stored (JSON records, see RecordSerializer)."""
    return workspace / "prefect" / "results"
