"""Stratified, leak-free train/validation/test splits and class weights from the train split; leakage between
the splits a source provides (named row by row, and handled as `data.on_leakage` says)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DataConfig
from tasks.data.sources import DataError, _where

SPLITS = ("train", "validation", "test")
MIN_PER_CLASS = 3  # one text per split is the least a stratified three-way split can give a class
LEAK_PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"))
LEAKS_LISTED = 10


def _label_sets(df: pd.DataFrame, task: str, labels: list[str]) -> pd.Series:
    if task == "multi_label":
        return df["label"].map(lambda v: {labels[i] for i, x in enumerate(v) if x})
    return df["label_name"].map(lambda n: {n})


def _strat_keys(df: pd.DataFrame, task: str, labels: list[str], cfg: DataConfig) -> pd.Series:
    """A stratification key per row: the class; the label combination (rare ones folded); a target bin; one key
    for instruction data (a plain seeded split)."""
    if task == "sft":
        return pd.Series("all", index=df.index)
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
        _, took = train_test_split(
            remaining, test_size=min(take, len(remaining) - 1), random_state=seed, stratify=strat
        )
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
    """Classes with too few distinct texts to give each carved split one."""
    if task in ("regression", "sft") or not len(df):
        return []
    sets = _label_sets(df, task, labels)
    groups = _group_keys(df)
    problems = []
    for name in labels:
        mask = sets.map(lambda s, name=name: name in s)
        n = groups[mask].nunique()
        if 0 < n < need:
            problems.append(
                f"{_where(df, mask)[0]}, column '{label_col}': class '{name}' has {n} distinct text{'s' * (n != 1)}; "
                f"a stratified train/validation/test split needs at least {need}; "
                "fix: add examples, merge it into another class, or remove its rows"
            )
    return problems


def make_splits(
    frames: dict, task: str, labels: list[str], cfg: DataConfig
) -> tuple[dict[str, pd.DataFrame], list[str]]:
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
        notes.append(
            f"{', '.join(missing)} carved out of {'train' if 'train' in frames else 'the data'} "
            f"(stratified, seed {cfg.split.seed}, identical texts kept in one split)"
        )
    else:
        out = {"train": pool}
    for s in ("validation", "test"):
        if s in frames:
            out[s] = frames[s].reset_index(drop=True)
    return {s: out[s] for s in SPLITS}, notes


def class_weights(train: pd.DataFrame, task: str, labels: list[str], cfg: DataConfig) -> dict[str, float]:
    """Weights from the train split only: none, balanced n/(K*n_k), or effective number (Cui et al. 2019)."""
    if task in ("regression", "sft"):
        return {}
    scheme, beta, n = cfg.class_weighting, cfg.effective_number_beta, len(train)
    if task == "multi_label":
        pos = np.sum(np.stack(train["label"].to_numpy()), axis=0) if n else np.zeros(len(labels))
        out = {}
        for name, p in zip(labels, pos, strict=False):
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
    return {name: float(x) for name, x in zip(labels, w, strict=False)}


def label_counts(df: pd.DataFrame, task: str, labels: list[str]) -> dict[str, int]:
    if task in ("regression", "sft"):
        return {}
    if task == "multi_label":
        pos = np.sum(np.stack(df["label"].to_numpy()), axis=0) if len(df) else np.zeros(len(labels))
        return {n: int(c) for n, c in zip(labels, pos, strict=False)}
    vc = df["label"].value_counts()
    return {n: int(vc.get(i, 0)) for i, n in enumerate(labels)}


def _leak_keys(df: pd.DataFrame) -> pd.Series:
    """The text (and pair) lowercased with whitespace collapsed and stripped: near-duplicates share a key."""

    def norm(s) -> str:
        return " ".join(str(s).split()).casefold()

    return df["text"].map(norm) + ("\x00" + df["text_pair"].map(norm) if "text_pair" in df else "")


def _excerpt(text: str, n: int = 40) -> str:
    s = " ".join(str(text).split())
    return repr(s if len(s) <= n else s[:n] + "…")


def _leaks(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Rows of `a` whose text is in `b` (exactly or normalised): a mask over `a` and one line per row."""
    ka, first = _leak_keys(a), {}
    for key, file, row in zip(_leak_keys(b), b["_file"], b["_row"], strict=True):
        first.setdefault(key, f"{Path(file).name} row {row}")
    mask = ka.isin(list(first))
    lines = [
        f"{Path(file).name} row {row} = {first[key]} {_excerpt(text)}"
        for key, file, row, text in zip(ka[mask], a["_file"][mask], a["_row"][mask], a["text"][mask], strict=True)
    ]
    return mask, lines


def _listing(lines: list[str]) -> str:
    more = f"; +{len(lines) - LEAKS_LISTED} more" if len(lines) > LEAKS_LISTED else ""
    return "; ".join(lines[:LEAKS_LISTED]) + more


def apply_leakage(frames: dict, cfg: DataConfig, problems: list[str]) -> tuple[dict, list[str], dict]:
    """Texts shared by the splits a source provides, named row by row. Train rows also in validation or test are
    dropped from train (data.on_leakage=drop), kept with a warning (warn) or a problem (error); validation rows
    also in test are a warning. Returns the frames, the warnings and a record for the manifest."""
    policy, warnings, drop = cfg.on_leakage, [], None
    record: dict = {"policy": policy, "pairs": {}, "dropped_train_rows": 0}
    for a, b in LEAK_PAIRS:
        if a not in frames or b not in frames:
            continue
        mask, lines = _leaks(frames[a], frames[b])
        n = record["pairs"][f"{a}/{b}"] = len(lines)
        if not n:
            continue
        rows = f"{n} {a} row{'s' * (n != 1)}"
        how = "exactly or after normalising case and whitespace"
        if a != "train":
            warnings.append(
                f"leakage: {rows} also in {b} ({how}): {_listing(lines)}; kept (validation is not trained on, but "
                "it picks the best epoch); fix: remove them from one of the two files"
            )
        elif policy == "error":
            problems.append(
                f"leakage: {rows} also in {b} ({how}): {_listing(lines)}; fix: remove these rows from the training "
                "data, or set data.on_leakage=drop (drops them from train) or data.on_leakage=warn (keeps them)"
            )
        elif policy == "warn":
            warnings.append(
                f"leakage: {rows} also in {b} ({how}): {_listing(lines)}; kept (data.on_leakage=warn), so {b} "
                "scores overstate the model; fix: remove them from the training data or set data.on_leakage=drop"
            )
        else:
            warnings.append(
                f"leakage: dropped {rows} whose text is also in {b} ({how}; data.on_leakage=drop): {_listing(lines)}"
            )
            drop = mask if drop is None else drop | mask
    if drop is not None:
        frames = {**frames, "train": frames["train"][~drop].reset_index(drop=True)}
        record["dropped_train_rows"] = int(drop.sum())
    return frames, warnings, record
