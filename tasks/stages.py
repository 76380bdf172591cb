"""The stage table: each stage's plain function, its cheap content key, its retry and timeout policy.

A stage reads folders and writes a folder; it returns a small record (paths, keys, a few numbers), never a model
or a dataset. `Stage.task(workspace)` makes the Prefect task: its cache key (tasks/caching.py) hashes the stage's
content key and the source of its implementation's import closure, and misses when the output folder is gone.
Key functions read no rows, hash no weights and import no torch: a fully cached run stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import RunConfig
from tasks.files import sha256_json
from tasks.workspace import Workspace, WorkspaceError

LOCK_SLACK_S = 600


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]
    key_fn: Callable[..., tuple[str, Path]]
    module: str  # the implementation's module: its import closure is the stage's code version
    retries: int = 0
    timeout_s: float | None = None
    description: str = ""

    def task(self, workspace: Path):
        """The Prefect task for this stage, its results and cache records kept in the workspace."""
        from prefect import task
        from prefect.tasks import exponential_backoff

        from tasks.caching import RecordSerializer, result_storage, stage_policy

        # a lock held past the stage's timeout (plus the time to store its result) has lost its holder
        hold = self.timeout_s + LOCK_SLACK_S if self.timeout_s else None
        return task(
            self.fn,
            name=self.name,
            description=self.description,
            cache_policy=stage_policy(self.name, self.key_fn, self.module, workspace, hold),
            persist_result=True,
            result_storage=result_storage(workspace),
            result_serializer=RecordSerializer(),  # JSON records, never pickles (DESIGN.md rule 11)
            retries=self.retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=2) if self.retries else 0,
            retry_jitter_factor=0.5 if self.retries else None,
            retry_condition_fn=_retry_unless_user_error,
            timeout_seconds=self.timeout_s,
        )


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported plainly, never retried (a damaged workspace file fails the same
    way every time; its WorkspaceError names the file and the fix)."""
    from tasks.config import ConfigError
    from tasks.data.sources import DataError
    from tasks.model.base import ModelSourceError

    return (ConfigError, DataError, ModelSourceError, WorkspaceError)


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry what can be transient; a bad config, bad data or a bad model fails the same way every time."""
    try:
        state.result()
    except user_errors():
        return False
    except BaseException:  # noqa: BLE001 - anything else may be transient
        return True
    return True


def workspace_of(cfg: RunConfig) -> Workspace:
    return Workspace.at(cfg.workspace)


# ---- new data, data, tokens ----------------------------------------------------------------------------------


def new_data(config: RunConfig, data_source: str, data_sha256: str | None = None):
    """Record the data version a dropped file makes (append or replace) and return it."""
    from tasks.data.versions import apply_new_data

    _, version = apply_new_data(config, data_source, data_sha256)
    return version


def _new_data_key(config: RunConfig, data_source: str, data_sha256: str | None = None) -> tuple[str, Path]:
    from tasks.data.versions import drop_sha256, log_path

    # the event's hash (checked: 64 hex digits), or the file's own content; the location is checked against the
    # allowed roots and schemes first, so an unchecked URL is never fetched just to compute a cache key
    content = drop_sha256(config, data_source, data_sha256)
    key = sha256_json(
        {
            "sha256": content,
            "retrain": config.retrain.model_dump(mode="json"),
            "data": config.data.model_dump(mode="json"),
            "name": config.registry.name,
        }
    )[:20]
    return key, log_path(config)


def prepare_data(config: RunConfig):
    """Load, validate, split and weight the labelled data."""
    from tasks.data.prepare import prepare_dataset

    return prepare_dataset(config)


def _prepare_key(config: RunConfig) -> tuple[str, Path]:
    from tasks.data.fingerprint import dataset_fingerprint

    path = workspace_of(config).dataset(dataset_fingerprint(config.data))
    return path.name, path


def tokenize(config: RunConfig, prepared):
    """Tokenize every split for the base model's tokenizer."""
    from tasks.data.tokenize import tokenize_dataset
    from tasks.model.base import resolve_model

    return tokenize_dataset(prepared.path, resolve_model(config.model, config.workspace), config)


def _tokenize_key(config: RunConfig, prepared) -> tuple[str, Path]:
    from tasks.data.tokenize import tokenized_dir
    from tasks.model.base import resolve_model

    path = tokenized_dir(config, prepared.fingerprint, resolve_model(config.model, config.workspace))
    return path.name, path


# ---- the plan, the search, training ---------------------------------------------------------------------------


@dataclass
class PlanRecord:
    """Where the resolved plan is, and the few facts the flow branches on."""

    path: str
    key: str
    method: str
    learning_rate: float | None
    learning_rate_source: str


def plan(config: RunConfig, prepared, tokenized) -> PlanRecord:
    """Resolve every setting of the run once (method, rate, batches, precision, head, base fingerprint)."""
    from tasks.training.planner import plan_key, plan_run

    ws = workspace_of(config)
    p = plan_run(config, prepared.path, tokenized.path, ws)
    key = plan_key(config, prepared.fingerprint, tokenized.key, ws)
    return PlanRecord(str(ws.plan_file(key)), key, p.method, p.learning_rate, p.learning_rate_source)


def _plan_key(config: RunConfig, prepared, tokenized) -> tuple[str, Path]:
    from tasks.training.planner import plan_key

    ws = workspace_of(config)
    key = plan_key(config, prepared.fingerprint, tokenized.key, ws)
    return key, ws.plan_file(key)


