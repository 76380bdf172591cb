"""The workspace: the one place that knows the folder layout, and typed readers of what the stages write.

```
<workspace>/
  datasets/<fingerprint>/        prepared splits (Parquet), manifest.json, report.md
  tokenized/<key>/               tokenized splits, tokenized.json
  plans/<key>.json               resolved RunPlans (tasks/plan.py), keyed by everything they depend on
  lr-trials/<key>/               learning-rate trials (no model)
  lr-search/<key>/               search.json + curves.png
  runs/<key>/                    plan.json, build.json, metrics.jsonl, checkpoints/, model/, training_summary.json
  evaluations/<key>/             metrics.json, predictions.parquet, report.md, plots
  exports/<key>/                 the exported model folder, lineage.json, README.md (model card), adapter/
  registry/<name>/               versions/<n>/, aliases.json, history.jsonl (tasks/release/registry.py)
  data-versions/                 <name>.json logs and their frozen files (tasks/data/versions.py)
  fingerprints/                  size+mtime memo of base-model fingerprints (no rehash on a cached run)
  prefect/                       Prefect's cache records, results (JSON) and locks for the stages
```

Readers raise `WorkspaceError` naming the file and the fix when a file is missing or unreadable, instead of a
bare JSONDecodeError. No torch, no pandas: everything here is cheap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from tasks.files import read_json

T = TypeVar("T")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class WorkspaceError(ValueError):
    """A workspace file is missing, truncated or not what it claims to be; the message names it and the fix."""


class RegistryError(ValueError):
    """A registry request that cannot be met (unknown or invalid model name, unknown version, incomplete export)."""


class RegistryFileError(WorkspaceError, RegistryError):
    """A damaged registry file (aliases.json, version.json): both a workspace and a registry error, so that whatever
    reports registry errors plainly reports it plainly too."""


def check_name(name: str, what: str = "model name") -> str:
    """A name that becomes a folder: letters, digits, '_', '.', '-', not starting with a dot; never a path."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise RegistryError(
            f"{what} {name!r} is not valid: use letters, digits, '_', '.' and '-' (starting with a "
            "letter or digit), never a path"
        )
    return name


def read_facts(
    path: str | Path, what: str = "file", error: type[WorkspaceError] = WorkspaceError, fix: str | None = None
) -> dict:
    """A JSON object from the workspace, or a WorkspaceError (`error`) that names the file and how to recover
    (`fix`; by default: delete the folder and run again, for what the pipeline rebuilds from its inputs)."""
    p = Path(path)
    try:
        data = read_json(p)
    except FileNotFoundError:
        raise error(
            f"{p} does not exist: the {what} is incomplete; "
            f"fix: {fix or 'run the pipeline again (it rebuilds what is missing)'}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(
            f"{p} is not readable JSON ({type(exc).__name__}: {exc}); the {what} is damaged; "
            f"fix: {fix or f'delete {p.parent} and run again (it is rebuilt from its inputs)'}"
        ) from None
    if not isinstance(data, dict):
        raise error(
            f"{p} holds a {type(data).__name__}, not a JSON object; fix: {fix or f'delete {p.parent} and run again'}"
        )
    return data


def from_facts(cls: type[T], data: dict, path: Path, required: tuple[str, ...] = ()) -> T:
    """Build a dataclass from a JSON object: known fields only, `required` ones must be present."""
    missing = [k for k in required if k not in data]
    if missing:
        raise WorkspaceError(
            f"{path} lacks {', '.join(missing)}: written by an older version or damaged; "
            f"fix: delete {path.parent} and run again"
        )
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in data.items() if k in names}
    if "raw" in names:
        kwargs["raw"] = data
    return cls(**kwargs)  # type: ignore[call-arg]


@dataclass(frozen=True)
class DatasetFacts:
    """A prepared dataset's manifest.json."""

    path: str
    fingerprint: str
    task: str
    labels: list[str]
    splits: dict[str, dict]
    class_weights: dict[str, float] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> dict[str, int]:
        return {s: int(v["rows"]) for s, v in self.splits.items()}

    @property
    def target_name(self) -> str:
        return str(self.settings.get("label_column", "target"))

    @property
    def has_pairs(self) -> bool:
        return self.columns.get("text_pair") is not None


@dataclass(frozen=True)
class TokenizedFacts:
    path: str
    key: str
    tokenizer: str
    max_length: int
    truncated_share: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSummary:
    """A run's training_summary.json (written last by the training child)."""

    best_epoch: int | None
    best_metric_name: str
    best_metric: float | None
    epochs_run: int
    global_step: int
    seconds: float
    resumed_from_step: int = 0
    learning_rate: float | None = None
    effective_batch_size: int | None = None
    stopped_early: bool = False
    trial: bool = False
    diverged: bool = False
    final_eval: dict = field(default_factory=dict)
    oom_backoffs: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class EvaluationFacts:
    """An evaluation folder's metrics.json."""

    path: str
    task: str
    primary_metric: str
    metrics: dict[str, Any]
    baselines: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    thresholds: dict | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def primary_value(self) -> float | None:
        v = self.metrics.get(self.primary_metric)
        return float(v) if isinstance(v, (int, float)) else None


@dataclass(frozen=True)
class ExportFacts:
    """An export folder's lineage.json."""

    path: str
    export_key: str
    method: str
    merge_verification: dict
    onnx: dict | None = None
    task: str | None = None
    labels: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Workspace:
    """Paths of every artifact kind under one root, and readers for them."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> Workspace:
        return cls(Path(path).expanduser().resolve())

    # ---- layout --------------------------------------------------------------------------------------
    def dataset(self, fingerprint: str) -> Path:
        return self.root / "datasets" / fingerprint

    def tokenized(self, key: str) -> Path:
        return self.root / "tokenized" / key

    def plan_file(self, key: str) -> Path:
        return self.root / "plans" / f"{key}.json"

    def run(self, key: str) -> Path:
        return self.root / "runs" / key

    def trial(self, key: str) -> Path:
        return self.root / "lr-trials" / key

    def search(self, key: str) -> Path:
        return self.root / "lr-search" / key

    def evaluation(self, key: str) -> Path:
        return self.root / "evaluations" / key

    def export(self, key: str) -> Path:
        return self.root / "exports" / key

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    def model_root(self, name: str) -> Path:
        return self.registry / check_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_root(name) / "versions" / str(int(version))

    @property
    def data_versions(self) -> Path:
        return self.root / "data-versions"

    @property
    def fingerprints(self) -> Path:
        return self.root / "fingerprints"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    def relative(self, path: str | Path) -> str:
        """`path` relative to the workspace root when inside it (for records that travel), else as given."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root))
        except ValueError:
            return str(p)

    # ---- readers ---------------------------------------------------------------------------------------
    @staticmethod
    def read_dataset(path: str | Path) -> DatasetFacts:
        p = Path(path) / "manifest.json"
        data = read_facts(p, "prepared dataset")
        return from_facts(
            DatasetFacts, {**data, "path": str(Path(path))}, p, ("fingerprint", "task", "labels", "splits")
        )

    @staticmethod
    def read_tokenized(path: str | Path) -> TokenizedFacts:
        p = Path(path) / "tokenized.json"
        data = read_facts(p, "tokenized dataset")
        return from_facts(TokenizedFacts, {**data, "path": str(Path(path))}, p, ("key", "tokenizer", "max_length"))

    @staticmethod
    def read_summary(run: str | Path) -> TrainingSummary:
        p = Path(run) / "training_summary.json"
        return from_facts(
            TrainingSummary,
            read_facts(p, "training run"),
            p,
            ("best_metric_name", "epochs_run", "global_step", "seconds"),
        )

    @staticmethod
    def read_evaluation(path: str | Path) -> EvaluationFacts:
        p = Path(path) / "metrics.json"
        data = read_facts(p, "evaluation")
        facts = from_facts(EvaluationFacts, {**data, "path": str(Path(path))}, p, ("task", "primary_metric", "metrics"))
        if facts.primary_metric not in facts.metrics:
            raise WorkspaceError(
                f"{p}: primary_metric {facts.primary_metric!r} is not among its metrics; "
                f"fix: delete {p.parent} and evaluate again"
            )
        return facts

    @staticmethod
    def read_export(path: str | Path) -> ExportFacts:
        p = Path(path) / "lineage.json"
        data = read_facts(p, "export")
        return from_facts(
            ExportFacts, {**data, "path": str(Path(path))}, p, ("export_key", "method", "merge_verification")
        )

    # ---- the registry's read side (writes: tasks/release/registry.py) ------------------------------------
    def model_names(self) -> list[str]:
        reg = self.registry
        if not reg.is_dir():
            return []
        return sorted(p.name for p in reg.iterdir() if p.is_dir() and (p / "versions").is_dir())

    def version_numbers(self, name: str) -> list[int]:
        vdir = self.model_root(name) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(
            int(p.name) for p in vdir.iterdir() if p.is_dir() and p.name.isdigit() and (p / "version.json").is_file()
        )

    def aliases(self, name: str) -> dict:
        p = self.model_root(name) / "aliases.json"
        if not p.is_file():
            return {"production": None, "production_history": []}
        fix = (
            f"delete {p} and set production again with `finetune registry promote {name} VERSION` "
            f"(past promotions are in {p.parent / 'history.jsonl'})"
        )
        return read_facts(p, "registry alias file", RegistryFileError, fix)

    def registered_root(self, name: str) -> Path:
        """The model's registry folder, or a RegistryError listing what is registered."""
        root = self.model_root(name)
        if not self.version_numbers(name):
            known = self.model_names()
            raise RegistryError(
                f"no registered model {name!r} in {self.registry}"
                + (f"; registered: {', '.join(known)}" if known else "; the registry is empty")
            )
        return root

    def production_version(self, name: str) -> int | None:
        """The production version, or None (nothing registered under this name, or nothing promoted)."""
        if not self.version_numbers(name):
            return None
        return self.aliases(name).get("production")

    def version_facts(self, name: str, version: int) -> dict:
        vdir = self.version_dir(name, version)
        fix = f"restore {vdir / 'version.json'} from a backup, or delete {vdir} to drop version {version}"
        return read_facts(vdir / "version.json", "registered version", RegistryFileError, fix)

    def resolve_ref(self, ref: str) -> tuple[str, int, Path]:
        """`NAME` (production) or `NAME@VERSION` -> (name, version, version folder)."""
        name, _, ver = ref.partition("@")
        if not name:
            raise RegistryError(f"model reference {ref!r}: expected NAME or NAME@VERSION")
        check_name(name)
        self.registered_root(name)
        numbers = self.version_numbers(name)
        if ver:
            if not ver.isdigit():
                raise RegistryError(f"model reference {ref!r}: the version after @ must be a number")
            version = int(ver)
            if version not in numbers:
                raise RegistryError(
                    f"model {name!r} has no version {version}; versions: {', '.join(map(str, numbers))}"
                )
        else:
            version = self.aliases(name).get("production")
            if version is None:
                raise RegistryError(
                    f"model {name!r} has no production version; use {name}@VERSION "
                    f"(versions: {', '.join(map(str, numbers))})"
                )
        return name, version, self.version_dir(name, version)
