"""The `finetune` flow: prepare data -> tokenize -> [learning-rate search] -> train -> evaluate (+ baselines)
-> merge + export -> register -> promote, each a cached, retryable task. Wiring only; the work is in tasks/.

With `training.learning_rate: auto` the search's trials are mapped `lr-trial` tasks, run by the flow's task
runner. To spread them over a Dask cluster (pip install prefect-dask):

    from prefect_dask import DaskTaskRunner
    from flows.finetune import finetune
    finetune.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))(config=cfg)

(`training.search.max_parallel` caps how many trials run at once; RayTaskRunner from prefect-ray works the same.)
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Optional

from prefect import flow, get_run_logger

from tasks.config import RunConfig

# The CLI sets this to show progress; it receives (stage name, state name, seconds).
on_stage: Optional[Callable[[str, str, float], None]] = None
# The summary of the latest run in this process, kept up to date as stages finish (also on failure).
last_summary: dict[str, Any] = {}


@flow(name="finetune", log_prints=False, persist_result=False, validate_parameters=True)
def finetune(config: RunConfig, data_source: Optional[str] = None, data_sha256: Optional[str] = None) -> dict[str, Any]:
    """Fine-tune, evaluate, export and register a model for one run configuration."""
    from tasks import stages
    from tasks.artifacts import publish

    logger = get_run_logger()
    summary: dict[str, Any] = {"tasks": {}}
    cfg = config
    if data_source:  # triggered by new data: record a data version (append/replace) and train on it
        from tasks.retrain import apply_new_data

        cfg, version = apply_new_data(config, data_source, data_sha256)
        summary["data_version"] = asdict(version)
        logger.info("data version %s of %s (%s, fingerprint %s)", version.version, version.name, version.policy,
                    version.fingerprint)
    ws = cfg.workspace_path()
    last_summary.clear()
    last_summary.update(summary)

    def run(stage, *args):
        if on_stage is not None:
            on_stage(stage.name, "Running", 0.0)
        t0 = time.perf_counter()
        state = stage.task(ws)(*args, return_state=True)
        seconds = round(time.perf_counter() - t0, 3)
        name = "Cached" if state.name == "Cached" else ("Completed" if state.is_completed() else "Failed")
        summary["tasks"][stage.name] = {"state": name, "seconds": seconds}
        logger.info("stage %s: %s in %.2f s", stage.name, name, seconds)
        if on_stage is not None:
            on_stage(stage.name, name, seconds)
        return state.result()  # raises the stage's error: the flow fails, nothing after it runs

    with stages.library_logs_to(logger):
        prepared = run(stages.PREPARE, cfg)
        tokenized = run(stages.TOKENIZE, cfg, prepared)
        train_cfg, lr_search = cfg, None
        if cfg.training.learning_rate == "auto":  # a short search picks the rate (trials are mapped tasks)
            t0 = time.perf_counter()
            if on_stage is not None:
                on_stage("lr-search", "Running", 0.0)
            train_cfg, lr_search = stages.search_learning_rate(cfg, prepared, tokenized, ws)
            seconds = round(time.perf_counter() - t0, 3)
            state = "Cached" if lr_search.pop("cached", False) else "Completed"
            summary["tasks"]["lr-search"] = {"state": state, "seconds": seconds, "best_rate": lr_search["best_rate"]}
            logger.info("learning-rate search: %s wins (%s %s) in %.1f s", lr_search["best_rate"], lr_search["metric"],
                        max((t["score"] or 0) for t in lr_search["trials"] if t["rate"] == lr_search["best_rate"]), seconds)
            if on_stage is not None:
                on_stage("lr-search", state, seconds)
        trained = run(stages.TRAIN, train_cfg, prepared, tokenized, lr_search)
        evaluated = run(stages.EVALUATE, cfg, trained)
        exported = run(stages.EXPORT, cfg, trained, evaluated)
        registered = run(stages.REGISTER, cfg, exported, evaluated)

    folders = {"prepared": prepared.path, "run": trained.path, "evaluation": evaluated.path, "export": exported.path}
    records = stages.dashboard_records(cfg, evaluated, exported, registered)
    summary["artifacts"] = publish(cfg.registry.name, folders, records)
    summary.update(stages.run_summary(evaluated, exported, registered, folders))
    last_summary.update(summary)
    return summary
