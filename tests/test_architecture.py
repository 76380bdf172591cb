"""The house plan as tests: the import graph has no cycles, layers depend downward only, a stage's cache key
follows the code it runs, and modules and functions stay small enough to read."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("tasks", "flows")
# Lower layers first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    (
        "foundation",
        (
            "tasks.files",
            "tasks.plan",
            "tasks.workspace",
            "tasks.config",
            "tasks.config_base",
            "tasks.code_version",
            "tasks.config_checks",
            "tasks.config_loading",
            "tasks.optimizers",
            "tasks.records",
        ),
    ),
    (
        "sub-packages",
        ("tasks.data", "tasks.model", "tasks.training", "tasks.evaluation", "tasks.release", "tasks.reporting"),
    ),
    ("stages", ("tasks.caching", "tasks.stages", "tasks.runner")),
    ("flows", ("flows",)),
    ("cli", ("tasks.cli",)),
]
SUBPACKAGES = LAYERS[1][1]


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            if not (path.parent / "__init__.py").exists():  # evaluate metric scripts loaded by path
                continue
            if path.name != "__main__.py" and _module_name(path) != "tasks":  # the empty top-level package
                out[_module_name(path)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports, anywhere in the file (function-level imports count too)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                ]
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _package(module: str) -> str:
    return next((p for p in SUBPACKAGES if module == p or module.startswith(p + ".")), module)


def test_the_module_import_graph_has_no_cycles():
    assert _cycles(import_graph()) == []


def test_layers_depend_downward_only():
    upward = [(m, d) for m, deps in import_graph().items() for d in deps if _layer(d) > _layer(m)]
    assert upward == [], "imports that point up a layer: " + ", ".join(f"{m} -> {d}" for m, d in upward)


def test_sub_packages_form_no_cycle_between_them():
    pkg_graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        if _layer(mod) != 1:
            continue
        pkg_graph.setdefault(_package(mod), set()).update(
            _package(d) for d in deps if _layer(d) == 1 and _package(d) != _package(mod)
        )
    assert _cycles(pkg_graph) == [], pkg_graph


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_functions_stay_readable():
    """DESIGN.md: split a module past ~400 lines and a function past ~80 (the house allows a little slack)."""
    long_modules, long_functions = [], []
    for mod, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 420:
            long_modules.append((mod, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 85:
                long_functions.append((mod, node.name, node.end_lineno - node.lineno + 1))
    assert long_modules == [] and long_functions == []


# ---- cache keys follow the code ---------------------------------------------------------------------------


def _copy_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("edited", ["tasks/training/loop.py", "tasks/model/methods.py", "tasks/plan.py"])
def test_editing_code_the_train_stage_runs_changes_its_code_version(tmp_path, edited):
    """The child's loop is not imported by the stage's module directly (it runs in a subprocess), yet it is part
    of the train stage's code: the closure reaches it through tasks.training.worker."""
    from tasks.code_version import code_version
    from tasks.stages import EVALUATE, TRAIN

    root = _copy_project(tmp_path)
    before = {s.name: code_version(s.module, root) for s in (TRAIN, EVALUATE)}
    with open(root / edited, "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    after = {s.name: code_version(s.module, root) for s in (TRAIN, EVALUATE)}
    assert after["train"] != before["train"]
    if edited == "tasks/training/loop.py":
        assert after["evaluate"] == before["evaluate"]  # evaluation does not run the training loop


def test_a_renamed_module_cannot_drop_out_of_the_code_version(tmp_path):
    """Names come from the code's own imports: rename a module (and its import) and its code still counts."""
    from tasks.code_version import code_version, import_closure

    root = _copy_project(tmp_path)
    assert "tasks.training.session" in import_closure("tasks.training.launch", root)
    (root / "tasks/training/session.py").rename(root / "tasks/training/state.py")
    for f in (root / "tasks/training").glob("*.py"):
        f.write_text(f.read_text().replace("tasks.training.session", "tasks.training.state"))
    closure = import_closure("tasks.training.launch", root)
    assert "tasks.training.state" in closure and "tasks.training.session" not in closure
    before = code_version("tasks.training.launch", root)
    with open(root / "tasks/training/state.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    assert code_version("tasks.training.launch", root) != before


def test_code_versions_are_read_back_from_disk_until_a_file_changes(tmp_path, monkeypatch):
    """A fully cached rerun must not parse the project again: a second process (here: emptied in-process caches)
    reads the versions back; an edit changes the stamp, and the version is computed anew."""
    import ast

    from tasks import code_version as cv

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _copy_project(tmp_path)
    first = cv.code_version("tasks.training.launch", root)
    assert cv.memo_file().is_file()
    cv._code_version.cache_clear(), cv._project_imports.cache_clear()

    def no_parse(*a, **k):
        raise AssertionError("parsed again although no file changed")

    monkeypatch.setattr(ast, "parse", no_parse)
    assert cv.code_version("tasks.training.launch", root) == first
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with open(root / "tasks/training/loop.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    assert cv.code_version("tasks.training.launch", root) != first
    cv.memo_file().write_text("{not json")  # a damaged memo is recomputed, never an error
    assert cv.code_version("tasks.training.launch", root) != first


def test_metric_modules_loaded_by_path_count_for_the_evaluation_stage(tmp_path):
    from tasks.code_version import code_version

    root = _copy_project(tmp_path)
    before = code_version("tasks.evaluation.evaluate", root)
    with open(root / "tasks/evaluation/metrics/classification/classification.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    assert code_version("tasks.evaluation.evaluate", root) != before
