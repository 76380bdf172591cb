"""Data versions for retraining on new data (the `retrain` config section).

A `dataset.updated` event names a dropped file and its sha256. `apply_new_data` turns it into the
data source of the next run and records a new data version in `<workspace>/data-versions/<name>.json`:

- `replace`: the dropped file is the whole dataset (the data stage splits it).
- `append`: the dropped rows join the current version's train rows. The test split is fixed the first
  time (carved from the current data exactly as the data stage would, then frozen in a file) and every
  later version points at that same test file, so test metrics stay comparable across versions. New rows
  whose text is in the fixed test split are dropped (no leakage); exact duplicates of train rows too.

Dropped files are first copied, by content, into `<workspace>/data-versions/<name>/files/<sha256>/`, so
a version never changes when the drop folder does. Each version records its trigger (path + sha256),
parent, files, row counts and the prepared-dataset fingerprint (`tasks.data.dataset_fingerprint`).
The same dropped content never makes two versions: a retried run gets the version it made before.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.config import RunConfig
from tasks.data.sources import DataError, load_source, read_table, source_files
from tasks.files import atomic_dir, read_json, sha256_file, write_json
from tasks.workspace import Workspace


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


def list_versions(cfg: RunConfig) -> list[dict]:
    p = log_path(cfg)
    return read_json(p)["versions"] if p.exists() else []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fetch_drop(cfg: RunConfig, data_source: str, data_sha256: str | None) -> tuple[Path, str]:
    """Copy the dropped file (local path or fsspec URL) into the content store; check its sha256."""
    from tasks.data.watching import hash_url, open_location

    store = Workspace.at(cfg.workspace).data_versions / dataset_name(cfg) / "files"
    name = data_source.rstrip("/").rsplit("/", 1)[-1]
    if data_sha256 and (store / data_sha256 / name).is_file():
        return store / data_sha256 / name, data_sha256
    fs, path = open_location(data_source)
    if not fs.exists(path) or not fs.isfile(path):
        raise DataError(
            [
                f"{data_source}: the new data file does not exist (moved or deleted since the event?); "
                "fix: drop it again or run with data_source pointing at an existing file"
            ]
        )
    actual = hash_url(data_source)
    if data_sha256 and actual != data_sha256:
        raise DataError(
            [
                f"{data_source}: content changed since the event (sha256 {actual[:12]}..., event said "
                f"{data_sha256[:12]}...); nothing was trained; fix: the watcher announces the new content "
                "once the file is complete"
            ]
        )
    final = store / actual
    if not (final / name).is_file():
        with atomic_dir(final) as tmp:
            fs.get(path, str(tmp / name))
            if sha256_file(tmp / name) != actual:
                raise DataError([f"{data_source}: content changed while copying; fix: drop the file again"])
    return final / name, actual


def _columns(cfg: RunConfig) -> list[str]:
    d = cfg.data
    return [c for c in (d.text_column, d.text_pair_column, d.label_column) if c]


def _read(path: Path, cfg: RunConfig) -> pd.DataFrame:
    """A raw file's data columns (no provenance columns); names the missing column and the fix."""
    df = read_table(path)
    missing = [c for c in _columns(cfg) if c not in df.columns]
    if missing:
        raise DataError(
            [
                f"{path}: no column(s) {', '.join(repr(m) for m in missing)} (columns: "
                f"{', '.join(c for c in df.columns if not c.startswith('_'))}); fix: use the same columns as "
                "the dataset (data.text_column / data.label_column)"
            ]
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


def _record(cfg: RunConfig, log: dict, entry: dict) -> dict:
    """Complete a version entry (fingerprint, file hashes) and write the log atomically."""
    from tasks.data.prepare import dataset_fingerprint

    data = cfg.data.model_copy(update={"source": entry["source"]})
    entry["fingerprint"] = dataset_fingerprint(data)
    files = entry["source"].items() if isinstance(entry["source"], dict) else [("data", entry["source"])]
    entry["files"] = {k: {"path": v, "sha256": sha256_file(v)} for k, v in files}
    log["versions"].append(entry)
    write_json(log_path(cfg), log)
    return entry


def _as_version(cfg: RunConfig, e: dict, reused: bool) -> DataVersion:
    return DataVersion(
        dataset_name(cfg),
        e["version"],
        e["policy"],
        e["source"],
        e["fingerprint"],
        e["parent"],
        e.get("rows", {}),
        reused,
    )


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
    return _record(
        cfg,
        log,
        {
            "version": n,
            "created_at": _now(),
            "policy": "base",
            "parent": parent["version"] if parent else None,
            "trigger": trigger,
            "source": splits,
            "fixed_test": splits["test"],
            "rows": rows,
        },
    )


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
    return _record(
        cfg,
        log,
        {
            "version": n,
            "created_at": _now(),
            "policy": "append",
            "parent": parent["version"],
            "trigger": trigger,
            "source": {**prev, "train": str(root / f"v{n}" / f"train{suffix}")},
            "fixed_test": parent["fixed_test"],
            "rows": rows,
        },
    )


def apply_new_data(cfg: RunConfig, data_source: str, data_sha256: str | None = None) -> tuple[RunConfig, DataVersion]:
    """Record the data version made from a dropped file; return the config to train on it and the version."""
    from filelock import FileLock

    log_file = log_path(cfg)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(log_file) + ".lock", timeout=cfg.registry.lock_timeout_s):
        log = read_json(log_file) if log_file.exists() else {"name": dataset_name(cfg), "versions": []}
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
            entry = _record(
                cfg,
                log,
                {
                    "version": len(log["versions"]) + 1,
                    "created_at": _now(),
                    "policy": "replace",
                    "parent": parent["version"] if parent else None,
                    "trigger": trigger,
                    "source": str(stored),
                    "rows": {"new": len(_read(stored, cfg))},
                },
            )
        else:
            if parent is None or not parent.get("fixed_test"):
                parent = _freeze_test(cfg, log, root, parent)
            entry = _append(cfg, log, root, parent, stored, trigger)
        return _with_source(cfg, entry["source"]), _as_version(cfg, entry, reused=False)


def _with_source(cfg: RunConfig, source: str | dict[str, str]) -> RunConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": source})})
