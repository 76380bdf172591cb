"""Loss per task, and the validation metrics watched during training.

cross-entropy with the manifest's class weights (single_label), BCE with per-label pos_weight
(multi_label), MSE (regression). Losses return a per-sample SUM so the loop can divide by the
global batch size: the gradient is then the same whatever the micro-batch split or process count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tasks.config import ConfigError

if TYPE_CHECKING:  # numpy only where metrics are computed: a cached rerun plans its key without importing it
    import numpy as np

LOSS_FOR_TASK = {"single_label": "cross_entropy", "multi_label": "bce", "regression": "mse", "sft": "cross_entropy"}
METRICS_FOR_TASK = {
    "single_label": ("accuracy", "f1_macro", "f1_weighted"),
    "multi_label": ("f1_micro", "f1_macro", "subset_accuracy"),
    "regression": ("mse", "mae", "r2"),
    "sft": ("perplexity",),
}
LOWER_IS_BETTER = {"loss", "val_loss", "mse", "mae", "perplexity", "response_loss"}


def resolve_loss(task: str, configured: str = "auto") -> str:
    """The loss for a task; a loss that does not fit the task is a config error."""
    expected = LOSS_FOR_TASK[task]
    if configured in ("auto", expected):
        return expected
    raise ConfigError([("training.loss", f"'{configured}' does not fit task {task}; use '{expected}' or 'auto'")])


def check_early_stopping_metric(task: str, metric: str) -> str:
    """'loss' or a validation metric computed for this task; returns the metrics.jsonl key."""
    if metric in ("loss", "val_loss"):
        return "val_loss"
    allowed = METRICS_FOR_TASK[task]
    if metric not in allowed:
        raise ConfigError(
            [
                (
                    "training.early_stopping.metric",
                    f"'{metric}' is not computed for task {task}; choose loss or one of {', '.join(allowed)}",
                )
            ]
        )
    return metric


def is_better(metric: str, new: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return True
    if metric in LOWER_IS_BETTER:
        return new < best - min_delta
    return new > best + min_delta


def class_weight_vector(task: str, labels: list[str], class_weights: dict[str, float]) -> list[float] | None:
    """Manifest class weights in label-id order (None for regression or when absent)."""
    if task == "regression" or not class_weights:
        return None
    return [float(class_weights.get(name, 1.0)) for name in labels]


def make_loss(task: str, weights: list[float] | None = None, device: str = "cpu") -> Callable:
    """loss_fn(logits, labels) -> summed per-sample loss (a scalar tensor)."""
    import torch
    import torch.nn.functional as F

    w = torch.tensor(weights, dtype=torch.float32, device=device) if weights is not None else None
    if task == "single_label":

        def ce(logits, labels):
            return F.cross_entropy(logits.float(), labels.long(), weight=w, reduction="sum")

        return ce
    if task == "multi_label":

        def bce(logits, labels):
            per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=w, reduction="none")
            return per.mean(dim=-1).sum()

        return bce
    if task == "sft":
        from tasks.data.sft_rows import causal_lm_loss

        return causal_lm_loss
    if task == "regression":

        def mse(logits, labels):
            return F.mse_loss(logits.float().view(-1), labels.float().view(-1), reduction="sum")

        return mse
    raise ValueError(f"unknown task {task!r}")


def validation_metrics(task: str, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """Validation scores that pick epochs (early stopping) and learning rates (tasks/lr_search.py).

    single_label: accuracy/f1 from argmax; regression: mse/mae/r2. multi_label: the decision rule the final
    evaluation applies (per-label thresholds tuned on validation, tasks.evaluation.metrics.tune_thresholds), so that
    selection and the reported test score agree: F1 at a fixed 0.5 says little about a model trained with
    pos_weight, which scores rare labels high for every row (on GoEmotions, pos_weight reaches 449).
    F1 at 0.5 stays in the record as f1_micro_at_0.5 / f1_macro_at_0.5."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error, r2_score

    if task == "single_label":
        pred = outputs.argmax(axis=-1)
        return {
            "accuracy": float(accuracy_score(y_true, pred)),
            "f1_macro": float(f1_score(y_true, pred, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(y_true, pred, average="weighted", zero_division=0)),
        }
    if task == "multi_label":
        from tasks.evaluation.metrics import tune_thresholds

        truth = (np.asarray(y_true) >= 0.5).astype(int)
        probs = 1.0 / (1.0 + np.exp(-np.asarray(outputs, dtype=np.float64)))
        half = (probs >= 0.5).astype(int)
        pred = (probs >= tune_thresholds(truth, probs)[None, :]).astype(int)
        return {
            "f1_micro": float(f1_score(truth, pred, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(truth, pred, average="macro", zero_division=0)),
            "subset_accuracy": float(accuracy_score(truth, pred)),
            "f1_micro_at_0.5": float(f1_score(truth, half, average="micro", zero_division=0)),
            "f1_macro_at_0.5": float(f1_score(truth, half, average="macro", zero_division=0)),
        }
    pred = outputs.reshape(-1)
    out = {"mse": float(mean_squared_error(y_true, pred)), "mae": float(mean_absolute_error(y_true, pred))}
    out["r2"] = float(r2_score(y_true, pred)) if len(y_true) > 1 else 0.0
    return out
