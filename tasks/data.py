"""Data stage: validate raw labelled data, split it (stratified, leak-free), weight classes, write
a content-addressed prepared dataset `<workspace>/datasets/<fingerprint>/`.

Plain functions; the Prefect task at the bottom is a thin wrapper. Every problem with the input is
collected and raised once (`DataError`), naming file, column, rows and the fix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DataConfig, RunConfig
from tasks.files import atomic_dir, read_json, sha256_json, write_json
from tasks.report import data_report
from tasks.sources import DataError, RawData, load_source, source_files, source_hashes

DATA_STAGE_VERSION = "1"
SPLITS = ("train", "validation", "test")
MIN_PER_CLASS = 3  # one text per split is the least a stratified three-way split can give a class


@dataclass
class PreparedData:
    """What the data stage hands to the next one: a path and a few facts (never the data)."""

    path: str
    fingerprint: str
    task: str
    labels: list[str]
    rows: dict[str, int]
    reused: bool


def _rows(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return f"row{'s' * (len(rows) != 1)} {shown}{more}"


def _where(df: pd.DataFrame, mask) -> list[str]:
    """Group masked rows by file: ['file.csv rows 3, 9', ...]."""
    out = []
    for file, sub in df[mask].groupby("_file", sort=False):
        out.append(f"{file} {_rows(sub['_row'].tolist())}")
    return out


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except (TypeError, ValueError):
        return False


def _detect_task(values: pd.Series, cfg: DataConfig) -> str:
    if cfg.task != "auto":
        return cfg.task
    if cfg.label_delimiter is not None or values.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
        return "multi_label"
    strs = values.map(lambda v: str(v).strip())
    if len(strs) and strs.map(_is_number).all() and (strs.map(float) % 1 != 0).any():
        return "regression"
    return "single_label"


def _scalar_name(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, (list, tuple, np.ndarray)):
        return False
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def validate(raw: RawData, cfg: DataConfig) -> tuple[dict[str | None, pd.DataFrame], str, list[str], list[str]]:
    """Check every rule, collect every problem; return normalized frames, task, labels, warnings."""
    problems: list[str] = []
    frames = raw.by_split()
    text_col, pair_col, label_col = cfg.text_column, cfg.text_pair_column, cfg.label_column

    for part in raw.parts:
        df, f = part.frame, part.file
        cols = [c for c in df.columns if not c.startswith("_")]
        if not len(df):
            problems.append(f"{f}: no data rows (header only or empty); fix: add labelled rows or remove the file")
            continue
        for role, col in (("text_column", text_col), ("text_pair_column", pair_col), ("label_column", label_col)):
            if col is not None and col not in df.columns:
                hint = ""
                if len(cols) == 1 and any(d in cols[0] for d in ";\t|"):
                    hint = " (the header looks like one column: is the delimiter ';', tab or '|'? use a .tsv name or re-save as CSV)"
                problems.append(
                    f"{f}: no column '{col}' (columns: {', '.join(cols) or 'none'}){hint}; fix: set data.{role}=<column>"
                )
    if problems:
        raise DataError(problems)

    everything = pd.concat(frames.values(), ignore_index=True)
    for col in [text_col] + ([pair_col] if pair_col else []):
        bad = everything[col].map(_missing)
        for w in _where(everything, bad):
            problems.append(f"{w}, column '{col}': empty or missing text; fix: fill in the text or delete these rows")
    bad = everything[label_col].map(_missing)
    for w in _where(everything, bad):
        problems.append(f"{w}, column '{label_col}': missing label; fix: label these rows or delete them")
    everything = everything[~bad]
    if not len(everything):
        raise DataError(problems or ["no rows with a label; fix: fill the label column"])

    task = _detect_task(everything[label_col], cfg)
    if task == "regression":
        num = everything[label_col].map(lambda v: _is_number(str(v).strip()))
        for w in _where(everything, ~num):
            problems.append(
                f"{w}, column '{label_col}': not a number, but the task is regression; fix: use numeric targets or set data.task"
            )
        labels: list[str] = []
    else:
        if task == "multi_label":
            delim = cfg.label_delimiter

            def to_list(v):
                if isinstance(v, (list, tuple, np.ndarray)):
                    return [_scalar_name(x) for x in v]
                return [s.strip() for s in str(v).split(delim)] if delim else None

            as_lists = everything[label_col].map(to_list)
            for w in _where(everything, as_lists.isna()):
                problems.append(
                    f"{w}, column '{label_col}': not a list of labels; fix: use a JSON list or set data.label_delimiter"
                )
            names = sorted({x for lst in as_lists.dropna() for x in lst if x})
        else:
            kinds = everything[label_col].map(lambda v: "number" if isinstance(v, (int, float, np.number)) or _is_number(str(v)) else "name")
            if kinds.nunique() > 1:
                nums = everything.loc[kinds == "number", label_col].map(_scalar_name).unique()[:3]
                strs = everything.loc[kinds == "name", label_col].map(_scalar_name).unique()[:3]
                where = _where(everything, kinds == kinds.value_counts().index[-1])[0]
                problems.append(
                    f"column '{label_col}' mixes numbers ({', '.join(nums)}) and names ({', '.join(strs)}), e.g. {where}; "
                    "fix: use one kind of label throughout"
                )
            names = sorted(everything[label_col].map(_scalar_name).unique())
            if all(_is_number(n) for n in names):
                names = sorted(names, key=float)
            if len(names) == 1:
                problems.append(
                    f"column '{label_col}' has a single class ('{names[0]}') in {', '.join(sorted(everything['_file'].unique()))}; "
                    "fix: classification needs at least two classes (add examples of the others)"
                )
        if cfg.labels is not None:
            unknown = sorted(set(names) - set(cfg.labels))
            if unknown:
                problems.append(f"labels {unknown} in column '{label_col}' are not in data.labels; fix: add them to data.labels")
            labels = list(cfg.labels)
        else:
            labels = names
    if problems:
        raise DataError(problems)

    out = {k: _normalize(df, cfg, task, labels) for k, df in frames.items()}
    if task != "regression":
        problems += _check_label_coverage(out, task, labels, label_col)
    if problems:
        raise DataError(problems)
    return out, task, labels, []


def _normalize(df: pd.DataFrame, cfg: DataConfig, task: str, labels: list[str]) -> pd.DataFrame:
    """Project a raw frame onto the prepared schema: id, text, [text_pair], label (+ label_name), _file, _row."""
    out = pd.DataFrame({"id": df["_file"].map(lambda f: Path(f).name) + ":" + df["_row"].astype(str)})
    out["text"] = df[cfg.text_column].astype(str)
    if cfg.text_pair_column:
        out["text_pair"] = df[cfg.text_pair_column].astype(str)
    raw = df[cfg.label_column]
    if task == "regression":
        out["label"] = raw.map(lambda v: float(str(v).strip())).astype("float32")
    elif task == "multi_label":
        index = {n: i for i, n in enumerate(labels)}
        delim = cfg.label_delimiter

        def hot(v):
            items = [_scalar_name(x) for x in v] if isinstance(v, (list, tuple, np.ndarray)) else str(v).split(delim)
            vec = [0.0] * len(labels)
            for x in items:
                if x.strip():
                    vec[index[x.strip()]] = 1.0
            return vec

        out["label"] = raw.map(hot)
    else:
        out["label_name"] = raw.map(_scalar_name)
        out["label"] = out["label_name"].map({n: i for i, n in enumerate(labels)}).astype("int64")
    out["_file"], out["_row"] = df["_file"].values, df["_row"].values
    return out


def _label_sets(df: pd.DataFrame, task: str, labels: list[str]) -> pd.Series:
    if task == "multi_label":
        return df["label"].map(lambda v: {labels[i] for i, x in enumerate(v) if x})
    return df["label_name"].map(lambda n: {n})


def _check_label_coverage(frames: dict, task: str, labels: list[str], label_col: str) -> list[str]:
    problems = []
    train = frames.get("train", frames.get(None))
    seen = set().union(*_label_sets(train, task, labels)) if len(train) else set()
    for split in ("validation", "test"):
        if split not in frames:
            continue
        df = frames[split]
        sets = _label_sets(df, task, labels)
        for name in sorted(set().union(*sets) - seen):
            mask = sets.map(lambda s: name in s)
            problems.append(
                f"{_where(df, mask)[0]}, column '{label_col}': label '{name}' occurs in {split} but never in train; "
                "fix: add training examples of it or remove these rows"
            )
    return problems


def _strat_keys(df: pd.DataFrame, task: str, labels: list[str], cfg: DataConfig) -> pd.Series:
    """A stratification key per row: the class; the label combination (rare ones folded); a target bin."""
    if task == "single_label":
        return df["label"].astype(str)
    if task == "regression":
        bins = pd.qcut(df["label"].rank(method="first"), q=min(cfg.split.regression_bins, len(df)), labels=False)
        return bins.astype(str)
    combo = df["label"].map(lambda v: ",".join(str(i) for i, x in enumerate(v) if x) or "none")
    counts = combo.value_counts()
    label_freq = np.sum(np.stack(df["label"].to_numpy()), axis=0)

    def fold(c: str) -> str:
        if counts[c] >= MIN_PER_CLASS or c == "none":
            return c
        ids = [int(i) for i in c.split(",")]
        return "rare:" + str(min(ids, key=lambda i: label_freq[i]))

    keys = combo.map(fold)
    small = keys.value_counts()
    return keys.map(lambda k: k if small[k] >= MIN_PER_CLASS else "rare")


def _group_keys(df: pd.DataFrame) -> pd.Series:
    return df["text"] + ("\x00" + df["text_pair"] if "text_pair" in df else "")


def _split_groups(df: pd.DataFrame, keys: pd.Series, sizes: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Stratified split of `df` into the named shares, keeping identical texts in one split."""
    from sklearn.model_selection import train_test_split

    groups = _group_keys(df)
    first = ~groups.duplicated()
    g_index = np.flatnonzero(first.to_numpy())
    g_keys = keys[first].to_numpy()
    counts = pd.Series(g_keys).value_counts()
    g_keys = np.where(pd.Series(g_keys).map(counts).to_numpy() >= 2, g_keys, "__rare__")
    assign: dict[str, np.ndarray] = {}
    remaining, rem_keys = g_index, g_keys
    for name, share in sizes.items():
        strat = rem_keys if pd.Series(rem_keys).value_counts().min() >= 2 else None
        take = max(1, int(round(share * len(g_index))))  # a count, not a float share: no rounding drift
        if strat is not None:
            take = max(take, pd.Series(strat).nunique())
        _, took = train_test_split(remaining, test_size=min(take, len(remaining) - 1), random_state=seed, stratify=strat)
        mask = np.isin(remaining, took)
        assign[name], remaining, rem_keys = took, remaining[~mask], rem_keys[~mask]
    assign["train"] = remaining
    group_to_split = {}
    for name, idx in assign.items():
        for g in groups.iloc[idx]:
            group_to_split[g] = name
    split_of = groups.map(group_to_split)
    return {name: df[split_of == name].reset_index(drop=True) for name in assign}


