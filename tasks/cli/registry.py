"""`finetune registry list|show|promote|rollback` and `finetune predict`. Wired into the app (tasks/cli/app.py) with
`register(app)`. Only the predict command imports torch/transformers, and only when it runs. A model name is checked
where it becomes a path (tasks/workspace.py check_name): `../x` or `/x` exits with code 2 and touches nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tasks.cli.common import fail as _fail
from tasks.workspace import WorkspaceError

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="The pipeline workspace (holds registry/).")]
NameArg = Annotated[str, typer.Argument(help="Registered model name.")]


def registry_list(
    name: Annotated[str | None, typer.Argument(help="Model name; omit to list all models.")] = None,
    workspace: WorkspaceOpt = Path("workspace"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered models, or the versions of one model (* marks production)."""
    from tasks.release.registry import RegistryError, list_models, list_versions

    try:
        if name is None:
            names = list_models(workspace)
            if as_json:
                typer.echo(json.dumps(names))
            for n in [] if as_json else names:
                typer.echo(n)
            if not names and not as_json:
                typer.echo(f"no registered models in {workspace / 'registry'}")
            return
        rows = list_versions(workspace, name)
    except (RegistryError, WorkspaceError) as exc:  # an invalid name, a damaged registry file
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    typer.echo(f"{'':2}{'version':>7}  {'metric':<12} {'value':>8}  {'method':<6} {'gate':<8} created")
    for r in rows:
        mark = "* " if r["production"] else "  "
        typer.echo(
            f"{mark}{r['version']:>7}  {r['primary_metric']:<12} {r['primary_value']:>8.4f}  "
            f"{r.get('method') or '':<6} {r.get('gate') or '':<8} {r.get('created_at')}"
        )


def registry_show(
    name: NameArg,
    version: Annotated[int | None, typer.Argument(help="Version (default: production).")] = None,
    workspace: WorkspaceOpt = Path("workspace"),
) -> None:
    """Show one version: facts, gate decision, test metrics."""
    from tasks.release.registry import RegistryError, show_version

    try:
        typer.echo(json.dumps(show_version(workspace, name, version), indent=2, default=str))
    except (RegistryError, WorkspaceError) as exc:  # an invalid name, a damaged registry file
        _fail(exc)


def registry_promote(
    name: NameArg,
    version: Annotated[int, typer.Argument(help="Version to make production.")],
    workspace: WorkspaceOpt = Path("workspace"),
    reason: Annotated[str, typer.Option(help="Recorded in the history.")] = "manual",
) -> None:
    """Force a version to production (bypasses the gate; recorded)."""
    from tasks.release.registry import RegistryError, promote

    try:
        r = promote(workspace, name, version, reason)
    except (RegistryError, WorkspaceError) as exc:  # an invalid name, a damaged registry file
        _fail(exc)
    typer.echo(f"{name}: production is version {r['production']} (was {r['previous']})")


def registry_rollback(name: NameArg, workspace: WorkspaceOpt = Path("workspace")) -> None:
    """Return production to the previous production version."""
    from tasks.release.registry import RegistryError, rollback

    try:
        r = rollback(workspace, name)
    except (RegistryError, WorkspaceError) as exc:  # an invalid name, a damaged registry file
        _fail(exc)
    typer.echo(f"{name}: production rolled back to version {r['production']} (was {r['previous']})")


def predict(
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            help="NAME or NAME@VERSION (default: production). Repeat it for several adapter versions of one base: "
            "the base loads once, each version writes columns prefixed NAME@VERSION_.",
        ),
    ],
    input: Annotated[Path, typer.Option("--input", "-i", help="CSV (or .tsv/.jsonl/.parquet) with a text column.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV to write: input columns + prediction, score.")],
    workspace: WorkspaceOpt = Path("workspace"),
    text_column: Annotated[
        str | None, typer.Option(help="Text column (default: the one the model was trained on).")
    ] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="Second text column for pair models.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 64,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Instruction-tuned models: most tokens generated per answer (greedy).")
    ] = 128,
) -> None:
    """Score a file with a registered model (an instruction-tuned one answers each prompt: column `response`)."""
    from tasks.release.predict import PredictError, predict_file
    from tasks.release.registry import RegistryError

    args = (input, output, batch_size, text_column, text_pair_column, progress, max_new_tokens)
    try:
        if len(model) > 1:
            from tasks.release.multi_adapter import predict_many

            m = predict_many(workspace, model, *args)
        else:
            r = predict_file(workspace, model[0], *args)
    except (PredictError, RegistryError, WorkspaceError) as exc:
        _fail(exc)
    if len(model) > 1:
        mem = m.memory
        typer.echo(
            f"{m.rows} rows scored with {', '.join(m.models)} on one base -> {m.path} ({m.seconds:.1f}s)\n"
            f"memory: base {mem['base_bytes'] / 2**20:.1f} MB loaded once for {mem['models']} models "
            f"(+ adapters {mem['adapters_bytes'] / 2**20:.2f} MB): {mem['saved_mb']:.1f} MB saved against loading "
            f"each alone; summary: {m.summary}"
        )
        return
    typer.echo(f"{r.rows} rows scored with {r.model} version {r.version} -> {r.path} ({r.seconds:.1f}s)")


def register(app: typer.Typer) -> None:
    """Add `registry ...` and `predict` to the main `finetune` app."""
    reg = typer.Typer(help="Registered model versions and the production alias.", no_args_is_help=True)
    reg.command("list")(registry_list)
    reg.command("show")(registry_show)
    reg.command("promote")(registry_promote)
    reg.command("rollback")(registry_rollback)
    app.add_typer(reg, name="registry")
    app.command("predict")(predict)
