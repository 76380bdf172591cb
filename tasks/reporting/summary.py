"""What a finished run reports: the facts the dashboard shows beside the folders, and the summary the flow
returns to its caller (the CLI prints it; `--summary-json` writes it)."""

from __future__ import annotations

from pathlib import Path

from tasks.workspace import Workspace, WorkspaceError


def dashboard_records(registered, exported) -> dict:
    """Production's metrics (same test set), merge figures and the promotion decision."""
    comp = registered.comparison or {}
    production = None
    champ = comp.get("champion_version")
    if champ:
        with_metrics = Path(registered.path).parent / str(champ)
        try:
            production = (
                Workspace.read_evaluation(with_metrics).raw if (with_metrics / "metrics.json").exists() else None
            )
        except WorkspaceError:
            production = None
    return {
        "production_metrics": production,
        "merge_verification": exported.merge_verification,
        "registry": {
            "name": registered.name,
            "version": registered.version,
            "path": registered.path,
            "promoted": registered.promoted,
            "comparison": comp,
        },
    }


def run_summary(evaluated, exported, registered, folders: dict) -> dict:
    return {
        "primary_metric": evaluated.primary_metric,
        "metrics": evaluated.metrics,
        "baselines": evaluated.baselines,
        "beats_tfidf": evaluated.beats_tfidf,
        "warnings": list(evaluated.warnings),
        "model_dir": str(Path(registered.path) / "model"),
        "version": registered.version,
        "promoted": registered.promoted,
        "decision": (registered.comparison or {}).get("reason"),
        "report": str(Path(evaluated.path) / "report.md"),
        "export": exported.path,
        "folders": folders,
    }
