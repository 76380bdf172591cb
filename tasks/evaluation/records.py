"""Records shared by the evaluation stages (classification and instruction tuning): how a model stands against its
baselines, and JSON-safe values for metrics.json."""

from __future__ import annotations

import math

import numpy as np

from tasks.evaluation.metrics import higher_is_better, is_better


def clean(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def compare(primary: str, value: float | None, baselines: dict[str, dict]) -> dict:
    """How the model stands against each baseline on the primary metric (delta = model - baseline)."""
    out = {"primary_metric": primary, "higher_is_better": higher_is_better(primary), "model": value, "baselines": {}}
    for name, b in baselines.items():
        bv = b["metrics"].get(primary)
        if value is None or bv is None:
            out["baselines"][name] = {"value": bv, "delta": None, "model_beats": None}
            continue
        # strictly better: a tie with a baseline is not a win (a model that only matches the majority class is useless)
        out["baselines"][name] = {
            "value": bv,
            "delta": value - bv,
            "model_beats": is_better(value, bv, primary),
            "tie": value == bv,
        }
    tf = out["baselines"].get("tfidf")
    out["beats_tfidf"] = None if tf is None else tf["model_beats"]
    return out
