"""Validating raw labelled data: every rule checked, every problem collected and raised once (`DataError`),
naming file, column, rows and the fix; then the rows projected onto the prepared schema
(id, text, [text_pair], label [, label_name], _file, _row). Rows with a problem are left out of the later
checks, which still run, so one error lists everything the data has."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DataConfig
from tasks.data.sources import DataError, RawData, _where
from tasks.data.splits import _label_sets, _too_small, apply_leakage

_STRUCTURED = (dict, list, tuple, set, np.ndarray, bytes)


@dataclass
class CheckedData:
    """Validated, normalised frames by split (None: a pool to be split) and what was found on the way."""

    frames: dict[str | None, pd.DataFrame]
    task: str
    labels: list[str]
    warnings: list[str] = field(default_factory=list)
    leakage: dict = field(default_factory=dict)


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
    """A class name: stripped text; a number in one canonical form (0, 0.0 and 0e0 are all "0"; 1.50 is "1.5")."""
    s = str(v).strip()
    if isinstance(v, (bool, np.bool_)) or not _is_number(s):
        return s
    d = Decimal(s)
    if d == d.to_integral_value():
        return "0" if d == 0 else format(d.to_integral_value(), "f")
    return format(d.normalize(), "f")


def _missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, _STRUCTURED):
        return False
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _usable_parts(raw: RawData, cfg: DataConfig, problems: list[str]) -> list[int]:
    """Indexes of the parts with rows and every configured column; the others' problems are appended."""
    usable = []
    for i, part in enumerate(raw.parts):
        df, f = part.frame, part.file
        cols = [c for c in df.columns if not c.startswith("_")]
        if not len(df):
            problems.append(f"{f}: no data rows (header only or empty); fix: add labelled rows or remove the file")
            continue
        ok = True
        for role, col in (
            ("text_column", cfg.text_column),
            ("text_pair_column", cfg.text_pair_column),
            ("label_column", cfg.label_column),
        ):
            if col is not None and col not in df.columns:
                hint = ""
                if len(cols) == 1 and any(d in cols[0] for d in ";\t|"):
                    hint = " (the header looks like one column: is the delimiter ';', tab or '|'? use a .tsv name or re-save as CSV)"
                problems.append(
                    f"{f}: no column '{col}' (columns: {', '.join(cols) or 'none'}){hint}; fix: set data.{role}=<column>"
                )
                ok = False
        if ok:
            usable.append(i)
    return usable


def _check_texts(df: pd.DataFrame, cfg: DataConfig, problems: list[str]) -> pd.Series:
    """Rows whose text (and pair) is usable; the others' problems are appended."""
    ok = pd.Series(True, index=df.index)
    for col in [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else []):
        values = df[col]
        missing = values.map(_missing)
        structured = values.map(lambda v: isinstance(v, _STRUCTURED))
        nul = values.map(lambda v: isinstance(v, str) and "\x00" in v)
        for w in _where(df, missing):
            problems.append(f"{w}, column '{col}': empty or missing text; fix: fill in the text or delete these rows")
        for w in _where(df, structured):
            kinds = "/".join(sorted({type(v).__name__ for v in values[structured]}))
            problems.append(
                f"{w}, column '{col}': holds structured values ({kinds}), not text; fix: store plain strings in this "
                f"column (e.g. join or flatten the values) or point data.{'text_pair' if col == cfg.text_pair_column else 'text'}_column "
                "at a text column"
            )
        for w in _where(df, nul):
            problems.append(
                f"{w}, column '{col}': contains NUL bytes (\\x00); fix: remove them (NULs usually mean a binary or "
                "UTF-16 file: re-save it as UTF-8 text)"
            )
        ok &= ~(missing | structured | nul)
    return ok