def read_plan(planned: PlanRecord):
    from tasks.plan import RunPlan

    return RunPlan.read(planned.path)


def lr_trial(config: RunConfig, planned: PlanRecord, rate: float, steps: int):
    """Train one candidate learning rate briefly and score it on validation."""
    from tasks.training.search import run_trial

    return run_trial(read_plan(planned), workspace_of(config), rate, steps)


def _lr_trial_key(config: RunConfig, planned: PlanRecord, rate: float, steps: int) -> tuple[str, Path]:
    key = read_plan(planned).trial_key(rate, steps)
    return key, workspace_of(config).trial(key) / "training_summary.json"


def train(config: RunConfig, planned: PlanRecord, rate: float, search: dict | None = None):
    """Train in a child process; a retry resumes from the last checkpoint."""
    from tasks.reporting.progress import training_progress
    from tasks.training.launch import train as train_run

    ws = workspace_of(config)
    p = read_plan(planned).with_rate(rate, "search" if search else planned.learning_rate_source)
    with training_progress(config.registry.name, ws.run(p.run_key()), p.epochs):
        result = train_run(p, ws, search_summary=search)
    _loss_curve(Path(result.path))
    return result


def _train_key(config: RunConfig, planned: PlanRecord, rate: float, search: dict | None = None) -> tuple[str, Path]:
    from tasks.plan import RunPlan

    key = read_plan(planned).with_rate(rate, "key").run_key()
    run = workspace_of(config).run(key)
    if (run / "model").is_dir():  # a finished run's facts must be readable (a WorkspaceError names the damage)
        Workspace.read_summary(run)
        RunPlan.read(run)
    return key, run / "model"


def _loss_curve(run: Path) -> None:
    from tasks.reporting.plots import loss_curve_png

    if (run / "metrics.jsonl").exists() and not (run / "loss_curve.png").exists():
        loss_curve_png(run / "metrics.jsonl", run / "loss_curve.png")


# ---- evaluation, export, registry ----------------------------------------------------------------------------


def evaluate(config: RunConfig, trained):
    """Score the held-out test split, with baselines and a confusion matrix."""
    from tasks.evaluation.evaluate import evaluate_run

    return evaluate_run(config, trained.path)


def _evaluate_key(config: RunConfig, trained) -> tuple[str, Path]:
    from tasks.evaluation.keys import evaluation_key

    key = evaluation_key(config, trained.path)
    return key, workspace_of(config).evaluation(key)


def export(config: RunConfig, trained, evaluated):
    """Merge adapters (verified), export a Hugging Face folder with its model card."""
    from tasks.release.export import export_run

    return export_run(config, trained.path, evaluated.path)


def _export_key(config: RunConfig, trained, evaluated) -> tuple[str, Path]:
    from tasks.release.keys import export_key

    key = export_key(config, trained.path, evaluated.path)
    return key, workspace_of(config).export(key)


def register(config: RunConfig, exported, evaluated):
    """Register the export as a new version; promote it if it beats production."""
    from tasks.release.registry import register_version

    return register_version(config, exported.path, evaluated.path)


def _register_key(config: RunConfig, exported, evaluated) -> tuple[str, Path]:
    # the same export is registered once; the gate settings are part of the decision
    payload = {"export": Path(exported.path).name, "registry": config.registry.model_dump(mode="json")}
    return sha256_json(payload)[:20], Path(exported.path)


NEW_DATA = Stage(
    "new-data",
    new_data,
    _new_data_key,
    "tasks.data.versions",
    retries=1,
    timeout_s=1800,
    description="Record the data version a dropped file makes (append or replace).",
)
PREPARE = Stage(
    "prepare-data",
    prepare_data,
    _prepare_key,
    "tasks.data.prepare",
    retries=0,
    timeout_s=1800,
    description="Load, validate, split and weight the labelled data.",
)
TOKENIZE = Stage(
    "tokenize",
    tokenize,
    _tokenize_key,
    "tasks.data.tokenize",
    retries=1,
    timeout_s=3600,
    description="Tokenize every split for the base model's tokenizer.",
)
PLAN = Stage(
    "plan",
    plan,
    _plan_key,
    "tasks.training.planner",
    retries=1,
    timeout_s=900,
    description="Resolve every setting of the run once: method, rate, batches, precision, head.",
)
LR_TRIAL = Stage(
    "lr-trial",
    lr_trial,
    _lr_trial_key,
    "tasks.training.search",
    retries=1,
    timeout_s=None,
    description="Train one candidate learning rate briefly and score it on validation.",
)
TRAIN = Stage(
    "train",
    train,
    _train_key,
    "tasks.training.launch",
    retries=2,
    timeout_s=None,
    description="Train in a child process; a retry resumes from the last checkpoint.",
)
EVALUATE = Stage(
    "evaluate",
    evaluate,
    _evaluate_key,
    "tasks.evaluation.evaluate",
    retries=1,
    timeout_s=3600,
    description="Score the held-out test split, with baselines.",
)
EXPORT = Stage(
    "export",
    export,
    _export_key,
    "tasks.release.export",
    retries=1,
    timeout_s=3600,
    description="Merge adapters (verified) and export a Hugging Face folder with its model card.",
)
REGISTER = Stage(
    "register",
    register,
    _register_key,
    "tasks.release.registry",
    retries=2,
    timeout_s=900,
    description="Register a new version; promote it if it beats production.",
)
STAGES = (NEW_DATA, PREPARE, TOKENIZE, PLAN, LR_TRIAL, TRAIN, EVALUATE, EXPORT, REGISTER)
