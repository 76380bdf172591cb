"""`finetune train` and `finetune estimate`: wired into the main app by `register(app)`.

torch/transformers are imported inside the commands so that `finetune --help` stays fast.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tasks.cli.common import ConfigArg, SetOpt
from tasks.cli.common import fail as _fail
from tasks.cli.common import load_or_fail as _load
from tasks.cli.common import user_errors as _user_errors


def train_command(config: ConfigArg, set_: SetOpt = None) -> None:
    """Prepare the data, tokenize it and train (reuses or resumes a run with the same inputs)."""
    cfg = _load(config, set_)
    from tasks.training.launch import TrainingError

    try:
        from tasks.data.prepare import prepare_dataset
        from tasks.data.tokenize import tokenize_dataset
        from tasks.model.base import resolve_model
        from tasks.training.recipe import train_from_config

        prepared = prepare_dataset(cfg)
        typer.echo(
            f"dataset {prepared.fingerprint}: {'reused' if prepared.reused else 'written'} "
            f"({', '.join(f'{k} {v}' for k, v in prepared.rows.items())})"
        )
        tokenized = tokenize_dataset(prepared.path, resolve_model(cfg.model, cfg.workspace), cfg)
        typer.echo(f"tokenized {tokenized.key}: {'reused' if tokenized.reused else 'written'}")
        result = train_from_config(cfg, prepared.path, tokenized.path)
    except _user_errors() as exc:
        _fail(exc)
    except TrainingError as exc:
        typer.secho(f"training failed: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    state = (
        "reused (same inputs)"
        if result.reused
        else (f"resumed from step {result.resumed_from_step}" if result.resumed_from_step else "trained")
    )
    typer.echo(f"run {result.key}: {state}; method {result.method}")
    typer.echo(
        f"  best epoch {result.best_epoch}: {result.best_metric_name} {result.best_metric:.4f}; "
        f"{result.epochs_run} epochs, {result.global_step} steps, {result.seconds:.1f} s"
    )
    for b in result.oom_backoffs:
        typer.echo(
            f"  out of memory at micro-batch {b['from_micro_batch']}: continued at {b['to_micro_batch']} "
            f"x accumulation {b['to_accumulation']}"
        )
    typer.echo(f"  model: {result.model_dir}")


def estimate_command(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Print the training memory per method (full, lora, qlora, dora) and what method.kind=auto picks."""
    cfg = _load(config, set_)
    try:
        from tasks.model.base import resolve_model
        from tasks.model.loading import default_device
        from tasks.model.memory import estimate_memory, format_estimate
        from tasks.training.planner import batch_plan

        t = cfg.training
        micro, _ = batch_plan(t.effective_batch_size, t.processes, t.micro_batch_size)
        est = estimate_memory(
            resolve_model(cfg.model, cfg.workspace),
            cfg.method.model_dump(mode="json"),
            micro_batch_size=micro,
            max_length=cfg.data.max_length,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            device=default_device(),
            optimizer=t.optimizer,
        )
    except _user_errors() as exc:
        _fail(exc)
    typer.echo(json.dumps(est) if as_json else format_estimate(est))


def register(app: typer.Typer) -> None:
    """Add `train` and `estimate` to the main `finetune` app."""
    app.command("train")(train_command)
    app.command("estimate")(estimate_command)
