"""The stage records: what each stage hands to the next and Prefect stores as JSON (tasks/caching.py rebuilds only
these classes). Small dataclasses of paths, keys and a few numbers, never a model or a dataset. They live here, in
the foundation layer with no heavy imports, so that a fully cached run reads them back without importing pandas,
torch or the stages' code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PreparedData:
    """What the data stage hands to the next one: a path and a few facts (never the data)."""

    path: str
    fingerprint: str
    task: str
    labels: list[str]
    rows: dict[str, int]
    reused: bool


@dataclass
class TokenizedData:
    path: str
    key: str
    truncated_share: dict[str, float]
    reused: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class Trial:
    rate: float
    steps: int
    score: float | None
    val_loss: float | None = None
    diverged: bool = False
    seconds: float = 0.0
    path: str | None = None
    reused: bool = False
    curve: list[float] = field(default_factory=list)  # training loss per step
    rung: int = 0

    @property
    def usable(self) -> bool:
        return not self.diverged and self.score is not None and math.isfinite(self.score)


@dataclass
class TrainResult:
    path: str
    key: str
    method: str
    model_dir: str
    best_epoch: int | None
    best_metric: float | None
    epochs_run: int
    global_step: int
    resumed_from_step: int
    seconds: float
    reused: bool = False
    best_metric_name: str = "val_loss"
    oom_backoffs: list[dict] = field(default_factory=list)


@dataclass
class EvalResult:
    path: str
    primary_metric: str
    primary_value: float | None
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    beats_tfidf: bool | None  # None when baselines are off (evaluation.baselines: false)
    key: str = ""
    reused: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    path: str
    merge_verification: dict
    onnx: bool
    key: str = ""
    method: str = ""
    reused: bool = False
    seconds: float = 0.0
    onnx_parity: dict | None = field(default=None)


@dataclass
class RegistryResult:
    name: str
    version: int
    path: str
    promoted: bool
    comparison: dict