def _too_small(df: pd.DataFrame, task: str, labels: list[str], need: int, label_col: str) -> list[str]:
    if task == "regression":
        return []
    sets = _label_sets(df, task, labels)
    groups = _group_keys(df)
    problems = []
    for name in labels:
        mask = sets.map(lambda s: name in s)
        n = groups[mask].nunique()
        if 0 < n < need:
            problems.append(
                f"{_where(df, mask)[0]}, column '{label_col}': class '{name}' has {n} distinct text{'s' * (n != 1)}; "
                f"a stratified train/validation/test split needs at least {need}; "
                "fix: add examples, merge it into another class, or remove its rows"
            )
    return problems


def make_splits(frames: dict, task: str, labels: list[str], cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Keep the splits the source provides; carve the missing ones out of train (or the pool)."""
    notes = []
    pool = frames.get("train") if "train" in frames else pd.concat([frames[k] for k in frames], ignore_index=True)
    if cfg.max_rows and len(pool) > cfg.max_rows:
        keys = _strat_keys(pool, task, labels, cfg)
        pool = _split_groups(pool, keys, {"drop": 1 - cfg.max_rows / len(pool)}, cfg.split.seed)["train"]
        notes.append(f"train pool subsampled to {len(pool)} rows (data.max_rows={cfg.max_rows}, seed {cfg.split.seed})")
    missing = [s for s in ("validation", "test") if s not in frames]
    shares = {s: getattr(cfg.split, s) for s in missing}
    if missing:
        problems = _too_small(pool, task, labels, len(missing) + 1, cfg.label_column)
        if problems:
            raise DataError(problems)
        out = _split_groups(pool, _strat_keys(pool, task, labels, cfg), shares, cfg.split.seed)
        notes.append(f"{', '.join(missing)} carved out of {'train' if 'train' in frames else 'the data'} "
                     f"(stratified, seed {cfg.split.seed}, identical texts kept in one split)")
    else:
        out = {"train": pool}
    for s in ("validation", "test"):
        if s in frames:
            out[s] = frames[s].reset_index(drop=True)
    return {s: out[s] for s in SPLITS}, notes


def class_weights(train: pd.DataFrame, task: str, labels: list[str], cfg: DataConfig) -> dict[str, float]:
    """Weights from the train split only: none, balanced n/(K*n_k), or effective number (Cui et al. 2019)."""
    if task == "regression":
        return {}
    scheme, beta, n = cfg.class_weighting, cfg.effective_number_beta, len(train)
    if task == "multi_label":
        pos = np.sum(np.stack(train["label"].to_numpy()), axis=0) if n else np.zeros(len(labels))
        out = {}
        for name, p in zip(labels, pos):
            p, neg = int(p), int(n - p)
            if scheme == "none" or p == 0:
                w = 1.0
            elif scheme == "balanced":
                w = neg / p
            else:
                w = (1 - beta**neg) / (1 - beta**p)
            out[name] = float(w)
        return out
    counts = train["label"].value_counts().reindex(range(len(labels)), fill_value=0).to_numpy()
    k = int((counts > 0).sum())
    if scheme == "none":
        w = np.ones(len(labels))
    elif scheme == "balanced":
        w = np.where(counts > 0, n / (k * np.maximum(counts, 1)), 0.0)
    else:
        eff = np.where(counts > 0, (1 - beta) / (1 - beta ** np.maximum(counts, 1)), 0.0)
        w = eff * k / eff.sum()
    return {name: float(x) for name, x in zip(labels, w)}


def label_counts(df: pd.DataFrame, task: str, labels: list[str]) -> dict[str, int]:
    if task == "regression":
        return {}
    if task == "multi_label":
        pos = np.sum(np.stack(df["label"].to_numpy()), axis=0) if len(df) else np.zeros(len(labels))
        return {n: int(c) for n, c in zip(labels, pos)}
    vc = df["label"].value_counts()
    return {n: int(vc.get(i, 0)) for i, n in enumerate(labels)}


def data_warnings(raw_frames: dict, splits: dict, task: str, labels: list[str], cfg: DataConfig) -> list[str]:
    """Problems worth a look that do not stop the run."""
    warnings = []
    for name, df in raw_frames.items():
        where = name or "the data"
        lab = df["label"].map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
        g = _group_keys(df)
        dup = pd.DataFrame({"g": g, "l": lab}).duplicated()
        if dup.any():
            warnings.append(f"{int(dup.sum())} exact duplicate row(s) in {where} (e.g. {_where(df, dup)[0]}); they are kept together in one split")
        conflict = pd.DataFrame({"g": g, "l": lab}).groupby("g")["l"].transform("nunique") > 1
        if conflict.any():
            warnings.append(f"{int(g[conflict].nunique())} text(s) in {where} carry different labels (e.g. {_where(df, conflict)[0]})")
    if len(raw_frames) > 1:
        keys = {s: set(_group_keys(df)) for s, df in raw_frames.items()}
        names = list(keys)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = keys[a] & keys[b]
                if both:
                    warnings.append(f"leakage: {len(both)} text(s) occur in both {a} and {b} as provided by the source")
    if task != "regression":
        counts = label_counts(splits["train"], task, labels)
        total = len(splits["train"])
        rare = [f"'{n}' ({c / total:.2%})" for n, c in counts.items() if total and c / total < 0.01]
        if rare and task == "single_label":
            warnings.append(f"extreme imbalance: minority class(es) {', '.join(rare)} of train; class weights matter here")
        elif rare:
            warnings.append(f"{len(rare)} label(s) on under 1 % of train rows: {', '.join(rare[:6])}")
    all_rows = pd.concat(list(splits.values()), ignore_index=True)
    words = all_rows["text"].str.split().str.len() + (all_rows["text_pair"].str.split().str.len() if "text_pair" in all_rows else 0)
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


def dataset_dir(cfg: RunConfig) -> Path:
    """Where the prepared dataset for this config lives (or will): cheap, no rows read."""
    return cfg.workspace_path() / "datasets" / dataset_fingerprint(cfg.data)


def prepare_dataset(cfg: RunConfig) -> PreparedData:
    """Load, validate, split and weight; write `<workspace>/datasets/<fingerprint>/` once."""
    t0 = time.perf_counter()
    dcfg = cfg.data
    hashes = source_hashes(dcfg.source)
    fp = dataset_fingerprint(dcfg, hashes)
    final = cfg.workspace_path() / "datasets" / fp
    if (final / "manifest.json").exists():
        m = read_json(final / "manifest.json")
        return PreparedData(str(final), fp, m["task"], m["labels"], {s: v["rows"] for s, v in m["splits"].items()}, True)
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
    return {"mean": float(y.mean()), "std": float(y.std(ddof=0)), "min": float(y.min()), "max": float(y.max())} if len(y) else {}


def load_split(prepared_dir: str | Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(prepared_dir) / f"{split}.parquet")


def _prefect_task():
    from prefect import task

    return task(name="prepare-data", description="Load, validate, split and weight the labelled data.")(prepare_dataset)
