"""The `finetune` command. Heavy modules (torch, transformers, prefect) are imported inside commands,
so `finetune --help` and config checks answer fast."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

import tasks.cli.evaluate as cli_evaluate  # submodules by full name: no import of the package that imports this one
import tasks.cli.registry as cli_registry
import tasks.cli.train as cli_train
import tasks.cli.watch as cli_watch
from tasks.cli.common import ConfigArg, SetOpt
from tasks.cli.common import fail as _fail
from tasks.cli.common import load_or_fail as _load
from tasks.cli.common import user_errors as _user_errors
from tasks.config import ConfigError, RunConfig

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


def _register_commands() -> None:
    """Each command group lives in its own module (each keeps torch imports inside its commands)."""
    for module in (cli_train, cli_registry, cli_watch, cli_evaluate):
        module.register(app)


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate a config and print it with every default filled in."""
    import yaml

    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@data_app.command("prepare")
def data_prepare(
    config: ConfigArg,
    set_: SetOpt = None,
    tokenize: Annotated[
        bool,
        typer.Option("--tokenize/--no-tokenize", help="Also tokenize for the model: truncation is counted in tokens."),
    ] = True,
) -> None:
    """Load, validate and split the data (and tokenize it); write content-addressed folders; print the warnings."""
    cfg = _load(config, set_)
    tokenized = None
    try:
        from tasks.data.prepare import prepare_dataset

        result = prepare_dataset(cfg)
        if tokenize:
            from tasks.data.tokenize import tokenize_dataset
            from tasks.model.base import resolve_model

            tokenized = tokenize_dataset(result.path, resolve_model(cfg.model, cfg.workspace), cfg)
    except _user_errors() as exc:
        _fail(exc)
    state = "reused (same data and settings)" if result.reused else "written"
    typer.echo(f"dataset {result.fingerprint}: {state}")
    typer.echo(
        f"  task: {result.task}; labels: {len(result.labels)}; rows: "
        + ", ".join(f"{k} {v}" for k, v in result.rows.items())
    )
    typer.echo(f"  manifest: {Path(result.path) / 'manifest.json'}")
    typer.echo(f"  report:   {Path(result.path) / 'report.md'}")
    if tokenized is not None:
        typer.echo(f"tokenized {tokenized.key}: {'reused' if tokenized.reused else 'written'}")
    from tasks.workspace import Workspace

    warnings = Workspace.read_dataset(result.path).warnings + (tokenized.warnings if tokenized else [])
    for w in warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)


VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show every library's output (Prefect, transformers).")
]


def _check_writable(path: Path | None) -> None:
    """Fail before the run, not after it, when the summary cannot be written."""
    if path is None:
        return
    import os
    import tempfile

    parent = path.expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _fail(
            ConfigError(
                [("--summary-json", f"cannot write {path} ({exc.strerror or exc}); fix: choose a writable path")]
            )
        )


class _NoTracebackForUserErrors:
    """Logging filter: a user's mistake (bad config, data or model) is reported plainly, without a traceback."""

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _user_errors()):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_error_tracebacks() -> None:
    import logging

    f = _NoTracebackForUserErrors()
    for name in ("", "prefect", "prefect.task_runs", "prefect.flow_runs"):
        for handler in logging.getLogger(name).handlers:
            if f not in handler.filters:
                handler.addFilter(f)


# Library output that is not ours stays off the terminal (it still reaches the run log and the dashboard, and the
# training child's log file); `--verbose` shows everything. Set before prefect/transformers are imported.
QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # Prefect's INFO lines and task tracebacks: the run log
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the temporary server's telemetry (it wrote "database is locked")
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # weight-loading bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # tokenizer map bars
    "TRANSFORMERS_VERBOSITY": "error",  # load reports in this process (the training child keeps its warnings)
    "FINETUNE_QUIET": "1",
}


def quiet_libraries(verbose: bool) -> None:
    import os
    import warnings

    if not verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        # the libraries' notices about their own future APIs (e.g. peft asking transformers for
        # `is_gradient_checkpointing`) say nothing about the user's run
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


class _StageView(logging.Handler):
    """The live view of a run: one line per finished stage and a progress bar while the model trains (epoch,
    step, loss, rate, time left), from the flow's records on the `finetune.progress` logger."""

    MARKS = {"Completed": "[green]done[/]", "Cached": "[cyan]cached[/]", "Failed": "[red]failed[/]"}

    def __init__(self, console, status):
        super().__init__(logging.INFO)
        self.console, self.status, self.started = console, status, None

    def _progress(self, record) -> None:
        fraction = float(getattr(record, "fraction", 0.0))
        now = time.perf_counter()
        if self.started is None or fraction <= 0:
            self.started = (now, fraction)
        t0, f0 = self.started
        rate = (fraction - f0) / max(now - t0, 1e-9)
        eta = f"{(1 - fraction) / rate:.0f} s left" if rate > 0 else "estimating"
        width = 24
        bar = "█" * int(width * fraction) + "·" * (width - int(width * fraction))
        loss = getattr(record, "loss", None)
        self.status.update(
            f"train {bar} {fraction:4.0%}  epoch {record.epoch:.2f}/{record.epochs}  step "
            f"{record.step}  loss {loss if loss is None else f'{loss:.4f}'}  {eta}"
        )

    def emit(self, record) -> None:
        stage, state, seconds = (
            getattr(record, "stage", None),
            getattr(record, "state", ""),
            getattr(record, "seconds", 0.0),
        )
        if stage is None:
            return
        if state == "Progress":
            self._progress(record)
        elif state == "Running":
            self.started = None
            self.status.update(f"{stage} ...")
        else:
            self.console.print(f"  {stage:<14} {self.MARKS.get(state, state)}  {seconds:.1f} s")


