"""The project's metrics: local `evaluate` modules (classification/, regression/) loaded by path, plus the
pure helpers every stage uses (training for validation metrics, evaluation, baselines, registry).

`compute_metrics(task, labels, y_true, scores, thresholds=None)` turns model outputs (probabilities for
classification, values for regression) into flat metric floats; `metric_details` adds per-class
figures and the confusion matrix. Hub metrics cannot load offline, so the project's own modules are
loaded with `evaluate.load(<local folder>)`; `load_extra_metric` loads user-named ones and explains failures.
Loading an `evaluate` module runs its code: only the shipped ones load unless evaluation.trust_metric_code.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from tasks.evaluation.keys import MIN_POSITIVES_PER_LABEL, THRESHOLD_GRID

METRICS_DIR = Path(__file__).resolve().parent
SHIPPED_METRICS = (
    "classification",
    "regression",
    "generation",
)  # the modules in METRICS_DIR: always allowed as extra metrics
TASKS = ("single_label", "multi_label", "regression")
DEFAULT_PRIMARY = {"single_label": "f1_macro", "multi_label": "f1_micro", "regression": "r2"}
LOWER_IS_BETTER = frozenset(
    {"mse", "rmse", "mae", "hamming_loss", "loss", "val_loss", "response_loss", "perplexity", "forgetting_ratio"}
)

_SINGLE = (
    "accuracy",
    "f1_macro",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
    "precision_weighted",
    "recall_weighted",
    "mcc",
)
_MULTI = (
    "f1_micro",
    "f1_macro",
    "f1_weighted",
    "precision_micro",
    "recall_micro",
    "precision_macro",
    "recall_macro",
    "precision_weighted",
    "recall_weighted",
    "subset_accuracy",
    "hamming_loss",
)
_REGRESSION = ("mse", "rmse", "mae", "r2", "pearson", "spearman")


class MetricError(ValueError):
    """A metric cannot be computed or loaded; the message says why and what to do."""


def metric_names(task: str, num_labels: int = 0) -> list[str]:
    """The flat metric names `compute_metrics` returns for a task (binary single-label adds roc_auc, pr_auc)."""
    if task == "single_label":
        return list(_SINGLE) + (["roc_auc", "pr_auc"] if num_labels == 2 else [])
    if task == "multi_label":
        return list(_MULTI) + [f"{m}_at_0.5" for m in ("f1_micro", "f1_macro")]
    if task == "regression":
        return list(_REGRESSION)
    raise MetricError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def higher_is_better(name: str) -> bool:
    """Direction of a metric: False for errors and losses (mse, mae, rmse, hamming_loss, loss)."""
    return name.removesuffix("_at_0.5") not in LOWER_IS_BETTER


def is_better(a: float, b: float, name: str) -> bool:
    """Is value `a` strictly better than `b` for metric `name`?"""
    return a > b if higher_is_better(name) else a < b


def primary_metric(task: str, configured: str | None = None, num_labels: int = 0) -> str:
    """evaluation.primary_metric, checked against the task's metrics, or the task default."""
    if configured is None:
        return DEFAULT_PRIMARY[task]
    names = metric_names(task, num_labels)
    if configured not in names:
        raise MetricError(
            f"evaluation.primary_metric: '{configured}' is not computed for task {task}"
            f"{' with ' + str(num_labels) + ' labels' if task == 'single_label' else ''}; choose one of: {', '.join(names)}"
        )
    return configured


@cache
def load_metric(kind: str, config_name: str | None = None):
    """The project's own `evaluate` module `kind` (classification | regression), loaded by local path."""
    import evaluate

    path = METRICS_DIR / kind
    if not (path / f"{kind}.py").is_file():
        raise MetricError(f"no metric module {path / (kind + '.py')}")
    return evaluate.load(str(path), config_name, keep_in_memory=True)


