"""Baselines scored on the same held-out test split as the fine-tuned model (scikit-learn only, no torch).

- majority: the train split's most frequent class (single-label; scores = train class shares), each label's
  train majority value (multi-label; scores = train label shares, threshold 0.5), or the train mean (regression).
- tfidf: TF-IDF word uni+bigrams with LogisticRegression (single-label), one-vs-rest LogisticRegression
  (multi-label, per-label thresholds tuned on validation like the model's) or Ridge (regression),
  fit on train; the regularization strength is picked on validation from a small grid.

A fine-tuned transformer that cannot beat TF-IDF is not worth shipping: the evaluation report says so loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.evaluation.metrics import compute_metrics, higher_is_better, metric_details, primary_metric, tune_thresholds
from tasks.workspace import read_facts

LARGE_TRAIN = 20_000  # above this many train rows the C/alpha grid shrinks to one value (fit time)
C_GRID = (0.5, 2.0, 8.0)
ALPHA_GRID = (0.3, 1.0, 3.0)


@dataclass
class BaselineScores:
    """One baseline's outputs: test scores (and validation scores), its settings and fit time."""

    name: str
    test: np.ndarray
    validation: np.ndarray | None = None
    thresholds: np.ndarray | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0


def texts_of(df: pd.DataFrame) -> list[str]:
    """The text a bag-of-words model sees: text, plus ' || ' + text_pair for sentence pairs."""
    text = df["text"].astype(str)
    if "text_pair" in df:
        text = text + " || " + df["text_pair"].astype(str)
    return text.tolist()


def _multi_hot(df: pd.DataFrame, k: int) -> np.ndarray:
    if not len(df):
        return np.zeros((0, k), dtype=int)
    return (np.stack([np.asarray(v, dtype=np.float64) for v in df["label"]]) >= 0.5).astype(int)


def majority_scores(train: pd.DataFrame, n: int, task: str, num_labels: int) -> np.ndarray:
    """Constant scores for `n` texts from the train split: class shares, label shares, or the mean."""
    if task == "regression":
        return np.full(n, float(train["label"].astype(float).mean()))
    if task == "multi_label":
        shares = _multi_hot(train, num_labels).mean(axis=0)
    else:
        counts = np.bincount(train["label"].astype(int), minlength=num_labels).astype(np.float64)
        shares = counts / counts.sum()
        # argmax must land on the majority class even with ties: break them toward the first class
        shares = np.where(np.arange(num_labels) == shares.argmax(), shares + 1e-9, shares)
    return np.tile(shares, (n, 1))


def _vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000, strip_accents="unicode", lowercase=True
    )


def _estimator(task: str, strength: float, balanced: bool, k: int):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier

    if task == "regression":
        return Ridge(alpha=strength)
    # liblinear (one binary problem per class) measured 5-50x faster than lbfgs on sparse TF-IDF on 2 cores:
    # GoEmotions 28 labels 1.3-9 s vs 45-70 s per fit; multinomial lbfgs on AG News (9k rows) ~17 s per fit
    lr = LogisticRegression(
        C=strength, max_iter=2000, solver="liblinear", class_weight="balanced" if balanced else None
    )
    return OneVsRestClassifier(lr) if task == "multi_label" or k > 2 else lr


def _targets(df: pd.DataFrame, task: str, k: int) -> np.ndarray:
    if task == "multi_label":
        return _multi_hot(df, k)
    if task == "regression":
        return df["label"].astype(np.float64).to_numpy()
    return df["label"].astype(int).to_numpy()


def _predict(est, x, task: str, k: int) -> np.ndarray:
    if task == "regression":
        return est.predict(x).astype(np.float64)
    proba = est.predict_proba(x)
    if task == "single_label" and proba.shape[1] != k:  # a class absent from train: give it zero probability
        full = np.zeros((proba.shape[0], k))
        full[:, est.classes_.astype(int)] = proba
        return full
    return proba


