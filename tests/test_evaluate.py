"""Evaluation stage end to end on tiny random models: every output file, consistent contents, reuse,
the loud TF-IDF warning, multi-label thresholds, regression, extra metrics; predict_scores ordering."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import WORDS, shared_data, tiny_plan, toy_rows, write_csv

from tasks.config import RunConfig
from tasks.data.prepare import prepare_dataset
from tasks.data.sources import load_split
from tasks.evaluation.evaluate import evaluate_run, evaluation_key, predict_scores
from tasks.evaluation.metrics import METRICS_DIR, MetricError
from tasks.files import read_json

PROBLEM = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


def make_run(workspace: Path, prepared, base: Path, name: str = "run-a", seed: int = 0) -> Path:
    """A 'run folder' per the contract: an untrained classification head on a tiny base, method full."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = workspace / "runs" / name
    n = 1 if prepared.task == "regression" else len(prepared.labels)
    id2label = {i: l for i, l in enumerate(prepared.labels)} if prepared.task != "regression" else None
    torch.manual_seed(seed)
    kwargs = {"id2label": id2label, "label2id": {l: i for i, l in id2label.items()}} if id2label else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=n, problem_type=PROBLEM[prepared.task], **kwargs
    )
    tok = AutoTokenizer.from_pretrained(str(base))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    tiny_plan(
        base,
        prepared.task,
        prepared.labels,
        "full",
        dataset_fingerprint=prepared.fingerprint,
        prepared_path=prepared.path,
    ).write(run)
    return run


def _prepare(tmp_path, workspace, rows, **data):
    src = write_csv(tmp_path / "data.csv", rows)
    cfg = RunConfig(workspace=str(workspace), data={"source": str(src), **data})
    return cfg, prepare_dataset(cfg)


def test_single_label_end_to_end_files_are_consistent_and_tfidf_loss_is_loud(tmp_path, workspace, tiny_bert):
    cfg, prepared = _prepare(tmp_path, workspace, toy_rows(150))
    run = make_run(workspace, prepared, tiny_bert)
    (run / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"type": "step", "step": 1, "epoch": 0.5, "loss": 1.1, "learning_rate": 1e-4},
                {"type": "step", "step": 2, "epoch": 1.0, "loss": 1.0, "learning_rate": 9e-5},
                {"type": "eval", "step": 2, "epoch": 1.0, "val_loss": 1.05, "f1_macro": 0.4},
            ]
        )
        + "\n"
    )
    res = evaluate_run(cfg, str(run))
    out = Path(res.path)
    assert out.parent == workspace / "evaluations" and out.name == res.key
    for f in (
        "metrics.json",
        "predictions.parquet",
        "confusion_matrix.png",
        "confusion_matrix.md",
        "report.md",
        "loss_curve.png",
    ):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic: no temp folder left

    test = load_split(prepared.path, "test")
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == len(test) and preds["id"].tolist() == test["id"].tolist()
    assert preds["text"].tolist() == test["text"].tolist() and preds["label"].tolist() == test["label"].tolist()
    scores = np.stack(preds["scores"].to_numpy())
    assert scores.shape == (len(test), 3) and np.allclose(scores.sum(1), 1, atol=1e-5)
    assert (scores.argmax(1) == preds["prediction"]).all()

    m = read_json(out / "metrics.json")
    assert m["task"] == "single_label" and m["split"] == "test" and m["primary_metric"] == "f1_macro"
    cm = np.array(m["confusion_matrix"]["matrix"])
    assert cm.sum() == len(test) and cm.shape == (3, 3)
    assert cm.sum(1).tolist() == test["label"].value_counts().reindex(range(3), fill_value=0).tolist()
    assert m["metrics"]["accuracy"] == pytest.approx((preds["prediction"] == preds["label"]).mean())
    assert np.trace(cm) == (preds["prediction"] == preds["label"]).sum()
    assert set(m["per_class"]) == set(prepared.labels)
    assert set(m["baselines"]) == {"majority", "tfidf"}
    assert m["baselines"]["tfidf"]["metrics"]["f1_macro"] > 0.9
    tf_per_class = m["baselines"]["tfidf"]["per_class"]  # per-class F1 of a baseline, e.g. the spam-class F1
    assert set(tf_per_class) == set(prepared.labels)
    assert np.mean([c["f1"] for c in tf_per_class.values()]) == pytest.approx(
        m["baselines"]["tfidf"]["metrics"]["f1_macro"]
    )

    # an untrained model loses to TF-IDF on a learnable set: flagged loudly
    assert res.beats_tfidf is False and m["comparison"]["beats_tfidf"] is False
    delta = m["comparison"]["baselines"]["tfidf"]["delta"]
    assert delta == pytest.approx(res.primary_value - m["baselines"]["tfidf"]["metrics"]["f1_macro"]) and delta < 0
    report = (out / "report.md").read_text()
    assert any(line.startswith("WARNING") and "TF-IDF" in line for line in report.splitlines())
    assert "![confusion matrix](confusion_matrix.png)" in report and "![loss curve](loss_curve.png)" in report
    assert prepared.fingerprint in report and "| **f1_macro** |" in report
    table = (out / "confusion_matrix.md").read_text()
    assert f"| total | {' | '.join(str(c) for c in cm.sum(0))} | {len(test)} |" in table

    again = evaluate_run(cfg, str(run))
    assert again.reused and again.path == res.path and again.metrics == res.metrics
    assert again.baselines == res.baselines and again.beats_tfidf is False


def test_key_changes_with_model_and_settings(tmp_path, workspace, tiny_bert):
    cfg, prepared = _prepare(tmp_path, workspace, toy_rows(60))
    run = make_run(workspace, prepared, tiny_bert)
    k1 = evaluation_key(cfg, run)
    assert evaluation_key(cfg, run) == k1
    cfg2 = cfg.model_copy(deep=True)
    cfg2.evaluation.baselines = False
    assert evaluation_key(cfg2, run) != k1
    make_run(workspace, prepared, tiny_bert, seed=1)  # same folder, different weights
    assert evaluation_key(cfg, run) != k1


def test_without_baselines_beats_tfidf_is_unknown(tmp_path, workspace, tiny_bert):
    cfg, prepared = _prepare(tmp_path, workspace, toy_rows(60), split={"validation": 0.2, "test": 0.2})
    cfg.evaluation.baselines = False
    res = evaluate_run(cfg, str(make_run(workspace, prepared, tiny_bert)))
    assert res.baselines == {} and res.beats_tfidf is None
    assert "WARNING" not in (Path(res.path) / "report.md").read_text()


def _multi_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tags = [c for c in ("pos", "neg") if rng.random() < 0.5] or ["neu"]
        words = [w for c in tags for w in rng.choices(WORDS[c], k=3)]
        rows.append({"text": " ".join(words) + f" {i}", "label": "|".join(tags)})
    return rows


def test_multi_label_end_to_end_uses_validation_thresholds(tmp_path, workspace, tiny_bert):
    cfg, prepared = _prepare(tmp_path, workspace, _multi_rows(120), task="multi_label", label_delimiter="|")
    res = evaluate_run(cfg, str(make_run(workspace, prepared, tiny_bert)))
    m = read_json(Path(res.path) / "metrics.json")
    assert res.primary_metric == "f1_micro"
    assert {"f1_micro", "f1_macro", "f1_micro_at_0.5", "f1_macro_at_0.5"} <= set(res.metrics)
    th = m["thresholds"]
    assert th["tuned_on"] == "validation" and set(th["per_label"]) == set(prepared.labels)
    assert th["validation"]["tuned"]["f1_micro"] >= th["validation"]["at_0.5"]["f1_micro"] - 1e-12
    preds = pd.read_parquet(Path(res.path) / "predictions.parquet")
    test = load_split(prepared.path, "test")
    assert len(preds) == len(test)
    t = np.array([th["per_label"][n] for n in prepared.labels])
    scores = np.stack(preds["scores"].to_numpy())
    assert (np.stack(preds["prediction"].to_numpy()) == (scores >= t - 1e-7)).all()
    assert all(sum(r) == len(test) for r in m["confusion_matrix"]["matrix"])
    assert (Path(res.path) / "confusion_matrix.png").is_file()
    assert "## Thresholds (tuned on validation)" in (Path(res.path) / "report.md").read_text()


