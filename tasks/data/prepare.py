"""Data stage: validate raw labelled data, split it (stratified, leak-free), weight classes, write a
content-addressed prepared dataset `<workspace>/datasets/<fingerprint>/` (splits as Parquet, manifest.json,
report.md). The same data and settings give the same folder, and a second run does no work.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DataConfig, RunConfig
from tasks.data.fingerprint import DATA_STAGE_VERSION, dataset_fingerprint
from tasks.data.report import data_report
from tasks.data.sft_data import check_sft
from tasks.data.sources import _where, load_source, source_hashes
from tasks.data.splits import SPLITS, _group_keys, class_weights, label_counts, make_splits
from tasks.data.validation import check_data
from tasks.files import atomic_dir, sha256_json, write_json
from tasks.records import PreparedData
from tasks.workspace import Workspace, WorkspaceError, read_facts

TASKS = ("single_label", "multi_label", "regression", "sft")


def data_warnings(raw_frames: dict, splits: dict, task: str, labels: list[str]) -> list[str]:
    """Problems worth a look that do not stop the run (leakage is named in validation; truncation, counted in
    tokens, in the tokenized folder's tokenized.json)."""
    warnings = []
    if task == "sft":
        return _sft_warnings(raw_frames)
    for name, df in raw_frames.items():
        where = name or "the data"
        lab = df["label"].map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
        g = _group_keys(df)
        dup = pd.DataFrame({"g": g, "l": lab}).duplicated()
        if dup.any():
            warnings.append(
                f"{int(dup.sum())} exact duplicate row(s) in {where} (e.g. {_where(df, dup)[0]}); they are kept together in one split"
            )
        conflict = pd.DataFrame({"g": g, "l": lab}).groupby("g")["l"].transform("nunique") > 1
        if conflict.any():
            warnings.append(
                f"{int(g[conflict].nunique())} text(s) in {where} carry different labels (e.g. {_where(df, conflict)[0]})"
            )
    if task != "regression":
        counts = label_counts(splits["train"], task, labels)
        total = len(splits["train"])
        rare = [f"'{n}' ({c / total:.2%})" for n, c in counts.items() if total and c / total < 0.01]
        if rare and task == "single_label":
            warnings.append(
                f"extreme imbalance: minority class(es) {', '.join(rare)} of train; class weights matter here"
            )
        elif rare:
            warnings.append(f"{len(rare)} label(s) on under 1 % of train rows: {', '.join(rare[:6])}")
    return warnings


def _sft_warnings(raw_frames: dict) -> list[str]:
    warnings = []
    for name, df in raw_frames.items():
        dup = df.duplicated(subset=["text", "response"])
        if dup.any():
            warnings.append(
                f"{int(dup.sum())} exact duplicate example(s) in {name or 'the data'} (e.g. "
                f"{_where(df, dup)[0]}); they are kept together in one split"
            )
    return warnings


def prepare_dataset(cfg: RunConfig) -> PreparedData:
    """Load, validate, split and weight; write `<workspace>/datasets/<fingerprint>/` once."""
    t0 = time.perf_counter()
    dcfg = cfg.data
    hashes = source_hashes(dcfg.source)
    fp = dataset_fingerprint(dcfg, hashes)
    final = Workspace.at(cfg.workspace).dataset(fp)
    if final.exists():
        m = verified_manifest(final, fp, dcfg)
        return PreparedData(
            str(final), fp, m["task"], m["labels"], {s: v["rows"] for s, v in m["splits"].items()}, True
        )
    raw = load_source(dcfg.source, hashes, collect=True)
    checked = check_sft(raw, dcfg) if dcfg.task == "sft" else check_data(raw, dcfg)
    frames, task, labels = checked.frames, checked.task, checked.labels
    splits, notes = make_splits(frames, task, labels, dcfg)
    weights = class_weights(splits["train"], task, labels, dcfg)
    manifest = {
        "fingerprint": fp,
        "sources": raw.sources,
        "task": task,
        "labels": labels,
        "columns": {"text": "text", "text_pair": "text_pair" if dcfg.text_pair_column else None, "label": "label"}
        if task != "sft"
        else {"text": "text", "response": "response", "messages": "messages"},
        "splits": {s: {"rows": len(df), "label_counts": label_counts(df, task, labels)} for s, df in splits.items()},
        "class_weighting": dcfg.class_weighting if task not in ("regression", "sft") else "none",
        "class_weights": weights,
        "leakage": checked.leakage,
        "warnings": checked.warnings + data_warnings(frames, splits, task, labels),
        "notes": notes,
        "settings": dcfg.model_dump(mode="json"),
        "data_stage_version": DATA_STAGE_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if task == "regression":
        manifest["target_stats"] = {s: _target_stats(df["label"]) for s, df in splits.items()}
    manifest["facts_sha256"] = _facts_digest(manifest)
    with atomic_dir(final) as tmp:
        for s, df in splits.items():
            df.drop(columns=["_file", "_row"]).to_parquet(tmp / f"{s}.parquet", index=False)
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / "manifest.json", manifest)
        (tmp / "report.md").write_text(data_report(manifest), encoding="utf-8")
    return PreparedData(str(final), fp, task, labels, {s: len(df) for s, df in splits.items()}, False)


def _facts_digest(m: dict) -> str:
    """A hash of the facts later stages rely on, so a manifest edited by hand is not reused as if it were built."""
    keys = ("fingerprint", "task", "labels", "columns", "splits", "class_weighting", "class_weights", "settings")
    return sha256_json({k: m.get(k) for k in keys})


def verified_manifest(folder: Path, fp: str, cfg: DataConfig) -> dict:
    """The manifest of a prepared folder about to be reused, checked against its fingerprint, the settings and
    its own digest; a damaged or edited one is a WorkspaceError naming the file and the fix."""
    path = folder / "manifest.json"
    if not path.exists():
        raise WorkspaceError(
            f"{path} does not exist, but its folder does: the prepared dataset is damaged; "
            f"fix: delete {folder} and run again (it is rebuilt from the data)"
        )
    m = read_facts(path, "prepared dataset")
    problems = []
    if m.get("fingerprint") != fp or folder.name != fp:
        problems.append(
            f"its fingerprint {m.get('fingerprint')!r} is not the folder's ({folder.name}) or this data's ({fp})"
        )
    if m.get("task") not in TASKS or (cfg.task != "auto" and m.get("task") != cfg.task):
        problems.append(f"its task {m.get('task')!r} is not {cfg.task if cfg.task != 'auto' else ' or '.join(TASKS)}")
    labels = m.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        problems.append(f"its labels {labels!r} are not a list of names")
    splits = m.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        problems.append(f"its splits are not {', '.join(SPLITS)}")
    missing = [s for s in SPLITS if not (folder / f"{s}.parquet").is_file()]
    if missing:
        problems.append(f"{', '.join(f'{s}.parquet' for s in missing)} missing beside it")
    settings = {k: v for k, v in (m.get("settings") or {}).items() if k != "source"}
    if settings != cfg.model_dump(mode="json", exclude={"source"}):
        problems.append("its data settings are not this run's")
    if not problems and m.get("facts_sha256") != _facts_digest(m):
        problems.append("its facts do not match the digest written with them (facts_sha256)")
    if problems:
        raise WorkspaceError(
            f"{path} does not describe the dataset this folder should hold: {'; '.join(problems)}; it was edited or "
            f"damaged; fix: delete {folder} and run again (it is rebuilt from the data)"
        )
    return m


def _target_stats(y: pd.Series) -> dict[str, float]:
    return (
        {"mean": float(y.mean()), "std": float(y.std(ddof=0)), "min": float(y.min()), "max": float(y.max())}
        if len(y)
        else {}
    )
