"""Several adapter versions on one base (`finetune predict --model a --model b`): two LoRA versions of the tiny BERT,
exported (merged + the adapter alone) and registered, scored together with the base loaded once; each version's
columns must equal what predicting with that version alone gives. Versions that cannot share a base are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_csv
from test_export import TEXTS, make_config, make_eval, make_prepared, make_run


def _register(ws: Path, run: Path, name: str, method: str, value: float):
    from tasks.release.export import export_run
    from tasks.release.registry import register_version

    cfg = make_config(ws, method)
    cfg.registry.name = name
    evald = make_eval(ws, run, value, tag=name)
    return register_version(cfg, export_run(cfg, str(run), str(evald)).path, str(evald))


def _other_bert(tiny_bert: Path, dest: Path) -> Path:
    """The tiny BERT's architecture and tokenizer with other weights: another base (another fingerprint)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    shutil.copytree(tiny_bert, dest)
    torch.manual_seed(11)
    BertModel(BertConfig.from_pretrained(tiny_bert)).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_bert):
    ws = tmp_path_factory.mktemp("multi-ws")
    other = _other_bert(tiny_bert, tmp_path_factory.mktemp("other") / "bert")
    prepared = make_prepared(ws)
    _register(ws, make_run(ws, tiny_bert, prepared, "lora", steps=40, seed=1), "sentiment", "lora", 0.9)
    _register(ws, make_run(ws, tiny_bert, prepared, "lora", steps=40, seed=2), "sentiment", "lora", 0.5)
    _register(ws, make_run(ws, tiny_bert, prepared, "lora", steps=20, seed=3), "topic", "lora", 0.8)
    _register(ws, make_run(ws, tiny_bert, prepared, "full", steps=10, seed=4), "fullft", "full", 0.8)
    _register(ws, make_run(ws, other, prepared, "lora", steps=10, seed=5), "other", "lora", 0.8)
    return ws


def _csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS * 2)])


def test_each_version_predicts_on_the_shared_base_what_it_predicts_alone(registry, tmp_path):
    from tasks.release.multi_adapter import predict_many
    from tasks.release.predict import predict_file

    refs = ["sentiment@1", "sentiment@2", "topic"]
    src = _csv(tmp_path)
    r = predict_many(registry, refs, src, tmp_path / "together.csv", batch_size=4, progress=False)
    assert r.models == ["sentiment@1", "sentiment@2", "topic@1"] and r.rows == len(TEXTS) * 2
    together = pd.read_csv(r.path, dtype=str)
    labels = ["sentiment@1", "sentiment@2", "topic@1"]
    assert list(together.columns) == ["id", "text"] + [f"{m}_{c}" for m in labels for c in ("prediction", "score")]
    for ref, label in zip(refs, labels, strict=True):
        alone = pd.read_csv(predict_file(registry, ref, src, tmp_path / f"{label}.csv", progress=False).path, dtype=str)
        assert together[f"{label}_prediction"].tolist() == alone["prediction"].tolist()
        np.testing.assert_allclose(
            together[f"{label}_score"].astype(float), alone["score"].astype(float), rtol=0, atol=1e-5
        )
    # the adapters really switch: the three versions do not score alike
    scores = [together[f"{m}_score"].astype(float).to_numpy() for m in labels]
    assert not np.allclose(scores[0], scores[1]) and not np.allclose(scores[1], scores[2])
    summary = json.loads(Path(r.summary).read_text())
    mem = summary["memory"]
    assert summary["models"] == labels and mem == r.memory and mem["models"] == 3
    assert mem["base_bytes"] > 0 and mem["saved_bytes"] == 2 * mem["base_bytes"]
    assert 0 < mem["adapters_bytes"] < mem["base_bytes"]  # three adapters (+ head copies) are smaller than the base
    assert mem["shared_bytes"] == mem["base_bytes"] + mem["adapters_bytes"] < mem["separate_bytes"]


@pytest.mark.parametrize(
    ("refs", "needle"),
    [
        (["sentiment@1", "fullft"], r"fullft@1 \(method full\) kept no adapter.*on its own \(one --model\)"),
        (["sentiment@1", "other"], r"differ in base model.*sentiment@1: .*other@1: .*once per group"),
        (["sentiment@1", "sentiment@1"], "the same version twice"),
        (["sentiment@1", "sentiment@7"], "no version 7"),
    ],
)
def test_versions_that_cannot_share_a_base_are_refused(registry, tmp_path, refs, needle):
    from tasks.release.multi_adapter import predict_many
    from tasks.release.predict import PredictError
    from tasks.workspace import RegistryError

    with pytest.raises((PredictError, RegistryError), match=needle):
        predict_many(registry, refs, _csv(tmp_path), tmp_path / "o.csv", progress=False)
    assert not (tmp_path / "o.csv").exists()


def test_cli_predict_with_two_models_reports_the_memory_saved(registry, tmp_path):
    import typer
    from typer.testing import CliRunner

    from tasks.cli.registry import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "p.csv"
    args = ["predict", "-m", "sentiment@1", "-m", "sentiment@2", "-i", str(_csv(tmp_path)), "-o", str(out)]
    res = CliRunner().invoke(app, [*args, "--workspace", str(registry), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "12 rows scored with sentiment@1, sentiment@2 on one base" in res.output
    assert "MB saved against loading each alone" in res.output and (tmp_path / "p.summary.json").is_file()
    bad = CliRunner().invoke(app, [*args[:3], "-m", "fullft", *args[5:], "--workspace", str(registry)])
    assert bad.exit_code == 2 and "kept no adapter" in bad.output