def test_multi_label_evaluation_key_follows_the_threshold_grid(tmp_path, workspace, tiny_bert, monkeypatch):
    """A multi-label evaluation depends on the grid its thresholds are tuned over: a new grid is a new
    evaluation; a single-label evaluation does not use it and keeps its key."""
    import tasks.evaluation.keys as ev

    ml_cfg, ml = _prepare(tmp_path / "ml", workspace, _multi_rows(60), task="multi_label", label_delimiter="|")
    ml_run = make_run(workspace, ml, tiny_bert, name="run-ml")
    sl_cfg, sl = _prepare(tmp_path, workspace, toy_rows(60))
    sl_run = make_run(workspace, sl, tiny_bert, name="run-sl")
    before = (evaluation_key(ml_cfg, ml_run), evaluation_key(sl_cfg, sl_run))
    monkeypatch.setattr(ev, "THRESHOLD_GRID", (0.25, 0.5, 0.75))
    after = (evaluation_key(ml_cfg, ml_run), evaluation_key(sl_cfg, sl_run))
    assert after[0] != before[0] and after[1] == before[1]


def test_regression_end_to_end(tmp_path, workspace, tiny_bert):
    rng = random.Random(1)
    rows = [
        {
            "text": " ".join(rng.choices(WORDS["pos"], k=k) + rng.choices(WORDS["neu"], k=3)) + f" {i}",
            "label": f"{k + 0.5 * rng.random():.3f}",
        }
        for i, k in enumerate(rng.choices(range(1, 6), k=80))
    ]
    cfg, prepared = _prepare(tmp_path, workspace, rows, class_weighting="none")
    assert prepared.task == "regression"
    res = evaluate_run(cfg, str(make_run(workspace, prepared, tiny_bert)))
    assert res.primary_metric == "r2" and {"mse", "mae", "r2", "pearson", "spearman"} <= set(res.metrics)
    out = Path(res.path)
    assert (out / "predictions_scatter.png").is_file() and not (out / "confusion_matrix.md").exists()
    preds = pd.read_parquet(out / "predictions.parquet")
    test = load_split(prepared.path, "test")
    assert len(preds) == len(test)
    assert res.metrics["mse"] == pytest.approx(float(np.mean((preds["prediction"] - preds["label"]) ** 2)), rel=1e-5)
    assert res.baselines["majority"]["r2"] <= 0.0 + 1e-9  # the train mean explains nothing on test


def test_extra_metrics_computed_or_reported(tmp_path, workspace, tiny_bert):
    cfg, prepared = _prepare(tmp_path, workspace, toy_rows(60), split={"validation": 0.2, "test": 0.2})
    cfg.evaluation.baselines = False
    cfg.evaluation.extra_metrics = [f"{METRICS_DIR / 'classification'}:single_label", "no_such_metric_xyz"]
    cfg.evaluation.trust_metric_code = True  # a folder path and a Hub name run their module's code
    res = evaluate_run(cfg, str(make_run(workspace, prepared, tiny_bert)))
    m = read_json(Path(res.path) / "metrics.json")
    local = m["extra_metrics"][cfg.evaluation.extra_metrics[0]]
    assert local["values"]["accuracy"] == pytest.approx(res.metrics["accuracy"])
    assert "could not be loaded" in m["extra_metrics"]["no_such_metric_xyz"]["error"]
    report = (Path(res.path) / "report.md").read_text()
    assert any(l.startswith("WARNING") and "no_such_metric_xyz" in l for l in report.splitlines())


def test_bad_primary_metric_fails_before_loading_the_model(tmp_path, workspace, tiny_bert):
    cfg, prepared = _prepare(tmp_path, workspace, toy_rows(60))
    cfg.evaluation.primary_metric = "roc_auc"  # three classes: no binary AUC
    with pytest.raises(MetricError, match="roc_auc"):
        evaluate_run(cfg, str(make_run(workspace, prepared, tiny_bert)))
    assert not (workspace / "evaluations").exists()
    from tasks.workspace import WorkspaceError

    with pytest.raises(WorkspaceError, match="plan.json"):
        evaluate_run(cfg, str(workspace / "nowhere"))


@pytest.mark.parametrize("base", ["tiny_bert", "tiny_llama"])
def test_predict_scores_restores_order_and_matches_unbatched(base, request):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.model.base import load_tokenizer

    path = request.getfixturevalue(base)
    tok = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=3).eval()
    model.config.pad_token_id = tok.pad_token_id
    texts = ["good", "bad awful terrible horrible worst boring 7", "table", "great nice happy fine 12 13 14", "sad"]
    batched = predict_scores(model, tok, texts, batch_size=2, max_length=64)
    single = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            enc.pop("token_type_ids", None) if base == "tiny_llama" else None
            single.append(torch.softmax(model(**enc).logits, -1)[0].numpy())
    assert batched.shape == (5, 3)
    assert np.allclose(batched, np.stack(single), atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # different texts, different scores: order is meaningful
    reg = predict_scores(model, tok, texts[:2], task="multi_label", batch_size=8)
    assert reg.shape == (2, 3) and ((reg > 0) & (reg < 1)).all()


def test_predict_scores_with_text_pairs(tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.model.base import load_tokenizer

    tok = load_tokenizer(str(tiny_bert))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2).eval()
    a, b = ["good", "bad bad bad", "table"], ["sad", "nice", "river stone cloud green"]
    got = predict_scores(model, tok, a, b, batch_size=2)
    with torch.inference_mode():
        want = [
            torch.softmax(model(**tok(x, y, return_tensors="pt")).logits, -1)[0].numpy()
            for x, y in zip(a, b, strict=False)
        ]
    assert np.allclose(got, np.stack(want), atol=1e-5)
    assert predict_scores(model, tok, [], task="single_label").shape == (0, 2)


def test_loss_curve_png_and_inline_images(tmp_path):
    from tasks.reporting.plots import inline_images, loss_curve_png, read_metrics_jsonl

    p = tmp_path / "metrics.jsonl"
    recs = [{"type": "step", "step": s, "epoch": s / 10, "loss": 1 / s, "learning_rate": 1e-4} for s in range(1, 11)]
    recs += [
        {"type": "eval", "step": 5, "epoch": 0.5, "val_loss": 0.4, "accuracy": 0.7},
        {"type": "eval", "step": 10, "epoch": 1.0, "val_loss": 0.3, "accuracy": 0.8},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"type": "st')  # a cut-short last line
    steps, evals = read_metrics_jsonl(p)
    assert len(steps) == 10 and len(evals) == 2
    out = loss_curve_png(p, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    assert loss_curve_png(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    md = inline_images("see ![c](curve.png) and ![m](missing.png)", tmp_path)
    assert "data:image/png;base64,iVBOR" in md and "![m](missing.png)" in md


@pytest.mark.slow
def test_real_minilm_on_sms_spam_slice(tmp_path, workspace):
    from tasks.config import ModelConfig
    from tasks.model.base import resolve_model

    path = shared_data("sms_spam")
    cfg = RunConfig(
        workspace=str(workspace),
        data={"source": {"train": str(path / "train.csv"), "test": str(path / "test.csv")}, "max_rows": 600},
    )
    prepared = prepare_dataset(cfg)
    run = make_run(workspace, prepared, Path(resolve_model(ModelConfig())))
    res = evaluate_run(cfg, str(run))
    m = read_json(Path(res.path) / "metrics.json")
    assert m["rows"] == 1114 and sum(map(sum, m["confusion_matrix"]["matrix"])) == 1114
    assert {"roc_auc", "pr_auc", "mcc"} <= set(res.metrics)
    assert res.baselines["tfidf"]["f1_macro"] > 0.85 and res.beats_tfidf is False  # an untrained head loses
    assert m["texts_per_second"] > 0


def test_cli_evaluate_command(tmp_path, workspace, tiny_bert):
    import typer
    import yaml
    from typer.testing import CliRunner

    from tasks.cli.evaluate import register

    src = write_csv(tmp_path / "data.csv", toy_rows(60))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"workspace": str(workspace), "data": {"source": str(src)}, "evaluation": {"baselines": False}})
    )
    cfg = RunConfig.model_validate(yaml.safe_load(cfg_file.read_text()))
    run = make_run(workspace, prepare_dataset(cfg), tiny_bert)
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(cfg_file), str(run)])
    assert res.exit_code == 0, res.output
    assert "f1_macro" in res.output and "written" in res.output
    assert "reused" in runner.invoke(app, ["evaluate", str(cfg_file), str(run)]).output
    bad = runner.invoke(app, ["evaluate", str(cfg_file), str(run), "--set", "evaluation.primary_metric=r2"])
    assert bad.exit_code == 2 and "r2" in bad.output
