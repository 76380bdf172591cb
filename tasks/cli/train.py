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


def _estimate_base(cfg) -> str:
    """The model to plan for: a local folder with a config.json is enough (no weights, no tokenizer)."""
    from pathlib import Path

    from tasks.model.base import resolve_model

    p = Path(cfg.model.name_or_path).expanduser()
    return str(p) if (p / "config.json").is_file() else resolve_model(cfg.model, cfg.workspace)


def estimate_command(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
    device: Annotated[
        str | None, typer.Option("--device", help="Plan for cuda or cpu (default: this machine's device).")
    ] = None,
    device_memory: Annotated[
        str | None, typer.Option("--device-memory", help="The device's memory, e.g. 24GB or 80GiB (default: free).")
    ] = None,
) -> None:
    """Print the training memory per method (full, lora, qlora, dora), the micro-batch x accumulation that fits,
    and what method.kind=auto picks. Only the model's config.json is read."""
    cfg = _load(config, set_)
    if device not in (None, "cuda", "cpu"):
        _fail(f"--device {device!r}: fix: --device cuda or --device cpu")
    from tasks.model.memory import device_memory_known, parse_memory

    try:
        memory = parse_memory(device_memory) if device_memory else None
    except ValueError as exc:
        _fail(f"--device-memory: {exc}")
    if device == "cuda" and memory is None and not device_memory_known(device):
        _fail("--device cuda on a machine without a GPU: fix: give the GPU's memory, e.g. --device-memory 24GB")
    try:
        from tasks.model.loading import default_device
        from tasks.model.memory import estimate_memory
        from tasks.training.planner import batch_plan

        t = cfg.training
        micro, _ = batch_plan(t.effective_batch_size, t.processes, t.micro_batch_size)
        est = estimate_memory(
            _estimate_base(cfg),
            cfg.method.model_dump(mode="json"),
            micro_batch_size=micro,
            max_length=cfg.data.max_length,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            device=device or default_device(),
            device_memory=memory,
            optimizer=getattr(t, "optimizer", "auto"),
            effective_batch_size=t.effective_batch_size,
            processes=t.processes,
            strategy=t.strategy,
            task="sft" if cfg.data.task == "sft" else "single_label",
            gradient_checkpointing=t.gradient_checkpointing,
        )
    except _user_errors() as exc:
        _fail(exc)
    typer.echo(json.dumps(est) if as_json else format_estimate(est))


def format_estimate(est: dict) -> str:
    """The table `finetune estimate` prints (GiB)."""
    lines = [
        f"base model: {est['base_model']}  ({est['parameters'] / 1e6:.1f}M parameters, device {est['device']})",
        f"effective batch {est['effective_batch_size']} (micro-batch up to {est['micro_batch_size']}) x "
        f"{est['max_length']} tokens; memory {est['available_gb']} GiB, budget {est['budget_gb']} GiB",
        f"{'method':<7} {'weights':>8} {'grads':>8} {'optim':>8} {'paged':>7} {'activ':>8} {'runtime':>8} "
        f"{'total':>8}  {'fits':<4} {'micro x accum':>13}  ckpt  optimizer",
    ]
    for kind, m in est["methods"].items():
        batch = f"{m['micro_batch_size']} x {m['gradient_accumulation_steps']}"
        lines.append(
            f"{kind:<7} {m['weights']:>8.2f} {m['gradients']:>8.2f} {m['optimizer']:>8.2f} {m['paged']:>7.2f} "
            f"{m['activations']:>8.2f} {m['runtime']:>8.2f} {m['total_gb']:>8.2f}  {'yes' if m['fits'] else 'no':<4} "
            f"{batch:>13}  {'on ' if m['gradient_checkpointing'] else 'off'}   {m['optimizer_kind'] or '-'}"
        )
    if est.get("strategy") == "fsdp":
        lines.append(
            f"fsdp over {est['processes']} processes: figures per process; weights, gradients and optimizer state are "
            "sharded, the total adds two gathered blocks (4-bit bases are not sharded)"
        )
    lines.append("paged: optimizer state in CUDA unified memory, spilled to CPU RAM under pressure (not in total)")
    lines.append(f"auto choice: {est['choice'] or 'none'} ({est['reason']})")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add `train` and `estimate` to the main `finetune` app."""
    app.command("train")(train_command)
    app.command("estimate")(estimate_command)
