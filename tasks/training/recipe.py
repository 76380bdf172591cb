"""Training from a config outside the flow (`finetune train`, benchmarks, tests): plan, search when the rate is
`auto` (trials one after another), train. The flow does the same with cached tasks (tasks/stages.py)."""

from __future__ import annotations

from pathlib import Path

from tasks.config import RunConfig
from tasks.training.launch import TrainResult, train
from tasks.training.planner import plan_run
from tasks.training.search import search_learning_rate
from tasks.workspace import Workspace


def train_from_config(
    cfg: RunConfig, prepared_path: str | Path, tokenized_path: str | Path, ws: Workspace | None = None
) -> TrainResult:
    ws = ws or Workspace.at(cfg.workspace)
    plan = plan_run(cfg, prepared_path, tokenized_path, ws)
    search = None
    if plan.learning_rate is None:
        result = search_learning_rate(plan, ws)
        search = result.summary()
        plan = plan.with_rate(result.best_rate, "search")
    return train(plan, ws, search_summary=search)
