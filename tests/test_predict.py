"""`finetune predict`: a real export (LoRA on the tiny BERT, merged and verified) registered, then a CSV
scored with the production model and with NAME@VERSION; clear errors; multi-label output columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import write_csv
from test_export import TEXTS, make_config, make_eval, make_prepared, make_run


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_bert):
    from tasks.release.export import export_run
    from tasks.release.registry import register_version

    ws = tmp_path_factory.mktemp("predict-ws")
    prepared = make_prepared(ws)
    run = make_run(ws, tiny_bert, prepared, "lora")
    cfg = make_config(ws, "lora")
    cfg.registry.name = "sentiment"
    good = export_run(cfg, str(run), str(make_eval(ws, run, 0.9)))
    r1 = register_version(cfg, good.path, str(ws / "evaluations" / f"{run.name}-0.9"))
    run2 = make_run(ws, tiny_bert, prepared, "lora", steps=5, seed=3)  # barely trained: a worse version 2
    worse = export_run(cfg, str(run2), str(make_eval(ws, run2, 0.5)))
    r2 = register_version(cfg, worse.path, str(ws / "evaluations" / f"{run2.name}-0.5"))
    assert (r1.promoted, r2.promoted) == (True, False)
    return ws, good.path, worse.path


def _csv(tmp_path: Path) -> Path:
    rows = [{"id": f"00{i}", "text": t, "note": f"n{i}"} for i, t in enumerate(TEXTS)]
    return write_csv(tmp_path / "in.csv", rows)


def test_predict_csv_with_production_model(registered, tmp_path):
    from transformers import pipeline

    from tasks.release.predict import predict_file

    ws, good, _ = registered
    result = predict_file(ws, "sentiment", _csv(tmp_path), tmp_path / "out" / "pred.csv", batch_size=4, progress=False)
    assert (result.model, result.version, result.rows) == ("sentiment", 1, len(TEXTS))
    out = pd.read_csv(result.path, dtype=str)
    assert list(out.columns) == ["id", "text", "note", "prediction", "score"]
    assert out["id"].tolist() == [f"00{i}" for i in range(len(TEXTS))]  # input kept as written, in order
    expected = [r["label"] for r in pipeline("text-classification", model=good, device="cpu")(TEXTS)]
    assert out["prediction"].tolist() == expected and len(set(expected)) > 1
    assert out["score"].astype(float).between(1 / 3, 1).all()


def test_predict_named_version_and_text_column(registered, tmp_path):
    from tasks.release.predict import predict_file

    ws, _, _ = registered
    src = write_csv(tmp_path / "msgs.csv", [{"message": t} for t in TEXTS])
    r = predict_file(ws, "sentiment@2", src, tmp_path / "o.csv", text_column="message", progress=False)
    assert r.version == 2 and list(pd.read_csv(r.path).columns) == ["message", "prediction", "score"]


def test_predict_errors_are_clear(registered, tmp_path):
    from tasks.release.predict import PredictError, predict_file
    from tasks.release.registry import RegistryError

    ws, _, _ = registered
    src = _csv(tmp_path)
    with pytest.raises(RegistryError, match="no registered model 'nope'.*registered: sentiment"):
        predict_file(ws, "nope", src, tmp_path / "o.csv")
    with pytest.raises(RegistryError, match="no version 5; versions: 1, 2"):
        predict_file(ws, "sentiment@5", src, tmp_path / "o.csv")
    with pytest.raises(PredictError, match="no column 'body'.*id, text, note.*--text-column"):
        predict_file(ws, "sentiment", src, tmp_path / "o.csv", text_column="body")
    with pytest.raises(PredictError, match="does not exist"):
        predict_file(ws, "sentiment", tmp_path / "missing.csv", tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_cli_predict(registered, tmp_path):
    import typer
    from typer.testing import CliRunner

    from tasks.cli.registry import register

    ws, _, _ = registered
    app = typer.Typer()
    register(app)
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            "sentiment",
            "--input",
            str(_csv(tmp_path)),
            "--output",
            str(out),
            "--workspace",
            str(ws),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "6 rows scored with sentiment version 1" in res.output and len(pd.read_csv(out)) == len(TEXTS)
    bad = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            "sentiment@9",
            "--input",
            str(_csv(tmp_path)),
            "--output",
            str(out),
            "--workspace",
            str(ws),
        ],
    )
    assert bad.exit_code == 2 and "no version 9" in bad.output


def test_multi_label_output_has_per_label_scores(tiny_bert, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tasks.release.predict import predict_frame

    torch.manual_seed(0)
    labels = ["anger", "joy", "fear"]
    cfg = BertConfig.from_pretrained(
        tiny_bert,
        num_labels=3,
        problem_type="multi_label_classification",
        id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)},
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "ml")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "ml")
    lineage = {"data": {"text_column": "text", "label_delimiter": ","}, "max_length": 32}
    df = pd.DataFrame({"text": TEXTS * 3})
    first = predict_frame(df, tmp_path / "ml", lineage, None, progress=False)
    # per-label thresholds (as evaluation tunes them) at each label's median score: predictions must follow them
    thresholds = {l: float(first[f"score_{l}"].median()) for l in labels}
    out = predict_frame(df, tmp_path / "ml", lineage, thresholds, progress=False)
    assert list(out.columns) == ["text", "prediction", "score", "score_anger", "score_joy", "score_fear"]
    scores = out[[f"score_{l}" for l in labels]].to_numpy()
    assert np.allclose(out["score"], scores.max(axis=1)) and ((scores > 0) & (scores < 1)).all()
    for row, pred in zip(scores, out["prediction"], strict=False):
        assert pred == ",".join(l for l, s in zip(labels, row, strict=False) if s >= thresholds[l])
    assert out["prediction"].nunique() > 1
