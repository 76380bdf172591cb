"""Running the stage table inside a flow: each stage as its Prefect task, its state and seconds recorded for the
flow's summary and announced on the `finetune.progress` logger (the CLI shows them live); the learning-rate
search's trials as mapped tasks. Wiring shared by flows/finetune.py; the stages themselves are tasks/stages.py."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from tasks.config import RunConfig
from tasks.stages import LR_TRIAL, PlanRecord, Stage, read_plan, workspace_of

progress_log = logging.getLogger("finetune.progress")


def search_learning_rate(config: RunConfig, planned: PlanRecord, workspace: Path) -> tuple[dict, bool]:
    """Successive halving with each rung's trials as mapped Prefect tasks (at most training.search.max_parallel
    at a time), so the flow's task runner (threads by default; a DaskTaskRunner or RayTaskRunner spreads them
    over machines) runs them. Returns the search summary and whether every trial was cached."""
    from prefect import unmapped

    from tasks.training.search import search_learning_rate as search

    trial = LR_TRIAL.task(workspace)
    p = read_plan(planned)
    n = int(p.search["max_parallel"])
    cached: list[bool] = []

    def run_rung(pairs):
        out = []
        for i in range(0, len(pairs), n):
            chunk = pairs[i : i + n]
            futures = trial.map(unmapped(config), unmapped(planned), [r for r, _ in chunk], [s for _, s in chunk])
            for f in futures:
                out.append(f.result())
                cached.append(f.state.name == "Cached")
        return out

    result = search(p, workspace_of(config), run_rung=run_rung)
    return result.summary(), bool(cached) and all(cached)


class StageRunner:
    """Runs stages in a flow and keeps the per-stage record (state, seconds) the flow returns."""

    def __init__(self, workspace: Path, logger):
        self.workspace, self.logger = workspace, logger
        self.tasks: dict[str, dict] = {}

    def report(self, stage: str, state: str, seconds: float, **extra) -> None:
        self.tasks[stage] = {"state": state, "seconds": seconds, **extra}
        if state != "Running":
            self.logger.info("stage %s: %s in %.2f s", stage, state, seconds)
        progress_log.info("%s %s", stage, state, extra={"stage": stage, "state": state, "seconds": seconds})

    def __call__(self, stage: Stage, *args):
        self.report(stage.name, "Running", 0.0)
        t0 = time.perf_counter()
        state = stage.task(self.workspace)(*args, return_state=True)
        name = "Cached" if state.name == "Cached" else ("Completed" if state.is_completed() else "Failed")
        self.report(stage.name, name, round(time.perf_counter() - t0, 3))
        return state.result()  # raises the stage's error: the flow fails, nothing after it runs

    def search(self, config: RunConfig, planned: PlanRecord) -> dict:
        self.report("lr-search", "Running", 0.0)
        t0 = time.perf_counter()
        summary, cached = search_learning_rate(config, planned, self.workspace)
        best = max((t["score"] or 0) for t in summary["trials"] if t["rate"] == summary["best_rate"])
        self.logger.info("learning-rate search: %s wins (%s %s)", summary["best_rate"], summary["metric"], best)
        self.report(
            "lr-search",
            "Cached" if cached else "Completed",
            round(time.perf_counter() - t0, 3),
            best_rate=summary["best_rate"],
        )
        return summary


def record(obj) -> dict:
    """A stage record as a plain dict (for the flow's summary)."""
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else dict(obj)
