"""The `finetune` flow: [new data] -> prepare data -> tokenize -> plan -> [learning-rate search] -> train ->
evaluate (+ baselines) -> merge + export -> register -> promote, each a cached, retryable task (tasks/stages.py).
Wiring only; the work is in tasks/.

With `training.learning_rate: auto` the search's trials are mapped `lr-trial` tasks, run by the flow's task
runner. To spread them over a Dask cluster (pip install prefect-dask):

    from prefect_dask import DaskTaskRunner
    from flows.finetune import finetune
    finetune.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))(config=cfg)

(`training.search.max_parallel` caps how many trials run at once; RayTaskRunner from prefect-ray works the same.)

The flow returns its summary (stages with their states and seconds, metrics, the registered version). When a
stage fails, the flow fails with that stage's error, and the summary so far rides on the error as `run_summary`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks import stages
from tasks.config import RunConfig
from tasks.reporting.artifacts import publish
from tasks.reporting.progress import library_logs_to
from tasks.reporting.summary import dashboard_records, run_summary
from tasks.runner import StageRunner, record
from tasks.workspace import Workspace


def _heartbeats_without_join() -> bool:
    """Prefect's sync flow engine stops its heartbeat thread by joining it, and the thread sleeps in whole seconds
    (`time.sleep(1)` steps in prefect.flow_engine._send_heartbeats): every flow run ended with a wait of up to 1 s,
    half the Prefect time of a fully cached rerun (measured with a stack sampler: 51 of 105 samples of the flow call
    in that join). Prefect's async engine already passes join_on_exit=False; do the same here. The thread is a daemon
    and returns as soon as it sees the stop event, before emitting anything. Left alone when the private function
    is gone or its signature changed (a newer Prefect)."""
    import functools
    import inspect

    from prefect import flow_engine

    beats = getattr(flow_engine, "_send_heartbeats", None)
    if beats is None or getattr(beats, "_finetune_no_join", False):
        return beats is not None
    if "join_on_exit" not in inspect.signature(beats).parameters:
        return False
    patched = functools.partial(beats, join_on_exit=False)
    patched._finetune_no_join = True  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = patched
    return True


HEARTBEATS_WITHOUT_JOIN = _heartbeats_without_join()


def _json_parameters(flow_obj):
    """Prefect stores a flow run's parameters (shown in the dashboard) after passing each through FastAPI's
    `jsonable_encoder`, whose first use imports FastAPI: 0.1 s of a 1.9 s fully cached rerun. This flow's parameters
    are a pydantic config and strings, whose JSON form pydantic gives directly (the same dict; a test compares
    the two). Anything else still goes through Prefect's own serializer."""
    prefect_serialize = flow_obj.serialize_parameters

    def serialize(parameters: dict[str, Any]) -> dict[str, Any]:
        from pydantic import BaseModel

        plain = (str, int, float, bool, type(None))
        if not all(isinstance(v, (BaseModel, *plain)) for v in parameters.values()):
            return prefect_serialize(parameters)
        return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in parameters.items()}

    flow_obj.serialize_parameters = serialize
    return flow_obj


@_json_parameters
@flow(name="finetune", log_prints=False, persist_result=False, validate_parameters=True)
def finetune(config: RunConfig, data_source: str | None = None, data_sha256: str | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate, export and register a model for one run configuration."""
    logger = get_run_logger()
    run = StageRunner(Workspace.at(config.workspace).root, logger)
    summary: dict[str, Any] = {"tasks": run.tasks}
    try:
        with library_logs_to(logger):
            cfg = config
            if data_source:  # triggered by new data: record a data version (append/replace) and train on it
                version = run(stages.NEW_DATA, config, data_source, data_sha256)
                summary["data_version"] = record(version)
                cfg = config.model_copy(update={"data": config.data.model_copy(update={"source": version.source})})
            prepared = run(stages.PREPARE, cfg)
            tokenized = run(stages.TOKENIZE, cfg, prepared)
            planned = run(stages.PLAN, cfg, prepared, tokenized)
            search = run.search(cfg, planned) if planned.learning_rate is None else None
            rate = search["best_rate"] if search else planned.learning_rate
            trained = run(stages.TRAIN, cfg, planned, rate, search)
            evaluated = run(stages.EVALUATE, cfg, trained)
            exported = run(stages.EXPORT, cfg, trained, evaluated)
            registered = run(stages.REGISTER, cfg, exported, evaluated)
    except BaseException as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        try:
            exc.run_summary = summary  # the caller still learns which stages ran
        except AttributeError:
            pass
        raise
    folders = {"prepared": prepared.path, "run": trained.path, "evaluation": evaluated.path, "export": exported.path}
    summary["artifacts"] = publish(cfg.registry.name, folders, dashboard_records(registered, exported))
    summary.update(run_summary(evaluated, exported, registered, folders))
    return summary
