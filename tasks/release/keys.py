"""What identifies an export (its cache key), apart from the export code and its heavy imports: a fully cached
rerun computes every stage's key and should import nothing heavy to do it."""

from __future__ import annotations

from pathlib import Path

from tasks.config import RunConfig
from tasks.files import folder_stamp, sha256_file, sha256_json

EXPORT_VERSION = "3"  # 3: lineage.json and the card record no local paths


def export_key(cfg: RunConfig, run_dir: str | Path, eval_dir: str | Path) -> str:
    """Content key: the run (key, plan, summary), the evaluation, the export settings."""
    run = Path(run_dir)
    return sha256_json(
        {
            "run": run.name,
            "plan": sha256_file(run / "plan.json"),
            "model": folder_stamp(run / "model"),
            "metrics": sha256_file(Path(eval_dir) / "metrics.json"),
            "export": cfg.export.model_dump(mode="json"),
            "name": cfg.registry.name,
            "version": EXPORT_VERSION,
        }
    )[:20]
