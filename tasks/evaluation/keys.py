"""What identifies an evaluation: its cache key, and the decision-threshold grid a multi-label evaluation depends
on. Kept apart from the metrics (and numpy): a fully cached rerun computes every stage's key, and should import
nothing heavy to do it."""

from __future__ import annotations

from pathlib import Path

from tasks.config import RunConfig
from tasks.files import folder_stamp, sha256_json
from tasks.plan import RunPlan

EVAL_VERSION = "3"  # 3: metrics.json records no local paths (run path relative, base model by name)
# Per-label decision thresholds tried on validation: 0.05 steps, plus tails down to 0.001 and up to 0.999
# (under class weighting, BCE pos_weight = neg/pos, a rare label's probabilities sit far above its frequency,
# so its F1-best threshold can lie above 0.95).
THRESHOLD_GRID = tuple(
    sorted(
        {
            *(round(i * 0.05, 2) for i in range(1, 20)),  # 0.05 .. 0.95
            0.001,
            0.003,
            0.01,
            0.02,
            0.03,
            0.97,
            0.98,
            0.99,
            0.995,
            0.997,
            0.999,
        }
    )
)
# A label with fewer validation positives than this shares one threshold (the one that maximizes micro-F1 over
# all labels) instead of its own: a threshold fitted to a handful of positives does not carry over to test.
# Measured on GoEmotions (2,000 train rows, 200 validation rows, 28 labels), same scores: per-label thresholds
# everywhere gave test micro-F1 0.344 (TF-IDF) and 0.479 (MiniLM, full) on a 0.05..0.95 grid, 0.258 and 0.485
# on this grid; with the shared threshold for labels under 10 positives, 0.442 and 0.517 on either grid.
MIN_POSITIVES_PER_LABEL = 10


def evaluation_key(cfg: RunConfig, run_dir: str | Path) -> str:
    """The run's key + a stamp of its trained model (file sizes and times) + evaluation settings + code version."""
    run = Path(run_dir)
    plan = RunPlan.read(run)
    payload = {
        "run": run.name,
        "model": folder_stamp(run / "model"),
        "evaluation": cfg.evaluation.model_dump(mode="json"),
        "max_length": plan.max_length,
        "version": EVAL_VERSION,
    }
    if plan.task == "multi_label":  # tuned thresholds come from this grid
        payload["threshold_grid"] = [list(THRESHOLD_GRID), MIN_POSITIVES_PER_LABEL]
    return sha256_json(payload)[:20]
