"""RunPlan: every setting of a training run resolved once, written beside the run and read back, typed.

The planner (tasks/training/planner.py) resolves the plan from the config, the prepared dataset, the tokenized
data and the base model before any training cache key is computed: the method (`auto` resolved by the memory
planner), the learning rate and where it came from, micro-batch x accumulation x processes, precision, loss,
head, the base model's path and fingerprint, the start adapter. Keys, the training child, the learning-rate
search, evaluation, export and predict all read this object; none of them re-derives what it holds.

This module is pure data (no torch, no config import): it sits at the bottom of the import graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAN_VERSION = "1"
PLAN_FILE = "plan.json"
# Fields that do not change the trained weights: they stay out of the run key.
NOT_IN_RUN_KEY = (
    "run_dir",
    "prepared_path",
    "tokenized_path",
    "tokenizer_path",
    "base_model",
    "timeout_s",
    "save_every_steps",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "learning_rate_source",
    "method_reason",
    "memory_estimate",
    "precision_note",
    "head_reason",
    "search",
    "trial_max_steps",
    "start_adapter",
    "device_note",
)
# A learning-rate trial sets its own rate, budget and schedule: these do not change a trial.
NOT_IN_TRIAL_KEY = NOT_IN_RUN_KEY + (
    "learning_rate",
    "epochs",
    "early_stopping_metric",
    "patience",
    "min_delta",
    "eval_every_epochs",
)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RunPlan:
    """The resolved settings of one training run (or learning-rate trial)."""

    # data
    task: str
    labels: list[str]
    target_name: str
    dataset_fingerprint: str
    prepared_path: str
    tokenized_key: str
    tokenized_path: str
    max_length: int
    # base model and head
    base_model: str  # a local folder or a Hub id, resolved
    base_model_name: str  # as the config names it (e.g. bundled:all-MiniLM-L6-v2)
    base_model_fingerprint: str
    tokenizer_path: str
    head: str
    head_reason: str
    # method
    method: str
    method_reason: str
    method_settings: dict
    quantization: dict | None
    # optimisation
    learning_rate: float | None  # None until the search has picked it
    learning_rate_source: str  # "search" | "config" | "method default" | "search pending"
    epochs: int
    effective_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    processes: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    eval_every_epochs: int
    group_by_length: bool
    seed: int
    loss: str
    early_stopping_metric: str  # the metrics.jsonl key watched: val_loss or a validation metric
    patience: int
    min_delta: float
    # hardware
    device: str
    precision: str
    base_dtype: str
    gradient_checkpointing: bool
    # bookkeeping
    timeout_s: int
    save_every_steps: int | None
    revision: str | None = None
    trust_remote_code: bool = False
    start_adapter: str | None = None
    start_adapter_fingerprint: str | None = None
    search: dict = field(default_factory=dict)  # the search's settings (candidates, rungs, keep, metric, ...)
    trial_max_steps: int | None = None
    packing: bool = False  # sft: short examples packed into rows of max_length tokens
    precision_note: str | None = None
    memory_estimate: dict | None = None
    optimizer: str = "adamw"  # training.optimizer resolved (auto -> paged_adamw_32bit for qlora on CUDA); in the keys
    # training.strategy resolved: single (one process), ddp or fsdp (tasks/training/parallel.py); in the keys
    strategy: str = "single"
    device_note: str | None = None
    version: str = PLAN_VERSION

    # ---- derived facts ---------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return 1 if self.task == "regression" else len(self.labels)  # sft: none

    @property
    def problem_type(self) -> str:
        return {
            "single_label": "single_label_classification",
            "multi_label": "multi_label_classification",
            "regression": "regression",
            "sft": "causal_lm",
        }[self.task]

    @property
    def is_trial(self) -> bool:
        return self.trial_max_steps is not None

    # ---- keys ----------------------------------------------------------------------------------------
    def identity(self, exclude: tuple[str, ...] = NOT_IN_RUN_KEY) -> dict:
        """The fields that change the trained weights."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in exclude}

    def run_key(self) -> str:
        if self.learning_rate is None:
            raise ValueError("the learning rate is not resolved yet (the search has not run)")
        payload = self.identity() | {"start_adapter": self.start_adapter_fingerprint}
        return _hash(payload)[:20]

    def trial_key(self, rate: float, steps: int) -> str:
        payload = self.identity(NOT_IN_TRIAL_KEY) | {"rate": float(rate), "steps": int(steps)}
        return _hash(payload)[:20]

    def search_key(self) -> str:
        """The search's identity: what every trial shares, plus the search settings."""
        return _hash(self.identity(NOT_IN_TRIAL_KEY) | {"search": self.search})[:20]

    # ---- variants ------------------------------------------------------------------------------------
    def with_rate(self, rate: float, source: str) -> RunPlan:
        return dataclasses.replace(self, learning_rate=float(rate), learning_rate_source=source)

    def for_trial(self, rate: float, steps: int) -> RunPlan:
        """A trial: the rate fixed, stops after `steps`, scored once on validation, never saves a model."""
        return dataclasses.replace(
            self,
            learning_rate=float(rate),
            learning_rate_source="search trial",
            trial_max_steps=int(steps),
            early_stopping_metric="val_loss",
            save_every_steps=None,
        )

    def with_micro_batch(self, micro: int) -> RunPlan:
        """The out-of-memory back-off: same effective batch, smaller micro-batch, more accumulation."""
        per_step = micro * self.processes
        return dataclasses.replace(
            self, micro_batch_size=int(micro), gradient_accumulation_steps=max(1, self.effective_batch_size // per_step)
        )

    # ---- files ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str | Path = "plan") -> RunPlan:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            and f.name not in data
        ]
        if missing or data.get("version") != PLAN_VERSION:
            from tasks.workspace import WorkspaceError

            why = (
                f"lacks {', '.join(missing)}"
                if missing
                else f"has plan version {data.get('version')!r}, not {PLAN_VERSION}"
            )
            raise WorkspaceError(f"{source} {why}; fix: delete its folder and run again (the plan is resolved anew)")
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, folder: str | Path) -> Path:
        from tasks.files import write_json

        path = Path(folder) / PLAN_FILE
        write_json(path, self.to_json())
        return path

    @classmethod
    def read(cls, folder_or_file: str | Path) -> RunPlan:
        from tasks.workspace import read_facts

        p = Path(folder_or_file)
        path = p if p.suffix == ".json" else p / PLAN_FILE
        return cls.from_json(read_facts(path, "run plan"), path)
