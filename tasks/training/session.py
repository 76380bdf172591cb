"""One training attempt's state (tasks/training/loop.py runs it), the test hooks, and the metrics.jsonl helpers."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.plan import RunPlan
from tasks.training.batching import Rows
from tasks.training.parallel import Engine


@dataclass
class Hooks:
    """Test hooks read from the environment (see the module docstring)."""

    oom_above: int | None = None
    step_delay: float = 0.0
    nan_above: float | None = None

    @classmethod
    def from_env(cls) -> Hooks:
        oom, nan = os.environ.get("FINETUNE_SIMULATE_OOM_ABOVE"), os.environ.get("FINETUNE_TEST_NAN_ABOVE_LR")
        return cls(
            int(oom) if oom else None,
            float(os.environ.get("FINETUNE_TEST_STEP_DELAY_S", "0") or 0),
            float(nan) if nan else None,
        )


@dataclass
class Session:
    """Everything one training attempt holds: the plan, the model, the data, the optimizer and the progress."""

    run: Path
    plan: RunPlan
    engine: Engine  # rank, world size, device and strategy (tasks/training/parallel.py)
    model: Any  # what the steps call: DDP-wrapped under ddp, sharded in place under fsdp
    core: Any  # the model itself (under fsdp: the same sharded module)
    tokenizer: Any
    built: Any
    train: Rows
    val: Rows
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    autocast: Any
    scaler: Any
    epochs: int
    steps_per_epoch: int
    hooks: Hooks
    state: dict = field(default_factory=dict)
    resumed_from: int = 0
    diverged: bool = False
    train_seconds: float = 0.0
    samples: int = 0
    base_seconds: float = 0.0
    compact: Any = None  # the word embeddings' used rows, when trained compactly (tasks/training/compact_embedding.py)
    attempt_t0: float = field(default_factory=time.perf_counter)

    @property
    def rank(self) -> int:
        return self.engine.rank

    @property
    def world(self) -> int:
        return self.engine.world

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def metrics_path(self) -> Path:
        return self.run / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[train] {msg}", flush=True)

    def seconds(self) -> float:
        return self.base_seconds + time.perf_counter() - self.attempt_t0


def append(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj) + "\n")


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each intact line of a metrics.jsonl; a line cut short (the process was killed or the disk
    filled up mid-append) is skipped, never a JSONDecodeError."""
    out = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((ln, rec))
    return out


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """After a resume, drop metric lines written after the checkpoint (they are trained again), and damaged ones."""
    if not path.exists():
        return
    keep = [ln for ln, rec in _records(path) if rec.get("step", 0) <= upto_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def last_eval(path: Path) -> dict | None:
    if not path.exists():
        return None
    evals = [rec for _, rec in _records(path) if rec.get("type") == "eval"]
    return evals[-1] if evals else None
