"""`finetune watch PATH_OR_URL`: watch a drop folder (or any fsspec URL) and announce each new, complete
data file once as a `dataset.updated` Prefect event. `register(app)` wires it into the `finetune` app;
`python -m tasks.cli.watch watch ...` works on its own. Prefect and fsspec are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _server_or_fail() -> str:
    """The API URL of a reachable Prefect server, or a clear error (exit code 2)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        typer.secho(
            "error: PREFECT_API_URL is not set, so events would reach no server; fix: `make server`, then "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=2)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        typer.secho(
            f"error: the Prefect server at {url} does not answer ({problem}); fix: start it with `make server`",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=2)
    return url


LocationArg = Annotated[
    str, typer.Argument(help="Drop folder, file, or fsspec URL (memory://, s3://bucket/drop, ...).")
]
WatchConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Run configuration: its workspace holds the watch state; the dataset name is "
        "retrain.dataset_name or registry.name.",
    ),
]
StableOpt = Annotated[
    float,
    typer.Option(
        "--stable-seconds", min=0.0, help="A file counts as complete once its size and time stay unchanged this long."
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name", help="Dataset name in the event resource (finetune.dataset.<name>); default from the config."
    ),
]
StateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="State file of announced content (default: <workspace>/watch/<location>.json)."),
]


def _report(dataset: str):
    def report(result) -> None:
        for ann in result.announced:
            typer.echo(f"dataset.updated {dataset}: {ann.path} sha256 {ann.sha256[:12]} ({ann.size} bytes)")
        for url in result.duplicates:
            typer.echo(f"already announced (same content): {url}")

    return report


def watch(
    location: LocationArg,
    config: WatchConfigOpt = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between scans.")] = 10.0,
    stable_seconds: StableOpt = 5.0,
    once: Annotated[bool, typer.Option("--once", help="Scan once (waiting for settling files), then exit.")] = False,
    name: NameOpt = None,
    state: StateOpt = None,
    recursive: Annotated[bool, typer.Option("--recursive", help="Also look into sub-folders.")] = False,
) -> None:
    """Watch PATH_OR_URL and emit `dataset.updated` once per new, complete file content."""
    from tasks.config import ConfigError, RunConfig
    from tasks.config_loading import load_config
    from tasks.data.watching import (
        WatchError,
        canonical_location,
        check_location,
        default_state_path,
        resource_id,
        watch_forever,
    )

    try:
        cfg = load_config(config) if config is not None else RunConfig()
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    dataset = name or cfg.retrain.dataset_name or cfg.registry.name
    location = canonical_location(location)
    state_path = state or default_state_path(cfg.workspace, location)
    api = _server_or_fail()
    typer.echo(f"watching {location} for {resource_id(dataset)} (server {api}; state {state_path})")
    report = _report(dataset)
    try:
        if once:
            result = check_location(
                location, state_path, dataset=dataset, stable_seconds=stable_seconds, settle=True, recursive=recursive
            )
            report(result)
            for url in result.waiting:
                typer.echo(f"still changing, not announced: {url}")
            return
        watch_forever(
            location,
            state_path,
            dataset=dataset,
            interval_s=interval,
            stable_seconds=stable_seconds,
            on_result=report,
            recursive=recursive,
        )
    except WatchError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.echo("stopped")


def register(app: typer.Typer) -> None:
    """Add the `watch` command to the main `finetune` app."""
    app.command("watch")(watch)


def _standalone() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)

    @app.callback()
    def _main() -> None:
        """Data watching (the `finetune watch` command)."""

    register(app)
    return app


if __name__ == "__main__":
    _standalone()()
