"""Evaluation stage: score a trained run on the held-out test split (never seen in training), next to
majority and TF-IDF baselines, and write `<workspace>/evaluations/<key>/` atomically:
metrics.json, predictions.parquet, confusion_matrix.png/.md (regression: predictions_scatter.png),
report.md (and loss_curve.png when the run has a metrics.jsonl).

Validation is used only to tune multi-label thresholds. The folder is content-addressed (run key,
run facts, model files, evaluation settings, code version) and reused when it exists.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import RunConfig
from tasks.files import atomic_dir, read_json, sha256_file, sha256_json, sha256_tree, write_json
from tasks.metrics import (
    compute_metrics, higher_is_better, is_better, load_extra_metric, metric_details, predictions_from_scores,
    primary_metric, tune_thresholds, MetricError, MIN_POSITIVES_PER_LABEL, THRESHOLD_GRID,
)

EVAL_VERSION = "1"

__all__ = ["EvalResult", "evaluate_run", "predict_scores", "compute_metrics", "evaluation_key"]


@dataclass
class EvalResult:
    path: str
    primary_metric: str
    primary_value: float | None
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    beats_tfidf: bool | None  # None when baselines are off (evaluation.baselines: false)
    key: str = ""
    reused: bool = False
    warnings: list[str] = field(default_factory=list)


def predict_scores(model, tokenizer, texts, text_pairs=None, task: str = "single_label", batch_size: int = 64,
                   max_length: int = 512) -> np.ndarray:
    """Probabilities (n, K) for classification (softmax / sigmoid), values (n,) for regression.

    Texts are tokenized once, batched by token length (longest first: less padding, and an out-of-memory
    shows in the first batch) and the results put back in input order.
    """
    import torch

    texts = [str(t) for t in texts]
    n = len(texts)
    num_labels = int(getattr(model.config, "num_labels", 1))
    if n == 0:
        return np.zeros(0) if task == "regression" else np.zeros((0, num_labels))
    args = (texts, [str(t) for t in text_pairs]) if text_pairs is not None else (texts,)
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = set(inspect.signature(base.forward).parameters)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and k in accepted]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = pad_id  # decoder heads find the last real token through it
    left = getattr(tokenizer, "padding_side", "right") == "left"
    lengths = np.array([len(x) for x in enc["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    device = next(model.parameters()).device
    out = np.zeros((n, num_labels), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            width = int(lengths[idx].max())
            batch = {}
            for k in keys:
                fill = pad_id if k == "input_ids" else 0
                rows = [list(enc[k][i]) for i in idx]
                rows = [[fill] * (width - len(r)) + r if left else r + [fill] * (width - len(r)) for r in rows]
                batch[k] = torch.tensor(rows, dtype=torch.long, device=device)
            if "attention_mask" in accepted and "attention_mask" not in batch:
                real = [[1] * int(lengths[i]) for i in idx]
                batch["attention_mask"] = torch.tensor(
                    [[0] * (width - len(r)) + r if left else r + [0] * (width - len(r)) for r in real], device=device)
            logits = model(**batch).logits.float()
            if task == "single_label":
                probs = torch.softmax(logits, dim=-1)
            elif task == "multi_label":
                probs = torch.sigmoid(logits)
            else:
                probs = logits
            out[idx] = probs.cpu().numpy().reshape(len(idx), -1)
    return out[:, 0] if task == "regression" else out


def _model_stamp(run: Path) -> str:
    files = [run / "run_info.json", run / "training_summary.json"]
    stamp = {f.name: sha256_file(f) for f in files if f.is_file()}
    if (run / "model").is_dir():
        stamp["model"] = sha256_tree(run / "model")
    return sha256_json(stamp)


def evaluation_key(cfg: RunConfig, run_dir: str | Path) -> str:
    """Run folder key + the run's facts and model files + evaluation settings + code version."""
    run = Path(run_dir)
    payload = {
        "run": run.name, "model": _model_stamp(run), "evaluation": cfg.evaluation.model_dump(mode="json"),
        "max_length": cfg.data.max_length, "version": EVAL_VERSION,
    }
    info = run / "run_info.json"
    if info.is_file() and read_json(info).get("task") == "multi_label":  # tuned thresholds come from this grid
        payload["threshold_grid"] = [list(THRESHOLD_GRID), MIN_POSITIVES_PER_LABEL]
    return sha256_json(payload)[:20]


def _load_model(run_dir: str, device: str):
    from tasks.modeling import load_trained_model

    return load_trained_model(run_dir, device=device)


def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _result(final: Path, reused: bool) -> EvalResult:
    m = read_json(final / "metrics.json")
    metrics = {k: float(v) for k, v in m["metrics"].items() if isinstance(v, (int, float))}
    base = {n: {k: float(v) for k, v in b["metrics"].items() if isinstance(v, (int, float))}
            for n, b in m.get("baselines", {}).items()}
    return EvalResult(str(final), m["primary_metric"], m["metrics"].get(m["primary_metric"]), metrics, base,
                      m["comparison"].get("beats_tfidf"), final.name, reused, m.get("warnings", []))


def compare(primary: str, value: float | None, baselines: dict[str, dict]) -> dict:
    """How the model stands against each baseline on the primary metric (delta = model - baseline)."""
    out = {"primary_metric": primary, "higher_is_better": higher_is_better(primary), "model": value, "baselines": {}}
    for name, b in baselines.items():
        bv = b["metrics"].get(primary)
        if value is None or bv is None:
            out["baselines"][name] = {"value": bv, "delta": None, "model_beats": None}
            continue
        out["baselines"][name] = {"value": bv, "delta": value - bv, "model_beats": not is_better(bv, value, primary)}
    tf = out["baselines"].get("tfidf")
    out["beats_tfidf"] = None if tf is None else tf["model_beats"]
    return out


def _extra_metrics(names: list[str], task: str, y_true, pred) -> tuple[dict, list[str]]:
    results, warnings = {}, []
    refs = y_true.tolist() if isinstance(y_true, np.ndarray) else list(y_true)
    for name in names:
        try:
            metric = load_extra_metric(name)
            results[name] = {"values": _clean(metric.compute(predictions=np.asarray(pred).tolist(), references=refs))}
        except Exception as exc:  # noqa: BLE001 - reported, the evaluation goes on
            msg = str(exc) if isinstance(exc, MetricError) else f"extra metric '{name}' failed: {type(exc).__name__}: {exc}"
            results[name] = {"error": msg}
            warnings.append(msg)
    return results, warnings


def _predictions_frame(test, task: str, labels: list[str], scores: np.ndarray, pred: np.ndarray):
    import pandas as pd

    cols = ["id", "text"] + (["text_pair"] if "text_pair" in test else []) + ["label"]
    df = test[cols + (["label_name"] if "label_name" in test else [])].copy()
    if task == "single_label":
        df["prediction"] = pred.astype("int64")
        df["prediction_name"] = [labels[i] for i in pred]
        df["scores"] = [row.astype("float32").tolist() for row in scores]
    elif task == "multi_label":
        df["prediction"] = [row.astype("int64").tolist() for row in pred]
        df["predicted_labels"] = [[labels[j] for j in np.flatnonzero(row)] for row in pred]
        df["scores"] = [row.astype("float32").tolist() for row in scores]
    else:
        df["prediction"] = pred.astype("float32")
        df["scores"] = scores.astype("float32")
    return pd.DataFrame(df).reset_index(drop=True)


