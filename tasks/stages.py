"""The pipeline's stages as Prefect tasks: each a plain stage function, a cheap content key, the modules
whose code it depends on, and its retry/timeout policy. The flow (flows/finetune.py) only wires them.

Key functions read no rows and import no torch: a fully cached run must stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tasks.config import RunConfig


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
            timeout_seconds=self.timeout_s,
        )


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
