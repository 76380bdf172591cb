"""The pipeline's stages as Prefect tasks: each a plain stage function, a cheap content key, the modules
whose code it depends on, and its retry/timeout policy. The flow (flows/finetune.py) only wires them.

Key functions read no rows and import no torch: a fully cached run must stay light.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tasks.config import RunConfig
from tasks.files import sha256_json


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]
    key_fn: Callable[..., tuple[str, Path]]
    modules: tuple[str, ...]
    retries: int = 0
    timeout_s: float | None = None
    description: str = ""

    def task(self, workspace: Path):
        """The Prefect task for this stage, its results and cache records kept in the workspace."""
        from prefect import task
        from prefect.tasks import exponential_backoff

        from tasks.caching import stage_policy

        return task(
            self.fn,
            name=self.name,
            description=self.description,
            cache_policy=stage_policy(self.name, self.key_fn, self.modules, workspace),
            persist_result=True,
            result_storage=workspace / "prefect" / "results",
            retries=self.retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=2) if self.retries else 0,
            retry_jitter_factor=0.5 if self.retries else None,
            retry_condition_fn=_retry_unless_user_error,
            timeout_seconds=self.timeout_s,
        )


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry what can be transient; a bad config, bad data or a bad model fails the same way every time."""
    from tasks.base_model import ModelSourceError
    from tasks.config import ConfigError
    from tasks.sources import DataError

    try:
        state.result()
    except (ConfigError, DataError, ModelSourceError):
        return False
    except BaseException:  # noqa: BLE001 - anything else may be transient
        return True
    return True


# ---- data -----------------------------------------------------------------------------------------

def prepare_data(config: RunConfig):
    """Load, validate, split and weight the labelled data."""
    from tasks.data import prepare_dataset

    return prepare_dataset(config)


def _prepare_key(config: RunConfig) -> tuple[str, Path]:
    from tasks.data import dataset_dir

    path = dataset_dir(config)
    return path.name, path


def tokenize(config: RunConfig, prepared):
    """Tokenize every split for the base model's tokenizer."""
    from tasks.base_model import resolve_model
    from tasks.tokenize import tokenize_dataset

    return tokenize_dataset(prepared.path, resolve_model(config.model), config)


def _tokenize_key(config: RunConfig, prepared) -> tuple[str, Path]:
    from tasks.base_model import resolve_model
    from tasks.tokenize import tokenized_dir

    path = tokenized_dir(config, prepared.fingerprint, resolve_model(config.model))
    return path.name, path


PREPARE = Stage("prepare-data", prepare_data, _prepare_key, ("tasks.data", "tasks.sources", "tasks.report"),
                retries=0, timeout_s=1800, description="Load, validate, split and weight the labelled data.")
TOKENIZE = Stage("tokenize", tokenize, _tokenize_key, ("tasks.tokenize",), retries=1, timeout_s=3600,
                 description="Tokenize every split for the base model's tokenizer.")


# ---- training ---------------------------------------------------------------------------------------

def _run_dir(config: RunConfig, prepared, tokenized) -> Path:
    from tasks.base_model import model_fingerprint
    from tasks.train import run_key

    key = run_key(config, prepared.fingerprint, tokenized.key, model_fingerprint(config.model), config.method.kind)
    return config.workspace_path() / "runs" / key


def train(config: RunConfig, prepared, tokenized, lr_search: dict | None = None):
    """Train in a child process; a retry resumes from the last checkpoint."""
    from tasks.train import train_model

    with training_progress(config, _run_dir(config, prepared, tokenized)):
        result = train_model(config, prepared.path, tokenized.path, lr_search=lr_search)
    _loss_curve(Path(result.path))
    return result


def _train_key(config: RunConfig, prepared, tokenized, lr_search: dict | None = None) -> tuple[str, Path]:
    path = _run_dir(config, prepared, tokenized)
    if config.method.kind == "auto":  # the folder depends on the method auto picks: key on the settings alone
        return path.name + "-auto", config.workspace_path()
    return path.name, path / "model"


def _loss_curve(run: Path) -> None:
    from tasks.plots import loss_curve_png

    if (run / "metrics.jsonl").exists() and not (run / "loss_curve.png").exists():
        loss_curve_png(run / "metrics.jsonl", run / "loss_curve.png")


@contextlib.contextmanager
def training_progress(config: RunConfig, run: Path, every_s: float = 2.0):
    """While the child trains: a Prefect progress artifact from the run's metrics.jsonl, and the child's
    log lines (transformers, peft, the loop) forwarded into the task's run log."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from tasks.artifacts import artifact_key

    epochs = config.training.epochs
    logger = get_run_logger()
    try:
        artifact_id = create_progress_artifact(0.0, key=artifact_key(config.registry.name, "training-progress"),
                                               description="Training progress (epoch, step, loss)")
    except Exception:  # the dashboard is a view: never fail training because of it
        artifact_id = None
    stop = threading.Event()
    offsets: dict[Path, int] = {}

    def forward_logs():
        for log in sorted((run / "logs").glob("attempt-*.log")) if (run / "logs").exists() else []:
            with open(log, encoding="utf-8", errors="replace") as fh:
                fh.seek(offsets.get(log, 0))
                for line in fh:
                    if line.strip() and "it/s]" not in line:  # progress bars stay out of the log
                        logger.info("[train %s] %s", log.stem, line.rstrip()[:500])
                offsets[log] = fh.tell()

    def poll():
        seen = 0.0
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):
                forward_logs()
            last = _last_step(run / "metrics.jsonl")
            if artifact_id and last and last.get("epoch") is not None:
                pct = min(100.0, 100.0 * float(last["epoch"]) / epochs)
                if pct != seen:
                    seen = pct
                    with contextlib.suppress(Exception):
                        update_progress_artifact(artifact_id, pct, description=(
                            f"epoch {float(last['epoch']):.2f}/{epochs}, step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}"))

    thread = threading.Thread(target=poll, name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            forward_logs()
        if artifact_id:
            with contextlib.suppress(Exception):
                update_progress_artifact(artifact_id, 100.0, description="training finished")


def _last_step(path: Path) -> dict | None:
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


# ---- learning-rate search (training.learning_rate: auto) --------------------------------------------

def lr_trial(config: RunConfig, prepared, tokenized, rate: float, steps: int):
    """Train one candidate learning rate briefly and score it on validation."""
    from tasks.lr_search import run_trial

    return run_trial(config, prepared.path, tokenized.path, rate, steps)


def _lr_trial_key(config: RunConfig, prepared, tokenized, rate: float, steps: int) -> tuple[str, Path]:
    from tasks.base_model import model_fingerprint
    from tasks.lr_search import trial_key

    method = config.method.kind
    key = trial_key(config, prepared.fingerprint, tokenized.key, model_fingerprint(config.model), method, rate, steps)
    if method == "auto":  # the folder depends on the method auto picks
        return key + "-auto", config.workspace_path()
    return key, config.workspace_path() / "lr-trials" / key / "training_summary.json"


def search_learning_rate(config: RunConfig, prepared, tokenized, workspace: Path) -> tuple[RunConfig, dict]:
    """Successive halving with each rung's trials as mapped Prefect tasks (at most training.search.max_parallel
    at a time), so the flow's task runner (threads by default; a DaskTaskRunner or RayTaskRunner spreads
    them over machines) runs them. Returns the config with the winning rate and the search summary."""
    from prefect import unmapped

    from tasks.lr_search import search_learning_rate as search

    trial = LR_TRIAL.task(workspace)
    n = config.training.search.max_parallel
    cached: list[bool] = []

    def run_rung(pairs):
        out = []
        for i in range(0, len(pairs), n):
            chunk = pairs[i:i + n]
            futures = trial.map(unmapped(config), unmapped(prepared), unmapped(tokenized),
                                [r for r, _ in chunk], [s for _, s in chunk])
            for f in futures:
                out.append(f.result())
                cached.append(f.state.name == "Cached")
        return out

    from tasks.lr_search import with_rate

    result = search(config, prepared.path, tokenized.path, run_rung=run_rung)
    summary = result.summary() | {"cached": bool(cached) and all(cached)}
    return with_rate(config, result.best_rate), summary


# ---- evaluation, export, registry -------------------------------------------------------------------

def evaluate(config: RunConfig, trained):
    """Score the held-out test split, with baselines and a confusion matrix."""
    from tasks.evaluate import evaluate_run

    return evaluate_run(config, trained.path)


def _evaluate_key(config: RunConfig, trained) -> tuple[str, Path]:
    from tasks.evaluate import evaluation_key

    key = evaluation_key(config, trained.path)
    return key, config.workspace_path() / "evaluations" / key


def export(config: RunConfig, trained, evaluated):
    """Merge adapters (verified), export a Hugging Face folder with its model card."""
    from tasks.export import export_run

    return export_run(config, trained.path, evaluated.path)


def _export_key(config: RunConfig, trained, evaluated) -> tuple[str, Path]:
    from tasks.export import export_key

    key = export_key(config, trained.path, evaluated.path)
    return key, config.workspace_path() / "exports" / key


def register(config: RunConfig, exported, evaluated):
    """Register the export as a new version; promote it if it beats production."""
    from tasks.registry import register_version

    return register_version(config, exported.path, evaluated.path)


def _register_key(config: RunConfig, exported, evaluated) -> tuple[str, Path]:
    # the same export is registered once; the gate settings are part of the decision
    return sha256_json({"export": Path(exported.path).name, "registry": config.registry.model_dump(mode="json")}), Path(exported.path)


TRAINING_CODE = ("tasks.train", "tasks.train_worker", "tasks.train_checkpoints", "tasks.modeling", "tasks.memory",
                 "tasks.batching", "tasks.losses", "tasks.heads", "tasks.modeling_mean_pooling")
LR_TRIAL = Stage("lr-trial", lr_trial, _lr_trial_key, TRAINING_CODE + ("tasks.lr_search",), retries=1, timeout_s=None,
                 description="Train one candidate learning rate briefly and score it on validation.")
TRAIN = Stage("train", train, _train_key, TRAINING_CODE,
              retries=2, timeout_s=None, description="Train in a child process; a retry resumes from the last checkpoint.")
EVALUATE = Stage("evaluate", evaluate, _evaluate_key, ("tasks.evaluate", "tasks.metrics", "tasks.baselines", "tasks.plots"),
                 retries=1,
                 timeout_s=3600, description="Score the held-out test split, with baselines.")
EXPORT = Stage("export", export, _export_key, ("tasks.export", "tasks.model_card", "tasks.predict", "tasks.registry"), retries=1, timeout_s=3600,
               description="Merge adapters (verified) and export a Hugging Face folder with its model card.")
REGISTER = Stage("register", register, _register_key, ("tasks.registry",), retries=2, timeout_s=900,
                 description="Register a new version; promote it if it beats production.")


# ---- flow helpers -----------------------------------------------------------------------------------

LIBRARY_LOGGERS = {"transformers": logging.WARNING, "peft": logging.WARNING, "datasets": logging.WARNING,
                   "finetune": logging.INFO}


@contextlib.contextmanager
def library_logs_to(run_logger, loggers: dict[str, int] = LIBRARY_LOGGERS):
    """Route library log records (transformers, peft, datasets warnings; our own info) into the run log."""

    class Forward(logging.Handler):
        def emit(self, record):
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


def dashboard_records(config: RunConfig, evaluated, exported, registered) -> dict:
    """Facts the dashboard shows beside the folders: production's metrics, merge figures, the decision."""
    comp = registered.comparison or {}
    production = None
    champ = comp.get("champion_version")
    if champ:
        path = Path(registered.path).parent / str(champ) / "metrics.json"
        if path.exists():
            production = json.loads(path.read_text())
    return {
        "production_metrics": production,
        "merge_verification": exported.merge_verification,
        "registry": {"name": registered.name, "version": registered.version, "path": registered.path,
                     "promoted": registered.promoted, "comparison": comp},
    }


def run_summary(evaluated, exported, registered, folders: dict) -> dict:
    return {
        "primary_metric": evaluated.primary_metric,
        "metrics": evaluated.metrics,
        "baselines": evaluated.baselines,
        "beats_tfidf": evaluated.beats_tfidf,
        "model_dir": str(Path(registered.path) / "model"),
        "version": registered.version,
        "promoted": registered.promoted,
        "decision": (registered.comparison or {}).get("reason"),
        "report": str(Path(evaluated.path) / "report.md"),
        "folders": folders,
    }