def _call_flow(finetune, cfg: RunConfig) -> tuple[dict, BaseException | None]:
    """Run the flow; (its summary, the error or None). A failed flow's summary rides on its error."""
    try:
        state = finetune(cfg, return_state=True)
    except BaseException as exc:  # noqa: BLE001 - reported by the caller and in the summary
        return dict(getattr(exc, "run_summary", {}) or {}, state="Failed"), exc
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        return dict(getattr(result, "run_summary", {}) or {}, state="Failed"), result
    return dict(result, state=state.name if state.is_completed() else "Failed"), None


def _run_flow(cfg: RunConfig, summary_json: Path | None, t0: float) -> dict:
    """Run the finetune flow in this process (ephemeral Prefect unless PREFECT_API_URL is set)."""
    from rich.console import Console

    from flows.finetune import finetune  # imports prefect, which sets up the log handlers quieted below

    console = Console(stderr=True)
    status = console.status("starting Prefect ...")
    status.start()
    view = _StageView(console, status)
    progress = logging.getLogger("finetune.progress")
    progress.addHandler(view)
    progress.setLevel(logging.INFO)
    _quiet_user_error_tracebacks()
    try:
        summary, error = _call_flow(finetune, cfg)
    finally:
        progress.removeHandler(view)
        status.stop()
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    # what a fully cached rerun has no use for, and used to import (torch 1.5 s; numpy and FastAPI 0.1 s each)
    summary["heavy_modules_imported"] = [m for m in ("torch", "transformers", "numpy", "fastapi") if m in sys.modules]
    if error is not None:
        summary["error"] = f"{type(error).__name__}: {error}"
    if summary_json:
        from tasks.files import write_json

        try:
            write_json(summary_json, summary)
        except OSError as exc:
            typer.secho(f"error: could not write the summary to {summary_json}: {exc}", fg=typer.colors.RED, err=True)
    if error is not None:
        if isinstance(error, _user_errors()):
            _fail(error)
        typer.secho(f"error: the run failed: {summary['error']}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    return summary


def _print_outcome(summary: dict) -> None:
    typer.echo(f"run {summary['state']} in {summary['wall_s']:.1f} s")
    primary = summary.get("primary_metric")
    if primary:
        typer.echo(
            f"  test {primary}: {summary['metrics'].get(primary, float('nan')):.4f}"
            + "".join(f"; {b} {v.get(primary, float('nan')):.4f}" for b, v in summary.get("baselines", {}).items())
        )
    typer.echo(
        f"  model:  {summary.get('model_dir')}  (version {summary.get('version')}, "
        f"{'promoted to production' if summary.get('promoted') else 'not promoted'})"
    )
    if not summary.get("promoted") and summary.get("decision"):
        typer.echo(f"  gate:   {summary['decision']}")
    typer.echo(f"  report: {summary.get('report')}")
    for w in summary.get("warnings") or []:
        typer.secho(w, fg=typer.colors.YELLOW, err=True)


@app.command("run")
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    summary_json: Annotated[
        Path | None, typer.Option("--summary-json", help="Write a machine-readable summary here.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole pipeline as a Prefect flow: data, training, evaluation, export, registry."""
    t0 = time.perf_counter()
    quiet_libraries(verbose)
    cfg = _load(config, set_)
    _check_writable(summary_json)
    _print_outcome(_run_flow(cfg, summary_json, t0))


@app.command("demo")
def demo(
    set_: SetOpt = None,
    summary_json: Annotated[
        Path | None, typer.Option("--summary-json", help="Write a machine-readable summary here.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the pipeline on the bundled demo data with the bundled MiniLM (configs/demo.yaml)."""
    t0 = time.perf_counter()
    quiet_libraries(verbose)
    path = Path("configs/demo.yaml")
    if not path.exists():
        _fail(ConfigError([("(file)", "configs/demo.yaml not found; run `finetune demo` from the project folder")]))
    cfg = _load(path, set_)
    _check_writable(summary_json)
    _print_outcome(_run_flow(cfg, summary_json, t0))


_register_commands()


def _exit_without_teardown(code: int | str | None) -> None:
    """End the process as Python's own exit does (join the non-daemon threads, run every atexit handler: Prefect's
    log and event flushes, logging.shutdown, weakref finalizers; flush stdout and stderr), minus the last step,
    tearing down every imported module one object at a time: 0.2 s after a flow run has loaded Prefect, a tenth of
    a fully cached rerun. Only after a flow ran (Prefect imported), and never under a profiler, tracer or debugger
    (cProfile writes its file after the program returns); any other command exits the usual way."""
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if "prefect" not in sys.modules or run_exitfuncs is None or watched:
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr, flush=True)  # sys.exit("message") prints the message and exits with 1
        code = 1
    os._exit(code)


def main() -> None:
    """The console script (`finetune`) and `python -m tasks.cli`; tests call `app` instead, which never exits here."""
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except SystemExit as done:  # typer ends every command with SystemExit (0 on success)
        _exit_without_teardown(done.code)
        raise


if __name__ == "__main__":
    main()
