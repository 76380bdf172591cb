"""Content-hash cache policies for Prefect (DESIGN.md rule 3).

Prefect's INPUTS policy hashes a path as a string and its default policy includes the run id, so
neither caches correctly across runs. Here each stage supplies a cheap `key_fn(**inputs) -> (key, path)`
computed from content (data bytes, the config fields that matter to the stage, upstream keys, the
base-model fingerprint) and the cache key also hashes:

- the stage's code version (the source of the import closure of the module that implements it), and
- a check that the stage's output folder still exists: when it was deleted, the stored cache record
  for the key is dropped before Prefect looks it up, so the hit becomes a miss and the task runs.

Two runs of the same config at once: SERIALIZABLE isolation with a file lock manager makes the
second wait for the first's cache record and reuse it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager

log = logging.getLogger("finetune.caching")

KeyFn = Callable[..., tuple[str, Path]]


PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("tasks", "flows")


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module (no import), or None when `name` is not one."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path: Path, root: Path = PROJECT_ROOT) -> set[str]:
    """Project modules imported anywhere in a file (top level and inside functions), read with `ast`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES and module_file(name, root) is not None:
                found.add(name)
    return found


def import_closure(module: str, root: Path = PROJECT_ROOT) -> list[str]:
    """`module` and every project module it imports, transitively (parent packages included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen]
        path = module_file(name, root)
        if path is not None:
            todo += sorted(project_imports(path, root) - seen)
    return sorted(n for n in seen if module_file(n, root) is not None)


def _code_files(modules: list[str], root: Path) -> list[Path]:
    """The closure's files, plus code loaded by path beside them (folders without __init__.py, e.g. the
    `evaluate` metric modules under tasks/evaluation/metrics/)."""
    files: set[Path] = set()
    for name in modules:
        path = module_file(name, root)
        files.add(path)
        for sub in path.parent.iterdir():
            if sub.is_dir() and not (sub / "__init__.py").exists() and sub.name != "__pycache__":
                files.update(sub.rglob("*.py"))
    return sorted(files)


@lru_cache(maxsize=256)
def _code_version(module: str, root: Path, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in _code_files(import_closure(module, root), root):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def code_version(module: str, root: Path = PROJECT_ROOT) -> str:
    """Hash of the source of `module`'s import closure: editing any module a stage runs changes its key, and a
    renamed module cannot silently drop out (the names come from the code's own imports, not a hand-kept list)."""
    stamp = tuple(
        (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        for pkg in PROJECT_PACKAGES
        if (root / pkg).is_dir()
        for p in sorted((root / pkg).rglob("*.py"))
    )
    return _code_version(module, root, stamp)


@dataclass
class StageCache(CachePolicy):
    """Cache key = stage name + code version + content key + whether the output folder exists."""

    stage: str = ""
    key_fn: KeyFn | None = None
    module: str = ""  # the module of the stage's implementation: its import closure is the code version
    records_dir: str | None = None

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.key_fn is None:
            return None
        key, path = self.key_fn(**inputs)
        raw = "|".join([self.stage, code_version(self.module), key])
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
        log.warning(
            "removing stale lock %s: still unreadable after %.1f s", path.name, self.READ_RETRIES * self.READ_PAUSE_S
        )
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


def stage_policy(stage: str, key_fn: KeyFn, module: str, workspace: Path) -> StageCache:
    """A StageCache storing its records under the workspace, serializable with file locks."""
    from prefect.transactions import IsolationLevel

    records = workspace / "prefect" / "cache-keys"
    return StageCache(stage=stage, key_fn=key_fn, module=module, records_dir=str(records)).configure(
        key_storage=str(records),
        lock_manager=ProcessLockManager(lock_files_directory=workspace / "prefect" / "locks"),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )
