"""Data versions for retraining on new data (the `retrain` config section).

A `dataset.updated` event names a dropped file and its sha256. `apply_new_data` turns it into the
data source of the next run and records a new data version in `<workspace>/data-versions/<name>.json`:

- `replace`: the dropped file is the whole dataset (the data stage splits it).
- `append`: the dropped rows join the current version's train rows. The test split is fixed the first
  time (carved from the current data exactly as the data stage would, then frozen in a file) and every
  later version points at that same test file, so test metrics stay comparable across versions. New rows
  whose text is in the fixed test split are dropped (no leakage); exact duplicates of train rows too.

An event is not trusted (DESIGN.md rule 11, docs/security.md): its path must lie under an allowed root
(retrain.drop_folder, data.source's folder, retrain.allowed_roots; real paths, so no symlink or `..` leads out),
a URL needs a scheme listed in retrain.allowed_url_schemes, its sha256 must be 64 hex digits and match the bytes
read. A dropped file is copied, by content, into `<workspace>/data-versions/<name>/files/<sha256>/` only after
it read as a table with the dataset's columns, so a version never changes when the drop folder does. Each
version records its trigger (path + sha256), parent, files, row counts and the prepared-dataset fingerprint
(`tasks.data.dataset_fingerprint`). The same dropped content never makes two versions: a retried run gets the
version it made before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pandas as pd

from tasks.config import RunConfig
from tasks.data.sources import SUPPORTED, DataError, load_source, read_table, source_files
from tasks.files import atomic_dir, read_json, sha256_file, write_json
from tasks.workspace import Workspace, WorkspaceError

SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class DataVersion:
    """A recorded data version: what the run trains on (never the rows themselves)."""

    name: str
    version: int
    policy: str
    source: str | dict[str, str]
    fingerprint: str
    parent: int | None
    rows: dict[str, int]
    reused: bool


def dataset_name(cfg: RunConfig) -> str:
    return cfg.retrain.dataset_name or cfg.registry.name


def log_path(cfg: RunConfig) -> Path:
    return Workspace.at(cfg.workspace).data_versions / f"{dataset_name(cfg)}.json"


def _read_log(p: Path) -> dict:
    """The data-version log, or a WorkspaceError naming the file and the fix (never a bare JSONDecodeError)."""
    try:
        log = read_json(p)
        why = "" if isinstance(log, dict) and isinstance(log.get("versions"), list) else "no list of versions"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = f"not readable JSON: {type(exc).__name__}"
    if why:
        raise WorkspaceError(
            f"{p}: the data-version log of {p.stem!r} is damaged ({why}); fix: restore it from a backup, or move it "
            "away to start a new version history (the next triggered run starts again from data.source)"
        )
    return log


def list_versions(cfg: RunConfig) -> list[dict]:
    p = log_path(cfg)
    return _read_log(p)["versions"] if p.exists() else []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- what an event may name (DESIGN.md rule 11: nothing from outside is trusted) ---------------------------


def _refuse(problem: str) -> NoReturn:
    raise DataError([problem])


def check_sha256(data_sha256: str | None) -> str | None:
    """The event's sha256 in lower case (None when absent); exactly 64 hex digits, so it never becomes a path."""
    if data_sha256 is None or data_sha256 == "":
        return None
    if not isinstance(data_sha256, str) or not SHA256_HEX.fullmatch(data_sha256):
        _refuse(
            f"data_sha256 {str(data_sha256)[:80]!r} is not a sha256 (expected exactly 64 hex digits); fix: pass "
            "the hex digest of the file's bytes (`sha256sum FILE`), or leave it out to use the file's own hash"
        )
    return data_sha256.lower()


def allowed_roots(cfg: RunConfig) -> list[Path]:
    """Folders new data may come from: retrain.drop_folder, data.source's folder(s), retrain.allowed_roots (real
    paths, so neither a symlink nor `..` leads out of them)."""
    src = cfg.data.source
    folders = [cfg.retrain.drop_folder]
    for f in src.values() if isinstance(src, dict) else [src]:
        if not f.startswith("hf://"):
            p = Path(f).expanduser()
            folders.append(str(p if p.is_dir() else p.parent))
    folders += cfg.retrain.allowed_roots
    return list(dict.fromkeys(Path(f).expanduser().resolve() for f in folders))


def _protocols(location: str) -> list[str]:
    """fsspec protocols of a location ([] for a plain local path), chained ones (`a::b://x`) included."""
    if "://" not in location and "::" not in location and not location.startswith("data:"):
        return []
    return [bit.split("://", 1)[0].split(":", 1)[0].lower() for bit in location.split("::")]


def locate_drop(cfg: RunConfig, data_source: str):
    """(fsspec filesystem, path) for a URL whose scheme is in retrain.allowed_url_schemes, or (None, real path) for
    a local file under an allowed root; otherwise a DataError. Reads and writes nothing."""
    from tasks.data.watching import WatchError, is_data_file, open_location

    protocols = _protocols(data_source)
    if protocols == ["file"]:
        data_source, protocols = data_source.split("://", 1)[1], []
    allowed = [s.lower() for s in cfg.retrain.allowed_url_schemes]
    roots = allowed_roots(cfg)
    refused = [p for p in protocols if p not in allowed]
    if refused:
        _refuse(
            f"{data_source}: URL scheme {refused[0]!r} is not allowed for new data (retrain.allowed_url_schemes: "
            f"{', '.join(allowed) or 'none'}); fix: copy the file into retrain.drop_folder ({roots[0]}) or add "
            f"{refused[0]!r} to retrain.allowed_url_schemes"
        )
    if protocols:
        try:
            fs, path = open_location(data_source)
        except WatchError as exc:
            raise DataError([str(exc)]) from None
    else:
        fs, given = None, Path(data_source).expanduser()
        path = given.resolve()
        if not any(path.is_relative_to(r) for r in roots):
            via = f" (resolves to {path})" if path != given.absolute() else ""
            _refuse(
                f"{data_source}{via}: outside the folders new data may come from "
                f"({', '.join(map(str, roots))}); fix: move the file into retrain.drop_folder ({roots[0]}) or "
                "add its folder to retrain.allowed_roots"
            )
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    if not is_data_file(name):
        _refuse(f"{name}: not a data file (expected {', '.join(SUPPORTED)}); fix: drop a data file")
    return fs, path


def _open(fs, path):
    if fs is None:  # the real path checked above; O_NOFOLLOW: a symlink swapped in since is not followed
        return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")
    return fs.open(path, "rb")


def _copy_hashed(fs, path, dest: Path | None) -> str:
    """sha256 of the bytes read (copied to `dest` as they are read, when given)."""
    h = hashlib.sha256()
    with _open(fs, path) as fh, open(dest, "wb") if dest else contextlib.nullcontext() as out:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            if out:
                out.write(chunk)
    return h.hexdigest()


def drop_sha256(cfg: RunConfig, data_source: str, data_sha256: str | None = None) -> str:
    """The content a triggered run is keyed by: the event's sha256 (checked), else the allowed file's own bytes."""
    sha = check_sha256(data_sha256)
    fs, path = locate_drop(cfg, data_source)
    return sha or _copy_hashed(fs, path, None)


