"""The code version of a stage: a hash of the source of its module's import closure (DESIGN.md rule 3).

Editing any module a stage runs changes its cache key, and a renamed module cannot silently drop out: the names
come from the code's own imports (read with `ast`), not from a hand-kept list. Computing it parses every project
module, about half a second on a fully cached rerun; so the versions are also kept on disk
(`$XDG_CACHE_HOME/finetune/code-versions.json`), under a stamp of every project file's path, size and mtime: a run
whose files are all unchanged reads them back instead of parsing, and any edit (or checkout) changes the stamp.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

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
    """Project modules imported anywhere in a file, read with `ast`; parsed once per file version (mtime, size)."""
    st = path.stat()
    return set(_project_imports(str(path), str(root), st.st_mtime_ns, st.st_size))


@lru_cache(maxsize=1024)
def _project_imports(path_s: str, root_s: str, _mtime_ns: int, _size: int) -> frozenset[str]:
    path, root = Path(path_s), Path(root_s)
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
    return frozenset(found)


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
    """Hash of the source of `module`'s import closure (see the module docstring)."""
    files = [p for pkg in PROJECT_PACKAGES if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))]
    stamp = tuple((str(p), st.st_mtime_ns, st.st_size) for p in files for st in (p.stat(),))
    key = hashlib.sha256(json.dumps([str(root), stamp]).encode()).hexdigest()
    memo = _read_memo(key)
    if module not in memo:
        memo[module] = _code_version(module, root, stamp)
        _write_memo(key, memo)
    return memo[module]


def memo_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune" / "code-versions.json"


def _read_memo(key: str) -> dict[str, str]:
    try:
        data = json.loads(memo_file().read_text(encoding="utf-8"))
        versions = data["versions"] if data.get("stamp") == key else {}
        return {str(k): str(v) for k, v in versions.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # none yet, another project version's, or damaged: computed again


def _write_memo(key: str, versions: dict[str, str]) -> None:
    """Best effort (a read-only home only costs the parse next time); atomic, so a reader never sees half a file."""
    path = memo_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".code-versions-")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"stamp": key, "versions": versions}, fh)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
