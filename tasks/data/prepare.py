"""Data stage: validate raw labelled data, split it (stratified, leak-free), weight classes, write a
content-addressed prepared dataset `<workspace>/datasets/<fingerprint>/` (splits as Parquet, manifest.json,
report.md). The same data and settings give the same folder, and a second run does no work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DataConfig, RunConfig
from tasks.data.report import data_report
from tasks.data.sources import load_source, source_files, source_hashes
from tasks.data.splits import _group_keys, class_weights, label_counts, make_splits
from tasks.data.validation import _where, validate
from tasks.files import atomic_dir, read_json, sha256_json, write_json
from tasks.workspace import Workspace

DATA_STAGE_VERSION = "1"


@dataclass
class PreparedData:
    """What the data stage hands to the next one: a path and a few facts (never the data)."""

    path: str
    fingerprint: str
    task: str
    labels: list[str]
    rows: dict[str, int]
    reused: bool


def data_warnings(raw_frames: dict, splits: dict, task: str, labels: list[str], cfg: DataConfig) -> list[str]:
    """Problems worth a look that do not stop the run."""
    warnings = []
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
    if len(raw_frames) > 1:
        keys = {s: set(_group_keys(df)) for s, df in raw_frames.items()}
        names = list(keys)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = keys[a] & keys[b]
                if both:
                    warnings.append(f"leakage: {len(both)} text(s) occur in both {a} and {b} as provided by the source")
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
    all_rows = pd.concat(list(splits.values()), ignore_index=True)
    words = all_rows["text"].str.split().str.len() + (
        all_rows["text_pair"].str.split().str.len() if "text_pair" in all_rows else 0
    )
    long = (words * 1.3 > cfg.max_length).mean() if len(all_rows) else 0.0
    if long > 0:
        warnings.append(
            f"{long:.1%} of rows are longer than ~{cfg.max_length} tokens (estimated at 1.3 tokens/word) and will be truncated; "
            "raise data.max_length if the end of the text matters"
        )
    return warnings


def dataset_fingerprint(cfg: DataConfig, hashes: dict[str, str] | None = None) -> str:
    """Hash of the raw bytes and the settings that shape the output (not the paths). Reads no rows."""
    settings = cfg.model_dump(mode="json", exclude={"source"})
    hashes = source_hashes(cfg.source) if hashes is None else hashes
    if isinstance(cfg.source, str) and cfg.source.startswith("hf://"):
        sources = [("hf", cfg.source)]
    else:
        split_of = {str(path): split for split, path in source_files(cfg.source)[1]}
        sources = sorted((str(split_of.get(f)), sha) for f, sha in hashes.items())
    return sha256_json({"sources": sources, "settings": settings, "version": DATA_STAGE_VERSION})[:20]


def prepare_dataset(cfg: RunConfig) -> PreparedData:
    """Load, validate, split and weight; write `<workspace>/datasets/<fingerprint>/` once."""
    t0 = time.perf_counter()
    dcfg = cfg.data
    hashes = source_hashes(dcfg.source)
    fp = dataset_fingerprint(dcfg, hashes)
    final = Workspace.at(cfg.workspace).dataset(fp)
    if (final / "manifest.json").exists():
        m = read_json(final / "manifest.json")
        return PreparedData(
            str(final), fp, m["task"], m["labels"], {s: v["rows"] for s, v in m["splits"].items()}, True
        )
    raw = load_source(dcfg.source, hashes)

    frames, task, labels, _ = validate(raw, dcfg)
    splits, notes = make_splits(frames, task, labels, dcfg)
    weights = class_weights(splits["train"], task, labels, dcfg)
    warnings = data_warnings(frames, splits, task, labels, dcfg)
    manifest = {
        "fingerprint": fp,
        "sources": raw.sources,
        "task": task,
        "labels": labels,
        "columns": {"text": "text", "text_pair": "text_pair" if dcfg.text_pair_column else None, "label": "label"},
        "splits": {s: {"rows": len(df), "label_counts": label_counts(df, task, labels)} for s, df in splits.items()},
        "class_weighting": dcfg.class_weighting if task != "regression" else "none",
        "class_weights": weights,
        "warnings": warnings,
        "notes": notes,
        "settings": dcfg.model_dump(mode="json"),
        "data_stage_version": DATA_STAGE_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if task == "regression":
        manifest["target_stats"] = {s: _target_stats(df["label"]) for s, df in splits.items()}
    with atomic_dir(final) as tmp:
        for s, df in splits.items():
            df.drop(columns=["_file", "_row"]).to_parquet(tmp / f"{s}.parquet", index=False)
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / "manifest.json", manifest)
        (tmp / "report.md").write_text(data_report(manifest), encoding="utf-8")
    return PreparedData(str(final), fp, task, labels, {s: len(df) for s, df in splits.items()}, False)


def _target_stats(y: pd.Series) -> dict[str, float]:
    return (
        {"mean": float(y.mean()), "std": float(y.std(ddof=0)), "min": float(y.min()), "max": float(y.max())}
        if len(y)
        else {}
    )


def load_split(prepared_dir: str | Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(prepared_dir) / f"{split}.parquet")
