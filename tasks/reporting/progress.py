"""Live views of a running stage in the Prefect dashboard: a training-progress artifact fed from the run's
metrics.jsonl, the training child's log forwarded into the task's run log, and library log records
(transformers, peft, datasets warnings) routed into the run log."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

from tasks.reporting.artifacts import artifact_key

progress_log = logging.getLogger("finetune.progress")
LIBRARY_LOGGERS = {
    "transformers": logging.WARNING,
    "peft": logging.WARNING,
    "datasets": logging.WARNING,
    "finetune": logging.INFO,
}


@contextlib.contextmanager
def library_logs_to(run_logger, loggers: dict[str, int] = LIBRARY_LOGGERS):
    """Route library log records (transformers, peft, datasets warnings; our own info) into the run log."""

    class Forward(logging.Handler):
        def emit(self, record):
            if record.name == progress_log.name:  # the CLI's live view; the run log gets each stage's end already
                return
            with contextlib.suppress(Exception):
                run_logger.log(record.levelno, "[%s] %s", record.name, record.getMessage())

    attached = []
    for name, level in loggers.items():
        handler = Forward(level=level)
        logging.getLogger(name).addHandler(handler)
        attached.append((name, handler))
    try:
        yield
    finally:
        for name, handler in attached:
            logging.getLogger(name).removeHandler(handler)


def last_step(path: Path) -> dict | None:
    """The last training-step record of a metrics.jsonl (None when there is none yet)."""
    if not path.exists():
        return None
    last = None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if '"type": "step"' in line or '"type":"step"' in line:
                last = line
    with contextlib.suppress(ValueError, TypeError):
        return json.loads(last) if last else None
    return None


class _LogForwarder:
    """Forward the training child's new log lines (not its progress bars) into the run log."""

    def __init__(self, run: Path, logger):
        self.run, self.logger, self.offsets = run, logger, {}

    def __call__(self) -> None:
        logs = self.run / "logs"
        for log in sorted(logs.glob("attempt-*.log")) if logs.exists() else []:
            with open(log, encoding="utf-8", errors="replace") as fh:
                fh.seek(self.offsets.get(log, 0))
                for line in fh:
                    if line.strip() and "it/s]" not in line:
                        self.logger.info("[train %s] %s", log.stem, line.rstrip()[:500])
                self.offsets[log] = fh.tell()


@contextlib.contextmanager
def training_progress(name: str, run: Path, epochs: int, every_s: float = 2.0, artifact_every_s: float = 10.0):
    """While the child trains: the CLI's live view every `every_s`, a Prefect progress artifact from the run's
    metrics.jsonl every `artifact_every_s`, and the child's log lines forwarded into the task's run log.

    The flow process shares the CPU with the training child, so this stays cheap: one API client for the whole
    training (prefect.artifacts.update_progress_artifact opens a new client, and builds a new SSL context, on every
    call: about 25 ms of CPU each, measured with a stack sampler), and the dashboard's bar moves every 10 s."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    logger = get_run_logger()
    try:
        artifact_id = create_progress_artifact(
            0.0, key=artifact_key(name, "training-progress"), description="Training progress (epoch, step, loss)"
        )
    except Exception:  # noqa: BLE001 - the dashboard is a view: never fail training because of it
        artifact_id = None
    stop, forward = threading.Event(), _LogForwarder(run, logger)
    shown = {"artifact_at": 0.0}

    def report(last: dict, client) -> None:
        pct = min(100.0, 100.0 * float(last["epoch"]) / epochs)
        progress_log.info(
            "train %.1f%%",
            pct,
            extra={
                "stage": "train",
                "state": "Progress",
                "seconds": 0.0,
                "fraction": pct / 100.0,
                "epoch": float(last["epoch"]),
                "epochs": epochs,
                "step": last.get("step"),
                "loss": last.get("loss"),
            },
        )
        if artifact_id and client is not None and time.monotonic() - shown["artifact_at"] >= artifact_every_s:
            shown["artifact_at"] = time.monotonic()
            description = (
                f"epoch {float(last['epoch']):.2f}/{epochs}, step {last.get('step')}, "
                f"loss {last.get('loss', float('nan')):.4f}"
            )
            with contextlib.suppress(Exception):
                client.update_artifact(
                    artifact_id=artifact_id, artifact=ArtifactUpdate(description=description, data=pct)
                )

    def poll():
        seen = None
        with contextlib.ExitStack() as stack:
            client = None
            if artifact_id:
                with contextlib.suppress(Exception):
                    client = stack.enter_context(get_client(sync_client=True))
            while not stop.wait(every_s):
                with contextlib.suppress(Exception):
                    forward()
                last = last_step(run / "metrics.jsonl")
                if last and last.get("epoch") is not None and last.get("step") != seen:
                    seen = last.get("step")
                    report(last, client)

    thread = threading.Thread(target=poll, name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            forward()
        if artifact_id:
            with contextlib.suppress(Exception):
                update_progress_artifact(artifact_id, 100.0, description="training finished")