def fetch_drop(cfg: RunConfig, data_source: str, data_sha256: str | None) -> tuple[Path, str]:
    """Copy an allowed dropped file (local path or allowed URL) into the content store once its bytes match the
    event's sha256 and it reads as a table with the dataset's columns; nothing is stored before that."""
    sha = check_sha256(data_sha256)
    fs, path = locate_drop(cfg, data_source)
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    store = Workspace.at(cfg.workspace).data_versions / dataset_name(cfg) / "files"
    if sha and (store / sha / name).is_file():
        return store / sha / name, sha
    if not (path.is_file() if fs is None else fs.exists(path) and fs.isfile(path)):
        _refuse(
            f"{data_source}: the new data file does not exist (moved or deleted since the event?); "
            "fix: drop it again or run with data_source pointing at an existing file"
        )
    store.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=store.parent.parent, prefix=f".{dataset_name(cfg)}.incoming-"))
    try:
        actual = _copy_hashed(fs, path, tmp / name)
        if sha and actual != sha:
            _refuse(
                f"{data_source}: content changed since the event (sha256 {actual[:12]}..., event said "
                f"{sha[:12]}...); nothing was trained; fix: the watcher announces the new content once the file "
                "is complete"
            )
        try:
            _read(tmp / name, cfg)
        except DataError as exc:  # name the dropped file, not the temporary copy
            raise DataError([p.replace(str(tmp / name), data_source) for p in exc.problems]) from None
        if not (store / actual / name).is_file():
            with atomic_dir(store / actual) as staged:
                os.replace(tmp / name, staged / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store / actual / name, actual


def _columns(cfg: RunConfig) -> list[str]:
    d = cfg.data
    return [c for c in (d.text_column, d.text_pair_column, d.label_column) if c]


def _read(path: Path, cfg: RunConfig) -> pd.DataFrame:
    """A raw file's data columns (no provenance columns). A missing column is named with the columns the config
    expects, never with the file's own header (no file content in errors)."""
    df = read_table(path)
    missing = [c for c in _columns(cfg) if c not in df.columns]
    if missing:
        d = cfg.data
        fields = [f"data.{f}" for f in ("text_column", "text_pair_column", "label_column") if getattr(d, f)]
        _refuse(
            f"{path}: no column(s) {', '.join(repr(m) for m in missing)} (expected columns: "
            f"{', '.join(_columns(cfg))}, set by {', '.join(fields)}); fix: give the file the dataset's columns, "
            "or set those settings to the file's column names"
        )
    return df[_columns(cfg)]


def _suffix(paths: list[Path]) -> str:
    kinds = {".jsonl" if p.suffix == ".json" else p.suffix for p in paths}
    return kinds.pop() if len(kinds) == 1 else ".parquet"


def _write(df: pd.DataFrame, path: Path) -> None:
    if path.suffix in (".csv", ".tsv"):
        df.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        df = df.copy()
        for c in df.columns:  # mixed sources: scalars as text (the data stage parses labels from text)
            df[c] = df[c].map(lambda v: v if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else str(v))
        df.to_parquet(path, index=False)


def _key(df: pd.DataFrame, cfg: RunConfig) -> pd.Series:
    d = cfg.data
    key = df[d.text_column].astype(str)
    return key + ("\x00" + df[d.text_pair_column].astype(str) if d.text_pair_column else "")


def _fixed_splits(cfg: RunConfig, source: str | dict[str, str], out: Path) -> tuple[dict[str, str], dict[str, int]]:
    """A source as {train, [validation], test} files; a source without a test split gets one carved out
    exactly as the data stage carves it (same seed and shares) and frozen in `out`."""
    from tasks.data.splits import make_splits
    from tasks.data.validation import validate

    kind, files = source_files(source)
    if kind != "files":
        raise DataError(
            [
                f"data.source {source}: retrain.policy append needs file sources (CSV/JSONL/Parquet), "
                f"not a {kind} dataset; fix: export it to files or use retrain.policy replace"
            ]
        )
    named = {split: str(Path(p).resolve()) for split, p in files if split}
    if "test" in named and "train" in named and len(named) == len(files):
        return named, {}
    raw = load_source(source)
    frames, task, labels, _ = validate(raw, cfg.data)
    splits, _ = make_splits(frames, task, labels, cfg.data)
    everything = pd.concat([p.frame for p in raw.parts], ignore_index=True)
    test_rows = set(zip(splits["test"]["_file"], splits["test"]["_row"], strict=False))
    in_test = pd.Series([(f, r) in test_rows for f, r in zip(everything["_file"], everything["_row"], strict=False)])
    if "validation" in frames:  # a provided validation split stays as it is; only train rows are the pool
        in_pool = ~everything["_file"].isin(set(frames["validation"]["_file"]))
    else:
        in_pool = pd.Series(True, index=everything.index)
    suffix = _suffix([Path(p) for _, p in files])
    train, test = everything[in_pool & ~in_test][_columns(cfg)], everything[in_test][_columns(cfg)]
    _write(train, out / f"train{suffix}")
    _write(test, out / f"test{suffix}")
    result = {"train": str(out / f"train{suffix}"), "test": str(out / f"test{suffix}")}
    if "validation" in named:
        result["validation"] = named["validation"]
    return result, {"train": len(train), "test": len(test)}


def _record(
    cfg: RunConfig, log: dict, policy: str, parent: dict | None, trigger: dict, source, rows: dict, **extra
) -> dict:
    """A new version entry (number, time, fingerprint, file hashes), appended to the log, written atomically."""
    from tasks.data.fingerprint import dataset_fingerprint

    entry = {"version": len(log["versions"]) + 1, "created_at": _now(), "policy": policy}
    entry |= {"parent": parent["version"] if parent else None, "trigger": trigger, "source": source, **extra}
    entry["rows"] = rows
    data = cfg.data.model_copy(update={"source": entry["source"]})
    entry["fingerprint"] = dataset_fingerprint(data)
    files = entry["source"].items() if isinstance(entry["source"], dict) else [("data", entry["source"])]
    entry["files"] = {k: {"path": v, "sha256": sha256_file(v)} for k, v in files}
    log["versions"].append(entry)
    write_json(log_path(cfg), log)
    return entry


def _as_version(cfg: RunConfig, e: dict, reused: bool) -> DataVersion:
    facts = (e["version"], e["policy"], e["source"], e["fingerprint"], e["parent"], e.get("rows", {}))
    return DataVersion(dataset_name(cfg), *facts, reused)


def _reused(log: dict, sha: str | None, policy: str) -> dict | None:
    """The version a retried run made from the same content (a dropped file never makes two versions)."""
    for e in reversed(log["versions"]) if sha else []:
        if (e.get("trigger") or {}).get("sha256") == sha and e["policy"] == policy:
            return e
    return None


def _freeze_test(cfg: RunConfig, log: dict, root: Path, parent: dict | None) -> dict:
    """A version whose test split is fixed: carved from the config's data (or a replaced version) and frozen."""
    base_source = parent["source"] if parent else cfg.data.source
    n = len(log["versions"]) + 1
    shutil.rmtree(root / f"v{n}", ignore_errors=True)  # under the lock, unlisted: a crashed attempt's
    with atomic_dir(root / f"v{n}") as tmp:
        splits, rows = _fixed_splits(cfg, base_source, tmp)
    splits = {k: v.replace(str(tmp), str(root / f"v{n}")) for k, v in splits.items()}
    trigger = {"from": "config data.source" if n == 1 else f"version {n - 1}", "source": base_source}
    return _record(cfg, log, "base", parent, trigger, splits, rows, fixed_test=splits["test"])


def _append(cfg: RunConfig, log: dict, root: Path, parent: dict, stored: Path, trigger: dict) -> dict:
    """The parent's train rows plus the new ones (rows whose text is in the fixed test split, and exact duplicates
    of train rows, dropped); the test split stays the parent's."""
    prev = parent["source"]
    old, new = _read(Path(prev["train"]), cfg), _read(stored, cfg)
    leak = _key(new, cfg).isin(set(_key(_read(Path(parent["fixed_test"]), cfg), cfg)))
    both = pd.concat([old, new[~leak]], ignore_index=True)
    dup = both.astype(str).duplicated() & (both.index >= len(old))
    train = both[~dup]
    n = len(log["versions"]) + 1
    suffix = _suffix([Path(prev["train"]), stored])
    shutil.rmtree(root / f"v{n}", ignore_errors=True)
    with atomic_dir(root / f"v{n}") as tmp:
        _write(train, tmp / f"train{suffix}")
    rows = {
        "train": len(train),
        "new": len(new),
        "added": int(len(train) - len(old)),
        "dropped_in_test": int(leak.sum()),
        "dropped_duplicates": int(dup.sum()),
    }
    source = {**prev, "train": str(root / f"v{n}" / f"train{suffix}")}
    return _record(cfg, log, "append", parent, trigger, source, rows, fixed_test=parent["fixed_test"])


def apply_new_data(cfg: RunConfig, data_source: str, data_sha256: str | None = None) -> tuple[RunConfig, DataVersion]:
    """Record the data version made from a dropped file; return the config to train on it and the version."""
    from filelock import FileLock

    data_sha256 = check_sha256(data_sha256)
    locate_drop(cfg, data_source)  # a location that is not allowed is refused before anything is written
    log_file = log_path(cfg)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(log_file) + ".lock", timeout=cfg.registry.lock_timeout_s):
        log = _read_log(log_file) if log_file.exists() else {"name": dataset_name(cfg), "versions": []}
        policy = cfg.retrain.policy
        done = _reused(log, data_sha256, policy)
        if done is None:
            stored, sha = fetch_drop(cfg, data_source, data_sha256)
            done = _reused(log, sha, policy)
        if done is not None:
            return _with_source(cfg, done["source"]), _as_version(cfg, done, reused=True)
        root = log_file.parent / dataset_name(cfg)
        trigger = {"path": data_source, "sha256": sha, "stored": str(stored)}
        parent = log["versions"][-1] if log["versions"] else None
        if policy == "replace":
            entry = _record(cfg, log, "replace", parent, trigger, str(stored), {"new": len(_read(stored, cfg))})
        else:
            if parent is None or not parent.get("fixed_test"):
                parent = _freeze_test(cfg, log, root, parent)
            entry = _append(cfg, log, root, parent, stored, trigger)
        return _with_source(cfg, entry["source"]), _as_version(cfg, entry, reused=False)


def _with_source(cfg: RunConfig, source: str | dict[str, str]) -> RunConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": source})})
