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
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager

log = logging.getLogger("finetune.caching")

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcessLockManager(FileSystemLockManager):
    """File locks that also record the holder's host and pid, so a lock left by a killed process
    (SIGKILL, OOM killer, power loss of a worker) is recognised as stale instead of blocking forever."""

    # Prefect creates a lock file empty (touch) and writes its JSON just after: a reader in between used to
    # fail with "EOF while parsing" (seen once in two concurrent runs of one config). Reads retry for about
    # READ_RETRIES x READ_PAUSE_S; a lock file still unreadable after that lost its writer and counts as stale.
    READ_RETRIES, READ_PAUSE_S = 50, 0.02

    def _stamp(self, key: str) -> None:
        path = Path(self._lock_path_for_key(key))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            info = json.loads(path.read_bytes() or b"{}")
            info.update(pid=os.getpid(), host=socket.gethostname())
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)  # readers see the old or the new content, never a truncated file
        except (OSError, ValueError):
            tmp.unlink(missing_ok=True)

    def _get_lock_info(self, key: str, use_cache: bool = True):
        for _ in range(self.READ_RETRIES):
            try:
                return super()._get_lock_info(key, use_cache=use_cache)
            except ValueError:  # empty or half-written: its writer is between touch and write
                time.sleep(self.READ_PAUSE_S)
        path = Path(self._lock_path_for_key(key))
        log.warning("removing stale lock %s: still unreadable after %.1f s", path.name,
                    self.READ_RETRIES * self.READ_PAUSE_S)
        path.unlink(missing_ok=True)
        self._locks.pop(key, None)
        return None

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        ok = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if ok:
            self._stamp(key)
        return ok

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        ok = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if ok:
            self._stamp(key)
        return ok

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        try:
            info = json.loads(path.read_bytes() or b"{}")
        except (OSError, ValueError):
            info = {}
        pid = info.get("pid")
        if pid and info.get("host") == socket.gethostname() and pid != os.getpid() and not _alive(int(pid)):
            log.warning("removing stale lock %s: its holder (pid %s) is gone", path.name, pid)
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


def stage_policy(stage: str, key_fn: KeyFn, modules: tuple[str, ...], workspace: Path) -> StageCache:
    """A StageCache storing its records under the workspace, serializable with file locks."""
    from prefect.transactions import IsolationLevel

    records = workspace / "prefect" / "cache-keys"
    return StageCache(stage=stage, key_fn=key_fn, modules=modules, records_dir=str(records)).configure(
        key_storage=str(records),
        lock_manager=ProcessLockManager(lock_files_directory=workspace / "prefect" / "locks"),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )
