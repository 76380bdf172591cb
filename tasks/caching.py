"""Content-hash cache policies for Prefect (DESIGN.md rule 3).

Prefect's INPUTS policy hashes a path as a string and its default policy includes the run id, so
neither caches correctly across runs. Here each stage supplies a cheap `key_fn(**inputs) -> (key, path)`
computed from content (data bytes, the config fields that matter to the stage, upstream keys, the
base-model fingerprint) and the cache key also hashes:

- the stage's code version (the bytes of the modules that implement it), and
- a check that the stage's output folder still exists: when it was deleted, the stored cache record
  for the key is dropped before Prefect looks it up, so the hit becomes a miss and the task runs.

Two runs of the same config at once: SERIALIZABLE isolation with a file lock manager makes the
second wait for the first's cache record and reuse it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy

KeyFn = Callable[..., tuple[str, Path]]


def code_version(*modules: str) -> str:
    """Hash of the source files of the named modules (no import: find_spec only)."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            h.update(name.encode())
            continue
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StageCache(CachePolicy):
    """Cache key = stage name + code version + content key + whether the output folder exists."""

    stage: str = ""
    key_fn: Optional[KeyFn] = None
    modules: tuple[str, ...] = field(default_factory=tuple)
    records_dir: Optional[str] = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> Optional[str]:
        if self.key_fn is None:
            return None
        key, path = self.key_fn(**inputs)
        raw = "|".join([self.stage, code_version(*self.modules), key])
        cache_key = f"{self.stage}-{hashlib.sha256(raw.encode()).hexdigest()[:32]}"
        if self.records_dir and not Path(path).exists():
            (Path(self.records_dir) / cache_key).unlink(missing_ok=True)  # output gone: a miss, not a hit
        return cache_key


def stage_policy(stage: str, key_fn: KeyFn, modules: tuple[str, ...], workspace: Path) -> StageCache:
    """A StageCache storing its records under the workspace, serializable with file locks."""
    from prefect.locking.filesystem import FileSystemLockManager
    from prefect.transactions import IsolationLevel

    records = workspace / "prefect" / "cache-keys"
    return StageCache(stage=stage, key_fn=key_fn, modules=modules, records_dir=str(records)).configure(
        key_storage=str(records),
        lock_manager=FileSystemLockManager(lock_files_directory=workspace / "prefect" / "locks"),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )
