"""What every `finetune` command module shares: argument types, loading a config, and plain user errors.

Light imports only (typer, pydantic via tasks.config): `finetune --help` must not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tasks.config import ConfigError, RunConfig
from tasks.config_loading import load_config

ConfigArg = Annotated[Path, typer.Argument(help="Run configuration (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable)."),
]


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed plainly (no traceback), exit code 2."""
    from tasks.stages import user_errors as stage_user_errors

    return stage_user_errors()


def fail(exc: BaseException | str) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def load_or_fail(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(exc)
