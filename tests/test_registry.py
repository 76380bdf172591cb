"""Registry: numbered versions, the promotion gate, rollback, forced promotion, two concurrent registrations,
a failed registration leaving nothing, the CLI. Exports here are small folders with the files the registry
checks (it never loads a model); test_predict.py registers a real export."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO


def fake_export(
    ws: Path, value: float, test_fp: str = "T1", metric: str = "f1_macro", tag: str = ""
) -> tuple[Path, Path]:
    from tasks.files import write_json

    name = f"{tag or 'e'}-{value}-{test_fp}-{metric}"
    exp, ev = ws / "exports" / name, ws / "evaluations" / name
    exp.mkdir(parents=True)
    (exp / "model.safetensors").write_bytes(b"weights " + name.encode())
    write_json(exp / "config.json", {"model_type": "bert"})
    write_json(
        exp / "lineage.json",
        {
            "export_key": name,
            "method": "lora",
            "task": "single_label",
            "test_set_fingerprint": test_fp,
            "dataset_fingerprint": "D1",
            "timings": {"total_s": 1.0},
        },
    )
    write_json(
        ev / "metrics.json",
        {
            "task": "single_label",
            "split": "test",
            "primary_metric": metric,
            "metrics": {metric: value},
            # baselines the gate checks (registry.must_beat): well below the values these tests register
            "baselines": {"majority": {"metrics": {metric: 0.1}}, "tfidf": {"metrics": {metric: 0.5}}},
        },
    )
    return exp, ev


def cfg_for(ws: Path, **registry):
    from tasks.config import RunConfig

    return RunConfig(workspace=str(ws), registry={"name": "clf", **registry})


def aliases(ws: Path) -> dict:
    return json.loads((ws / "registry" / "clf" / "aliases.json").read_text())


def test_gate_first_promoted_worse_rejected_better_promoted(workspace):
    from tasks.release.registry import history, list_versions, register_version

    cfg = cfg_for(workspace, min_delta=0.01)
    first = register_version(cfg, *map(str, fake_export(workspace, 0.80)))
    assert (first.version, first.promoted, first.comparison["decision"]) == (1, True, "promote")
    assert "first version" in first.comparison["reason"]

    worse_paths = [str(p) for p in fake_export(workspace, 0.75)]
    worse = register_version(cfg, *worse_paths)
    assert (worse.version, worse.promoted) == (2, False)
    assert worse.comparison["comparable"] and worse.comparison["delta"] == pytest.approx(-0.05)
    assert worse.comparison["champion_version"] == 1 and aliases(workspace)["production"] == 1

    again = register_version(cfg, *worse_paths)
    assert again.version == 2 and again.comparison["already_registered"]  # a retry registers nothing new

    tiny = register_version(cfg, *map(str, fake_export(workspace, 0.805)))  # better, but by less than min_delta
    assert not tiny.promoted and "min_delta" in tiny.comparison["reason"]

    better = register_version(cfg, *map(str, fake_export(workspace, 0.85)))
    assert (better.version, better.promoted) == (4, True) and aliases(workspace)["production"] == 4

    # the comparison is recorded in the version folder and in the history, either way
    gate = json.loads((Path(worse.path) / "gate.json").read_text())
    assert gate["decision"] == "keep" and gate["champion_value"] == 0.80 and gate["promoted"] is False
    events = [(e["event"], e["version"]) for e in history(workspace, "clf")]
    assert events == [
        ("register", 1),
        ("promote", 1),
        ("register", 2),
        ("register", 3),
        ("register", 4),
        ("promote", 4),
    ]
    rows = list_versions(workspace, "clf")
    assert [r["version"] for r in rows if r["production"]] == [4]
    for n in (1, 2, 3, 4):  # each version holds the export (hardlinked), its metrics and lineage
        vdir = workspace / "registry" / "clf" / "versions" / str(n)
        assert {p.name for p in vdir.iterdir()} >= {
            "model",
            "metrics.json",
            "lineage.json",
            "gate.json",
            "version.json",
        }
        assert json.loads((vdir / "lineage.json").read_text())["registry"]["version"] == n


def test_different_test_set_is_not_comparable(workspace):
    from tasks.release.registry import register_version

    register_version(cfg_for(workspace), *map(str, fake_export(workspace, 0.70, "T1")))
    other = register_version(cfg_for(workspace), *map(str, fake_export(workspace, 0.99, "T2")))
    assert not other.promoted and other.comparison["comparable"] is False
    assert "not comparable" in other.comparison["reason"] and aliases(workspace)["production"] == 1
    forced = register_version(
        cfg_for(workspace, promote_if_not_comparable=True), *map(str, fake_export(workspace, 0.60, "T3"))
    )
    assert forced.promoted and aliases(workspace)["production"] == 3


def test_lower_is_better_metric_and_promote_off(workspace):
    from tasks.release.registry import compare, register_version

    champ = {"version": 1, "primary_metric": "rmse", "primary_value": 0.5, "test_set_fingerprint": "T"}
    assert compare({**champ, "primary_value": 0.4}, champ, 0.0)["decision"] == "promote"
    assert compare({**champ, "primary_value": 0.6}, champ, 0.0)["decision"] == "keep"
    r = register_version(cfg_for(workspace, promote=False), *map(str, fake_export(workspace, 0.9)))
    assert not r.promoted and "registry.promote is false" in r.comparison["reason"]


def test_rollback_and_forced_promotion(workspace):
    from tasks.release.registry import RegistryError, history, promote, register_version, rollback

    cfg = cfg_for(workspace)
    for v in (0.6, 0.7, 0.65):  # v1 promoted, v2 promoted, v3 rejected
        register_version(cfg, *map(str, fake_export(workspace, v)))
    assert aliases(workspace)["production"] == 2
    assert rollback(workspace, "clf") == {"name": "clf", "production": 1, "previous": 2}
    assert aliases(workspace)["production"] == 1
    with pytest.raises(RegistryError, match="no earlier production version"):
        rollback(workspace, "clf")
    promote(workspace, "clf", 3, reason="hotfix")  # forced past the gate
    assert aliases(workspace)["production"] == 3
    assert rollback(workspace, "clf")["production"] == 1
    with pytest.raises(RegistryError, match="no version 9"):
        promote(workspace, "clf", 9)
    assert [e["event"] for e in history(workspace, "clf")][-3:] == ["rollback", "promote", "rollback"]


def test_failed_registration_leaves_nothing(workspace, monkeypatch):
    from tasks.release import registry
    from tasks.release.registry import RegistryError, register_version

    exp, ev = fake_export(workspace, 0.8)
    (exp / "lineage.json").unlink()  # an export that did not finish
    with pytest.raises(RegistryError, match="incomplete"):
        register_version(cfg_for(workspace), str(exp), str(ev))
    assert not (workspace / "registry" / "clf" / "versions").exists()

    exp2, ev2 = fake_export(workspace, 0.8, tag="ok")

    def crash(src, dst):  # dies half-way through copying the model
        (dst / "half.bin").parent.mkdir(parents=True, exist_ok=True)
        (dst / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(registry, "_link_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        register_version(cfg_for(workspace), str(exp2), str(ev2))
    vdir = workspace / "registry" / "clf" / "versions"
    assert list(vdir.iterdir()) == [] and not (workspace / "registry" / "clf" / "aliases.json").exists()
    monkeypatch.undo()
    assert register_version(cfg_for(workspace), str(exp2), str(ev2)).version == 1


CONCURRENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tasks.release import registry
from tasks.config import RunConfig
slow = registry._link_tree
def link_slowly(src, dst):  # widen the critical section: without the lock both would take the same number
    time.sleep(1.0)
    slow(src, dst)
registry._link_tree = link_slowly
while time.time() < float(sys.argv[5]):
    time.sleep(0.005)
cfg = RunConfig(workspace=sys.argv[2], registry={"name": "clf"})
r = registry.register_version(cfg, sys.argv[3], sys.argv[4])
print(r.version, r.promoted)
"""


