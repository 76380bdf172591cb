"""The `finetune` command. Heavy modules (torch, transformers, prefect) are imported inside commands,
so `finetune --help` and config checks answer fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tasks.config import ConfigError, RunConfig, load_config

app = typer.Typer(
    name="finetune",
    help="Fine-tune a pretrained transformer on labelled data: validated data, training, evaluation, export, registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Data preparation.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and check run configurations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

ConfigArg = Annotated[Path, typer.Argument(help="Run configuration (YAML).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable)."),
]



def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed plainly (no traceback), exit code 2."""
    from tasks.base_model import ModelSourceError
    from tasks.sources import DataError

    return (ConfigError, DataError, ModelSourceError)


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(exc)


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate a config and print it with every default filled in."""
    import yaml

    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@data_app.command("prepare")
def data_prepare(config: ConfigArg, set_: SetOpt = None) -> None:
    """Load, validate and split the data; write a content-addressed prepared dataset."""
    cfg = _load(config, set_)
    try:
        from tasks.data import prepare_dataset

        result = prepare_dataset(cfg)
    except _user_errors() as exc:
        _fail(exc)
    state = "reused (same data and settings)" if result.reused else "written"
    typer.echo(f"dataset {result.fingerprint}: {state}")
    typer.echo(f"  task: {result.task}; labels: {len(result.labels)}; rows: " + ", ".join(f"{k} {v}" for k, v in result.rows.items()))
    typer.echo(f"  manifest: {Path(result.path) / 'manifest.json'}")
    typer.echo(f"  report:   {Path(result.path) / 'report.md'}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
