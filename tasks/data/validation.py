"""Validating raw labelled data: every rule checked, every problem collected and raised once (`DataError`),
naming file, column, rows and the fix; then the rows projected onto the prepared schema
(id, text, [text_pair], label [, label_name], _file, _row)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DataConfig
from tasks.data.sources import DataError, RawData


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


def _check_labels(everything: pd.DataFrame, task: str, cfg: DataConfig, problems: list[str]) -> list[str]:
    """The label names (none for regression); problems with the label column are appended to `problems`."""
    label_col = cfg.label_column
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
            kinds = everything[label_col].map(
                lambda v: "number" if isinstance(v, (int, float, np.number)) or _is_number(str(v)) else "name"
            )
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
                problems.append(
                    f"labels {unknown} in column '{label_col}' are not in data.labels; fix: add them to data.labels"
                )
            labels = list(cfg.labels)
        else:
            labels = names
    return labels


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
    labels = _check_labels(everything, task, cfg, problems)
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
            mask = sets.map(lambda s, name=name: name in s)
            problems.append(
                f"{_where(df, mask)[0]}, column '{label_col}': label '{name}' occurs in {split} but never in train; "
                "fix: add training examples of it or remove these rows"
            )
    return problems