def _parse_labels(df: pd.DataFrame, task: str, cfg: DataConfig, problems: list[str]) -> pd.Series:
    """Each row's label: a float (regression), a class name, or a list of names (multi-label); None if unusable."""
    col = cfg.label_column
    values = df[col]
    if task == "regression":
        ok = values.map(lambda v: _is_number(str(v).strip()))
        for w in _where(df, ~ok):
            problems.append(
                f"{w}, column '{col}': not a number, but the task is regression; fix: use numeric targets or set data.task"
            )
        return pd.Series([float(str(v).strip()) if o else None for v, o in zip(values, ok, strict=True)], df.index)
    if task == "multi_label":
        delim = cfg.label_delimiter

        def to_list(v):
            if isinstance(v, (list, tuple, np.ndarray)):
                return [n for n in map(_scalar_name, v) if n]
            return [n for n in map(_scalar_name, str(v).split(delim)) if n] if delim else None

        names = pd.Series([to_list(v) for v in values], df.index, dtype=object)
        for w in _where(df, names.isna()):
            problems.append(
                f"{w}, column '{col}': not a list of labels; fix: use a JSON list or set data.label_delimiter"
            )
        return names
    kinds = values.map(lambda v: "number" if isinstance(v, (int, float, np.number)) or _is_number(str(v)) else "name")
    if kinds.nunique() > 1:
        nums = values[kinds == "number"].map(_scalar_name).unique()[:3]
        strs = values[kinds == "name"].map(_scalar_name).unique()[:3]
        where = _where(df, kinds == kinds.value_counts().index[-1])[0]
        problems.append(
            f"column '{col}' mixes numbers ({', '.join(nums)}) and names ({', '.join(strs)}), e.g. {where}; "
            "fix: use one kind of label throughout"
        )
    return values.map(_scalar_name)


def _label_list(df: pd.DataFrame, names: pd.Series, task: str, cfg: DataConfig, problems: list[str]) -> list[str]:
    """The label names in id order (none for regression); problems with them are appended."""
    if task == "regression":
        return []
    col = cfg.label_column
    if task == "multi_label":
        found = sorted({x for lst in names.dropna() for x in lst})
    else:
        found = sorted(names.dropna().unique())
        if found and all(_is_number(n) for n in found):
            found = sorted(found, key=float)
        if len(found) == 1:
            problems.append(
                f"column '{col}' has a single class ('{found[0]}') in {', '.join(sorted(df['_file'].unique()))}; "
                "fix: classification needs at least two classes (add examples of the others)"
            )
    if cfg.labels is None:
        return found
    labels = [_scalar_name(x) for x in cfg.labels]
    unknown = sorted(set(found) - set(labels))
    if unknown:
        problems.append(f"labels {unknown} in column '{col}' are not in data.labels; fix: add them to data.labels")
    return labels


def _label_warnings(df: pd.DataFrame, names: pd.Series, task: str, cfg: DataConfig) -> list[str]:
    """Labels that differ only in case (separate classes) or in surrounding whitespace (read as one class)."""
    if task == "regression":
        return []
    col, warnings = cfg.label_column, []
    if task == "single_label":
        raw = df[cfg.label_column].map(lambda v: v if isinstance(v, str) else None)
        spaced = {}
        for form in raw.dropna().unique():
            spaced.setdefault(form.strip(), set()).add(form)
        groups = [sorted(forms) for forms in spaced.values() if len(forms) > 1]
        if groups:
            shown = "; ".join(" and ".join(f"'{f}' ({_where(df, raw == f)[0]})" for f in g) for g in groups[:5])
            warnings.append(
                f"label values in column '{col}' differ only in surrounding whitespace: {shown}; they are read as "
                "one class (the stripped name)"
            )
        flat = names.dropna()
    else:
        flat = names.dropna().explode().dropna()
    cased: dict[str, set[str]] = {}
    for n in flat.unique():
        cased.setdefault(str(n).casefold(), set()).add(str(n))
    groups = [sorted(forms) for forms in cased.values() if len(forms) > 1]
    if groups:
        rows = (lambda n: names == n) if task == "single_label" else (lambda n: names.map(lambda v: n in (v or [])))
        shown = "; ".join(" and ".join(f"'{n}' ({_where(df, rows(n))[0]})" for n in g) for g in groups[:5])
        warnings.append(
            f"labels in column '{col}' differ only in case: {shown}; they are separate classes; fix: write them "
            "the same way if they mean the same class"
        )
    return warnings