def tfidf_scores(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    test: pd.DataFrame,
    task: str,
    labels: list[str],
    balanced: bool = True,
) -> BaselineScores:
    """Fit TF-IDF + linear model on train, choose C/alpha on validation, score validation and test."""
    t0 = time.perf_counter()
    k = len(labels)
    vec = _vectorizer()
    x_train = vec.fit_transform(texts_of(train))
    x_val, x_test = vec.transform(texts_of(validation)), vec.transform(texts_of(test))
    y_train, y_val = _targets(train, task, k), _targets(validation, task, k)
    grid = ALPHA_GRID if task == "regression" else C_GRID
    if len(train) > LARGE_TRAIN or not len(validation):
        grid = grid[1:2]
    metric = primary_metric(task, None, k)
    best = None
    for strength in grid:
        est = _estimator(task, strength, balanced and task != "regression", k).fit(x_train, y_train)
        val = _predict(est, x_val, task, k)
        thresholds = tune_thresholds(y_val, val) if task == "multi_label" and len(validation) else None
        score = compute_metrics(task, labels, y_val, val, thresholds).get(metric, -np.inf) if len(validation) else 0.0
        if not higher_is_better(metric):
            score = -score
        if best is None or score > best[0]:
            best = (score, strength, est, val, thresholds)
    _, strength, est, val, thresholds = best
    settings = {
        "vectorizer": "tfidf word 1-2 grams, sublinear tf",
        "features": len(vec.vocabulary_),
        "model": {
            "single_label": "LogisticRegression" if k == 2 else "OneVsRest(LogisticRegression)",
            "multi_label": "OneVsRest(LogisticRegression)",
            "regression": "Ridge",
        }[task],
        ("alpha" if task == "regression" else "C"): strength,
        "grid": list(grid),
        "selected_on": f"validation {metric}",
        "class_weight": "balanced" if balanced and task != "regression" else None,
    }
    return BaselineScores("tfidf", _predict(est, x_test, task, k), val, thresholds, settings, time.perf_counter() - t0)


def baseline_scores(
    prepared_dir: str | Path, names: tuple[str, ...] = ("majority", "tfidf")
) -> dict[str, BaselineScores]:
    """Scores of each named baseline on the prepared dataset's test split (fit on its train split)."""
    from tasks.data.sources import load_split

    manifest = read_facts(Path(prepared_dir) / "manifest.json", "prepared dataset")
    task, labels = manifest["task"], manifest["labels"]
    train, val, test = (load_split(prepared_dir, s) for s in ("train", "validation", "test"))
    out: dict[str, BaselineScores] = {}
    if "majority" in names:
        t0 = time.perf_counter()
        rule = {
            "regression": "train mean",
            "multi_label": "train label shares, threshold 0.5",
            "single_label": "most frequent train class",
        }[task]
        out["majority"] = BaselineScores(
            "majority",
            majority_scores(train, len(test), task, len(labels)),
            majority_scores(train, len(val), task, len(labels)),
            None,
            {"rule": rule},
            time.perf_counter() - t0,
        )
    if "tfidf" in names:
        balanced = manifest.get("class_weighting", "none") != "none"
        out["tfidf"] = tfidf_scores(train, val, test, task, labels, balanced)
    return out


def score_baselines(prepared_dir: str | Path) -> dict[str, dict]:
    """Test metrics of every baseline: {name: {"metrics": {...}, "per_class": {...}, "settings": {...}, "seconds": s}}
    (per_class for classification tasks: the per-class precision/recall/F1 a report compares, e.g. spam F1)."""
    manifest = read_facts(Path(prepared_dir) / "manifest.json", "prepared dataset")
    task, labels = manifest["task"], manifest["labels"]
    from tasks.data.sources import load_split

    y_test = load_split(prepared_dir, "test")["label"].tolist()
    result = {}
    for name, b in baseline_scores(prepared_dir).items():
        details = metric_details(task, labels, y_test, b.test, b.thresholds)
        metrics = {k: float(v) for k, v in details["metrics"].items() if v is not None}
        result[name] = {
            "metrics": metrics,
            "per_class": details.get("per_class", {}),
            "settings": b.settings,
            "seconds": round(b.seconds, 3),
        }
    return result