def load_extra_metric(name: str, trust_code: bool = False):
    """A user-named metric: `name` or `name:config`. The shipped modules (SHIPPED_METRICS) load by name from
    METRICS_DIR; any other name (a Hub id, a folder, a module `evaluate` looks up) runs that module's Python code,
    so it loads only with `trust_code` (evaluation.trust_metric_code). Raises MetricError explaining why not."""
    import evaluate

    base, _, config = name.partition(":")
    if base in SHIPPED_METRICS:  # by path: a folder of that name in the current directory is never picked up
        return evaluate.load(str(METRICS_DIR / base), config or None, keep_in_memory=True)
    if not trust_code:
        raise MetricError(
            f"extra metric '{name}' is not one of the shipped metric modules ({', '.join(SHIPPED_METRICS)}); loading "
            "it would run its Python code (a local folder's or a Hub module's), and evaluation.trust_metric_code is "
            "false; fix: use a shipped module, or review that code and set evaluation.trust_metric_code: true"
        )
    try:
        return evaluate.load(base, config or None, keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one clear message
        hint = (
            "Hub metrics need a network connection (HF_HUB_OFFLINE is set)"
            if _offline()
            else "Hub metrics need a network connection to huggingface.co"
        )
        raise MetricError(
            f"extra metric '{name}' could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            f"{hint}; a local folder with <name>/<name>.py also works (with evaluation.trust_metric_code)"
        ) from exc


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def predictions_from_scores(task: str, scores: np.ndarray, thresholds=None) -> np.ndarray:
    """argmax (single-label), scores >= per-label threshold (multi-label; default 0.5), values (regression)."""
    scores = np.asarray(scores, dtype=np.float64)
    if task == "single_label":
        return scores.argmax(axis=1) if len(scores) else np.zeros(0, dtype=int)
    if task == "multi_label":
        t = np.full(scores.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        return (scores >= t).astype(int)
    return scores.reshape(-1)


def _check(task: str, labels: list[str], y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise MetricError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    y = np.asarray(list(y_true) if not isinstance(y_true, np.ndarray) else y_true)
    s = np.asarray(scores, dtype=np.float64)
    if len(y) != len(s):
        raise MetricError(f"{len(y)} true labels but {len(s)} score rows")
    if task == "regression":
        return y.astype(np.float64).reshape(-1), s.reshape(-1)
    if s.ndim != 2 or s.shape[1] != len(labels):
        raise MetricError(f"scores must have shape (n, {len(labels)}) for {len(labels)} labels, got {s.shape}")
    if task == "multi_label":
        y = np.stack([np.asarray(v, dtype=np.float64) for v in y]) if len(y) else np.zeros((0, len(labels)))
        return (y >= 0.5).astype(int), s
    return y.astype(np.int64), s


def metric_details(task: str, labels: list[str], y_true, scores, thresholds=None) -> dict:
    """{"metrics": flat floats (None where undefined), "per_class": {...}, "confusion_matrix": {...}} (classification)."""
    y, s = _check(task, labels, y_true, scores)
    pred = predictions_from_scores(task, s, thresholds)
    if task == "regression":
        return {"metrics": load_metric("regression").compute(predictions=pred, references=y)}
    if task == "single_label":
        out = load_metric("classification", "single_label").compute(
            predictions=pred, references=y, label_names=list(labels), num_labels=len(labels), scores=s
        )
    else:
        out = load_metric("classification", "multi_label").compute(
            predictions=pred, references=y, label_names=list(labels)
        )
    per_class, cm = out.pop("per_class"), out.pop("confusion_matrix")
    if task == "multi_label":
        t = np.full(len(labels), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        for name, value in zip(labels, t, strict=False):
            per_class[name]["threshold"] = float(value)
    return {"metrics": out, "per_class": per_class, "confusion_matrix": cm}


def compute_metrics(task: str, labels: list[str], y_true, scores, thresholds=None) -> dict[str, float]:
    """Flat metric floats from true labels and model scores (probabilities, or values for regression).

    single_label: y_true class ids, scores (n, K) probabilities; multi_label: y_true multi-hot rows,
    scores (n, K) sigmoid probabilities, thresholds per label (default 0.5); regression: y_true and
    scores (n,) values. Undefined metrics (e.g. ROC-AUC with one class present) are left out.
    """
    return {
        k: float(v)
        for k, v in metric_details(task, labels, y_true, scores, thresholds)["metrics"].items()
        if v is not None
    }


def tune_thresholds(y_true, scores, grid=THRESHOLD_GRID, min_positives: int = MIN_POSITIVES_PER_LABEL) -> np.ndarray:
    """Per-label thresholds maximizing each label's F1 on (validation) data; ties go to the value closest to 0.5.

    A label with fewer than `min_positives` positives (none included) gets the shared threshold, the one that
    maximizes micro-F1 over all labels: its own F1 curve rests on too few examples to trust.
    """
    y = np.stack([np.asarray(v, dtype=np.float64) for v in y_true]) >= 0.5
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64)
    pred = s[:, :, None] >= g[None, None, :]  # (n, L, G)
    tp = (pred & y[:, :, None]).sum(axis=0)
    fp = (pred & ~y[:, :, None]).sum(axis=0)
    fn = (~pred & y[:, :, None]).sum(axis=0)
    closeness = -np.abs(g - 0.5)

    def best(f1_curve: np.ndarray) -> float:
        top = np.flatnonzero(np.isclose(f1_curve, f1_curve.max()))
        return float(g[top[np.argmax(closeness[top])]]) if f1_curve.max() > 0 else 0.5

    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)  # (L, G)
    pooled = 2 * tp.sum(0) + fp.sum(0) + fn.sum(0)
    shared = best(np.where(pooled > 0, 2 * tp.sum(0) / np.maximum(pooled, 1), 0.0))
    positives = y.sum(axis=0)
    return np.array([best(f1[j]) if positives[j] >= max(min_positives, 1) else shared for j in range(s.shape[1])])