def check_data(raw: RawData, cfg: DataConfig) -> CheckedData:
    """Check every rule, collect every problem (read errors included) and raise them once; return clean frames."""
    problems = list(raw.problems)
    usable = _usable_parts(raw, cfg, problems)
    if not usable:
        raise DataError(problems)
    everything = pd.concat([raw.parts[i].frame.assign(_part=i) for i in usable], ignore_index=True)
    text_ok = _check_texts(everything, cfg, problems)
    has_label = ~everything[cfg.label_column].map(_missing)
    for w in _where(everything, ~has_label):
        problems.append(f"{w}, column '{cfg.label_column}': missing label; fix: label these rows or delete them")
    labelled = everything[has_label]
    if not len(labelled):
        raise DataError(problems or ["no rows with a label; fix: fill the label column"])
    task = _detect_task(labelled[cfg.label_column], cfg)
    names = _parse_labels(labelled, task, cfg, problems)
    labels = _label_list(labelled, names, task, cfg, problems)
    warnings = _label_warnings(labelled, names, task, cfg)
    keep = (text_ok & has_label & names.reindex(everything.index).notna()).to_numpy()
    known = list(labels)
    if task != "regression":
        found = {x for v in names.dropna() for x in (v if task == "multi_label" else [v])}
        known += sorted(found - set(labels))
    clean = _normalize(everything[keep], cfg, task, known, names.reindex(everything.index)[keep])
    part_of = everything["_part"][keep].to_numpy()
    frames: dict[str | None, pd.DataFrame] = {}
    for i in usable:
        split = raw.parts[i].split
        frames[split] = pd.concat([frames.get(split), clean[part_of == i]], ignore_index=True)
    frames, leak_warnings, leakage = apply_leakage(frames, cfg, problems)
    if task != "regression" and ("train" in frames or None in frames):
        problems += _check_label_coverage(frames, task, known, cfg.label_column)
    if len(usable) == len(raw.parts) and not raw.problems:  # which splits to carve is known
        missing = [s for s in ("validation", "test") if s not in frames]
        pool = frames["train"] if "train" in frames else pd.concat(list(frames.values()), ignore_index=True)
        if missing:
            problems += _too_small(pool, task, known, len(missing) + 1, cfg.label_column)
    if problems:
        raise DataError(problems)
    return CheckedData(frames, task, labels, warnings + leak_warnings, leakage)


def validate(raw: RawData, cfg: DataConfig) -> tuple[dict[str | None, pd.DataFrame], str, list[str], list[str]]:
    """Check every rule, collect every problem; return normalized frames, task, labels, warnings."""
    checked = check_data(raw, cfg)
    return checked.frames, checked.task, checked.labels, checked.warnings


def _normalize(df: pd.DataFrame, cfg: DataConfig, task: str, labels: list[str], names: pd.Series) -> pd.DataFrame:
    """Project clean raw rows onto the prepared schema: id, text, [text_pair], label (+ label_name), _file, _row."""
    out = pd.DataFrame({"id": df["_file"].map(lambda f: Path(f).name) + ":" + df["_row"].astype(str)})
    out["text"] = df[cfg.text_column].astype(str)
    if cfg.text_pair_column:
        out["text_pair"] = df[cfg.text_pair_column].astype(str)
    if task == "regression":
        out["label"] = names.astype("float32")
    elif task == "multi_label":
        index = {n: i for i, n in enumerate(labels)}

        def hot(items):
            vec = [0.0] * len(labels)
            for x in items:
                vec[index[x]] = 1.0
            return vec

        out["label"] = names.map(hot)
    else:
        out["label_name"] = names
        out["label"] = names.map({n: i for i, n in enumerate(labels)}).astype("int64")
    out["_file"], out["_row"] = df["_file"].values, df["_row"].values
    return out.reset_index(drop=True)


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