def test_two_concurrent_registrations_get_distinct_versions(workspace):
    from tasks.release.registry import history, list_versions

    a, b = fake_export(workspace, 0.70, tag="a"), fake_export(workspace, 0.80, tag="b")
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(REPO), str(workspace), str(e), str(v), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for e, v in (a, b)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    versions = sorted(int(o[0].split()[0]) for o in outs)
    assert versions == [1, 2]
    rows = list_versions(workspace, "clf")
    assert sorted(r["export_key"] for r in rows) == sorted(p[0].name for p in (a, b))
    prod = [r for r in rows if r["production"]]
    assert len(prod) == 1 and prod[0]["primary_value"] == 0.80  # whichever order, the better one holds production
    assert sorted(e["version"] for e in history(workspace, "clf") if e["event"] == "register") == [1, 2]
    assert not [p for p in (workspace / "registry" / "clf" / "versions").iterdir() if p.name.startswith(".")]


def test_cli_list_show_promote_rollback(workspace):
    import typer
    from typer.testing import CliRunner

    from tasks.cli.registry import register
    from tasks.release.registry import register_version

    for v in (0.6, 0.7):
        register_version(cfg_for(workspace), *map(str, fake_export(workspace, v)))
    app = typer.Typer()
    register(app)
    run = CliRunner().invoke
    w = ["--workspace", str(workspace)]
    res = run(app, ["registry", "list", *w])
    assert res.exit_code == 0 and res.output.strip() == "clf"
    res = run(app, ["registry", "list", "clf", *w])
    assert res.exit_code == 0 and "* " in res.output.splitlines()[2] and res.output.splitlines()[2].split()[1] == "2"
    res = run(app, ["registry", "show", "clf", *w])
    assert res.exit_code == 0 and json.loads(res.output)["version"] == 2
    res = run(app, ["registry", "rollback", "clf", *w])
    assert res.exit_code == 0 and "version 1" in res.output and aliases(workspace)["production"] == 1
    res = run(app, ["registry", "promote", "clf", "2", *w])
    assert res.exit_code == 0 and aliases(workspace)["production"] == 2
    res = run(app, ["registry", "show", "nope", *w])
    assert res.exit_code == 2 and "no registered model 'nope'" in res.output
    res = run(app, ["registry", "show", "clf", "7", *w])
    assert res.exit_code == 2 and "no version 7" in res.output


def test_registry_module_imports_no_torch():
    code = "import sys, tasks.release.registry, tasks.cli.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
