"""`finetune evaluate CONFIG RUN_DIR`: score a trained run on the held-out test split (wired by `register(app)`)."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.cli.common import ConfigArg, SetOpt
from tasks.cli.common import fail as _fail
from tasks.cli.common import load_or_fail as _load
from tasks.cli.common import user_errors as _user_errors


def evaluate_command(
    config: ConfigArg,
    run_dir: Path = typer.Argument(..., help="Training run folder (<workspace>/runs/<key>)."),
    set_: SetOpt = None,
) -> None:
    """Score a trained run on the held-out test split next to majority and TF-IDF baselines."""
    cfg = _load(config, set_)
    from tasks.evaluation.evaluate import evaluate_run
    from tasks.evaluation.metrics import MetricError
    from tasks.workspace import WorkspaceError

    try:
        result = evaluate_run(cfg, str(run_dir))
    except (*_user_errors(), MetricError, WorkspaceError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    state = "reused" if result.reused else "written"
    typer.echo(f"evaluation {result.key}: {state}")
    typer.echo(f"  {result.primary_metric}: {result.primary_value}")
    for name, m in result.baselines.items():
        typer.echo(f"  baseline {name}: {result.primary_metric} {m.get(result.primary_metric)}")
    for w in result.warnings:
        typer.secho(w, fg=typer.colors.YELLOW, err=True)
    typer.echo(f"  report: {Path(result.path) / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