def evaluate_run(cfg: RunConfig, run_dir: str) -> EvalResult:
    """Score the run's best model on the test split, with baselines; write or reuse the evaluation folder."""
    from tasks.data import load_split
    from tasks.metrics.report import confusion_table, render_report
    from tasks.plots import confusion_matrix_png, loss_curve_png, multilabel_matrix_png, regression_scatter_png

    t0 = time.perf_counter()
    run = Path(run_dir).resolve()
    if not (run / "run_info.json").is_file():
        raise FileNotFoundError(f"{run} has no run_info.json; fix: point at a finished training run folder")
    info = read_json(run / "run_info.json")
    prepared = Path(info["prepared_path"])
    manifest = read_json(prepared / "manifest.json")
    task, labels = manifest["task"], manifest["labels"]
    primary = primary_metric(task, cfg.evaluation.primary_metric, len(labels))
    key = evaluation_key(cfg, run)
    final = cfg.workspace_path() / "evaluations" / key
    if (final / "metrics.json").is_file():
        return _result(final, reused=True)

    import torch

    test = load_split(prepared, "test")
    pairs = "text_pair" in test
    model, tokenizer = _load_model(str(run), "cuda" if torch.cuda.is_available() else "cpu")
    expected = 1 if task == "regression" else len(labels)
    if int(model.config.num_labels) != expected:
        raise ValueError(f"the model in {run} has {model.config.num_labels} outputs but the data has {expected} "
                         f"label(s) ({task}); fix: evaluate the run trained on this dataset")
    bs, ml = cfg.evaluation.batch_size, cfg.data.max_length

    def score(df):
        return predict_scores(model, tokenizer, df["text"].tolist(), df["text_pair"].tolist() if pairs else None,
                              task=task, batch_size=bs, max_length=ml)

    t_pred = time.perf_counter()
    scores = score(test)
    pred_seconds = time.perf_counter() - t_pred
    thresholds, val_info = None, None
    y_test = test["label"].tolist()
    if task == "multi_label":
        val = load_split(prepared, "validation")
        if not len(val):
            raise ValueError(f"{prepared} has an empty validation split; multi-label thresholds are tuned on it")
        val_scores = score(val)
        thresholds = tune_thresholds(val["label"].tolist(), val_scores)
        val_info = {"tuned": compute_metrics(task, labels, val["label"].tolist(), val_scores, thresholds),
                    "at_0.5": compute_metrics(task, labels, val["label"].tolist(), val_scores)}
    del model
    details = metric_details(task, labels, y_test, scores, thresholds)
    metrics = details["metrics"]
    if task == "multi_label":
        at_half = compute_metrics(task, labels, y_test, scores)
        metrics.update({f"{k}_at_0.5": at_half.get(k) for k in ("f1_micro", "f1_macro")})
    pred = predictions_from_scores(task, scores, thresholds)

    warnings: list[str] = []
    baselines = {}
    if cfg.evaluation.baselines:
        from tasks.baselines import score_baselines

        baselines = score_baselines(prepared)
    comparison = compare(primary, metrics.get(primary), baselines)
    if comparison["beats_tfidf"] is False:
        tf = comparison["baselines"]["tfidf"]
        warnings.append(
            f"WARNING: the fine-tuned model LOSES to the TF-IDF baseline on {primary}: "
            f"{metrics.get(primary):.4f} vs {tf['value']:.4f} ({tf['delta']:+.4f}); do not ship it without a look "
            "(more epochs, another learning rate or base model, or more data)")
    if metrics.get(primary) is None:
        warnings.append(f"WARNING: primary metric {primary} is undefined on this test split (see metrics.json)")
    extra, extra_warn = _extra_metrics(cfg.evaluation.extra_metrics, task, y_test if task != "multi_label"
                                       else (np.stack(y_test) >= 0.5).astype(int), pred)
    warnings += [f"WARNING: {w}" for w in extra_warn]

    doc = {
        "task": task, "split": "test", "rows": len(test), "primary_metric": primary,
        "metrics": metrics, "per_class": details.get("per_class", {}),
        "confusion_matrix": details.get("confusion_matrix"), "baselines": baselines, "comparison": comparison,
        "extra_metrics": extra, "warnings": warnings,
        "run": {"path": str(run), "key": run.name, "method": info.get("method"), "base_model": info.get("base_model"),
                "dataset_fingerprint": manifest["fingerprint"], "prepared_path": str(prepared)},
        "evaluation": cfg.evaluation.model_dump(mode="json"), "key": key, "eval_version": EVAL_VERSION,
        "prediction_seconds": round(pred_seconds, 3), "texts_per_second": round(len(test) / max(pred_seconds, 1e-9), 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if task == "multi_label":
        doc["thresholds"] = {"tuned_on": "validation",
                             "grid": f"{min(THRESHOLD_GRID):g}..{max(THRESHOLD_GRID):g} ({len(THRESHOLD_GRID)} values), "
                                     f"per-label F1; labels with under {MIN_POSITIVES_PER_LABEL} validation positives "
                                     "share the threshold that maximizes micro-F1",
                             "per_label": dict(zip(labels, thresholds.tolist())), "validation": val_info,
                             "test_at_0.5": at_half}
    with atomic_dir(final) as tmp:
        _predictions_frame(test, task, labels, scores, pred).to_parquet(tmp / "predictions.parquet", index=False)
        images = {}
        cm = details.get("confusion_matrix")
        if task == "single_label":
            images["confusion"] = confusion_matrix_png(cm["matrix"], labels, tmp / "confusion_matrix.png").name
        elif task == "multi_label":
            images["confusion"] = multilabel_matrix_png(cm["matrix"], labels, tmp / "confusion_matrix.png").name
        else:
            images["scatter"] = regression_scatter_png(y_test, pred, tmp / "predictions_scatter.png").name
        if cm is not None:
            (tmp / "confusion_matrix.md").write_text(confusion_table(cm) + "\n", encoding="utf-8")
        if (run / "metrics.jsonl").is_file() and loss_curve_png(run / "metrics.jsonl", tmp / "loss_curve.png"):
            images["loss"] = "loss_curve.png"
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        doc = _clean(doc)
        write_json(tmp / "metrics.json", doc)
        (tmp / "report.md").write_text(render_report(doc, manifest, images), encoding="utf-8")
    return _result(final, reused=False)


def _prefect_task():
    from prefect import task

    @task(name="evaluate", description="Score the trained model on the held-out test split, with baselines.")
    def evaluate_task(cfg: RunConfig, run_dir: str) -> EvalResult:
        """Evaluate a run on the test split and publish the report as a markdown artifact."""
        result = evaluate_run(cfg, run_dir)
        try:
            from prefect.artifacts import create_markdown_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:  # called as .fn() outside a run: no API to publish to
                return result

            from tasks.plots import inline_images

            md = inline_images((Path(result.path) / "report.md").read_text(encoding="utf-8"), result.path)
            create_markdown_artifact(md, key="evaluation-report", description=f"{result.primary_metric} = {result.primary_value}")
        except Exception:  # noqa: BLE001 - the artifact is a convenience, the files are the record
            pass
        return result

    return evaluate_task


def register(app) -> None:
    """Add `finetune evaluate CONFIG RUN_DIR` to the CLI (heavy imports happen inside the command)."""
    import typer

    @app.command("evaluate")
    def evaluate_cmd(
        config: Path = typer.Argument(..., help="Run configuration (YAML)."),
        run_dir: Path = typer.Argument(..., help="Training run folder (<workspace>/runs/<key>)."),
        set_: list[str] = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value."),
    ) -> None:
        """Score a trained run on the held-out test split next to majority and TF-IDF baselines."""
        from tasks.config import ConfigError, load_config

        try:
            cfg = load_config(config, set_ or [])
            result = evaluate_run(cfg, str(run_dir))
        except (ConfigError, MetricError, FileNotFoundError, ValueError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        state = "reused" if result.reused else "written"
        typer.echo(f"evaluation {result.key}: {state}")
        typer.echo(f"  {result.primary_metric}: {result.primary_value}")
        for name, m in result.baselines.items():
            typer.echo(f"  baseline {name}: {result.primary_metric} {m.get(result.primary_metric)}")
        for w in result.warnings:
            typer.secho(w, fg=typer.colors.YELLOW, err=True)
        typer.echo(f"  report: {Path(result.path) / 'report.md'}")
