"""Evaluation stage: score a trained run on the held-out test split (never seen in training), next to
majority and TF-IDF baselines, and write `<workspace>/evaluations/<key>/` atomically:
metrics.json, predictions.parquet, confusion_matrix.png/.md (regression: predictions_scatter.png),
report.md (and loss_curve.png when the run has a metrics.jsonl).

Validation is used only to tune multi-label thresholds. The folder is content-addressed: the run's key (which
fixes its inputs), a stamp of its model/ folder (each file's size and modification time: a retrained model is
a new stamp), the evaluation settings and the threshold grid. No weight file is read to compute the key.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tasks.config import BUNDLED_MODEL, RunConfig
from tasks.data.sources import load_split
from tasks.evaluation.keys import EVAL_VERSION, MIN_POSITIVES_PER_LABEL, THRESHOLD_GRID, evaluation_key
from tasks.evaluation.metrics import (
    MetricError,
    compute_metrics,
    load_extra_metric,
    metric_details,
    predictions_from_scores,
    primary_metric,
    tune_thresholds,
)
from tasks.evaluation.records import clean, compare
from tasks.evaluation.scoring import predict_scores
from tasks.files import atomic_dir, write_json
from tasks.plan import RunPlan
from tasks.records import EvalResult
from tasks.workspace import Workspace, read_facts


def base_model_facts(plan: RunPlan) -> dict:
    """The base model as records that leave this machine name it: its Hub id, or a local folder's name (the
    bundled model: its config name), with its fingerprint; never a local path."""
    name, fp = plan.base_model_name, plan.base_model_fingerprint
    if name == BUNDLED_MODEL:
        return {"name": name, "source": "bundled", "hub_id": None, "fingerprint": fp}
    if Path(plan.base_model).is_absolute():  # resolved local folder (tasks/model/base.py resolve_model)
        return {"name": Path(plan.base_model).name, "source": "local folder", "hub_id": None, "fingerprint": fp}
    return {"name": plan.base_model, "source": "hub", "hub_id": plan.base_model, "fingerprint": fp}


def portable_path(ws: Workspace, path: str | Path) -> str:
    """A path as records that leave this machine name it: relative to the workspace, else only its last part."""
    if not str(path):
        return ""
    rel = ws.relative(path)
    return Path(path).name if Path(rel).is_absolute() else rel


def _result(final: Path, reused: bool) -> EvalResult:
    m = read_facts(final / "metrics.json", "evaluation")
    metrics = {k: float(v) for k, v in m["metrics"].items() if isinstance(v, (int, float))}
    base = {
        n: {k: float(v) for k, v in b["metrics"].items() if isinstance(v, (int, float))}
        for n, b in m.get("baselines", {}).items()
    }
    return EvalResult(
        str(final),
        m["primary_metric"],
        m["metrics"].get(m["primary_metric"]),
        metrics,
        base,
        m["comparison"].get("beats_tfidf"),
        final.name,
        reused,
        m.get("warnings", []),
    )


def _extra_metrics(names: list[str], y_true, pred, trust_code: bool = False) -> tuple[dict, list[str]]:
    """evaluation.extra_metrics on the test predictions; a metric that cannot load or compute is reported."""
    results, warnings = {}, []
    refs = y_true.tolist() if isinstance(y_true, np.ndarray) else list(y_true)
    for name in names:
        try:
            metric = load_extra_metric(name, trust_code)
            results[name] = {"values": clean(metric.compute(predictions=np.asarray(pred).tolist(), references=refs))}
        except Exception as exc:  # noqa: BLE001 - reported, the evaluation goes on
            msg = (
                str(exc)
                if isinstance(exc, MetricError)
                else f"extra metric '{name}' failed: {type(exc).__name__}: {exc}"
            )
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


def _score_splits(plan: RunPlan, run: Path, test, cfg: RunConfig) -> dict:
    """Test scores (and, multi-label, validation scores with tuned thresholds) from the run's best model."""
    from tasks.model.loading import load_trained_model

    model, tokenizer = load_trained_model(run)
    if int(model.config.num_labels) != plan.num_labels:
        raise ValueError(
            f"the model in {run} has {model.config.num_labels} outputs but the data has {plan.num_labels} "
            f"label(s) ({plan.task}); fix: evaluate the run trained on this dataset"
        )

    def score(df):
        return predict_scores(
            model,
            tokenizer,
            df["text"].tolist(),
            df["text_pair"].tolist() if "text_pair" in df else None,
            task=plan.task,
            batch_size=cfg.evaluation.batch_size,
            max_length=plan.max_length,
        )

    t_pred = time.perf_counter()
    out = {"scores": score(test), "thresholds": None, "validation": None}
    out["seconds"] = time.perf_counter() - t_pred
    if plan.task == "multi_label":
        val = load_split(plan.prepared_path, "validation")
        if not len(val):
            raise ValueError(
                f"{plan.prepared_path} has an empty validation split; multi-label thresholds are tuned on it"
            )
        val_scores, y_val = score(val), val["label"].tolist()
        out["thresholds"] = tune_thresholds(y_val, val_scores)
        out["validation"] = {
            "tuned": compute_metrics(plan.task, plan.labels, y_val, val_scores, out["thresholds"]),
            "at_0.5": compute_metrics(plan.task, plan.labels, y_val, val_scores),
        }
    return out


def _warnings(primary: str, metrics: dict, comparison: dict) -> list[str]:
    warnings = []
    if comparison["beats_tfidf"] is False:
        tf = comparison["baselines"]["tfidf"]
        warnings.append(
            f"WARNING: the fine-tuned model {'only TIES' if tf.get('tie') else 'LOSES to'} the TF-IDF baseline on {primary}: "
            f"{metrics.get(primary):.4f} vs {tf['value']:.4f} ({tf['delta']:+.4f}); do not ship it without a look "
            "(more epochs, another learning rate or base model, or more data)"
        )
    if metrics.get(primary) is None:
        warnings.append(f"WARNING: primary metric {primary} is undefined on this test split (see metrics.json)")
    return warnings


def _threshold_doc(labels: list[str], scored: dict, at_half: dict) -> dict:
    return {
        "tuned_on": "validation",
        "grid": f"{min(THRESHOLD_GRID):g}..{max(THRESHOLD_GRID):g} ({len(THRESHOLD_GRID)} values), per-label F1; "
        f"labels with under {MIN_POSITIVES_PER_LABEL} validation positives share the threshold that "
        "maximizes micro-F1",
        "per_label": dict(zip(labels, scored["thresholds"].tolist(), strict=False)),
        "validation": scored["validation"],
        "test_at_0.5": at_half,
    }


def _write(
    final: Path, doc: dict, plan: RunPlan, run: Path, test, scored: dict, pred, details: dict, t0: float
) -> None:
    from tasks.evaluation.report import confusion_table, render_report
    from tasks.reporting.plots import (
        confusion_matrix_png,
        loss_curve_png,
        multilabel_matrix_png,
        regression_scatter_png,
    )

    task, labels, y_test = plan.task, plan.labels, test["label"].tolist()
    with atomic_dir(final) as tmp:
        _predictions_frame(test, task, labels, scored["scores"], pred).to_parquet(
            tmp / "predictions.parquet", index=False
        )
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
        doc = clean(doc)
        write_json(tmp / "metrics.json", doc)
        manifest = Workspace.read_dataset(plan.prepared_path).raw
        (tmp / "report.md").write_text(render_report(doc, manifest, images), encoding="utf-8")


def _common(cfg: RunConfig, ws: Workspace, run: Path, plan: RunPlan, key: str) -> dict:
    return {
        "run": {  # no path of this machine: workspace-relative paths, the base model by name + fingerprint
            "path": portable_path(ws, run),
            "key": run.name,
            "method": plan.method,
            "base_model": base_model_facts(plan)["name"],
            "base_model_fingerprint": plan.base_model_fingerprint,
            "dataset_fingerprint": plan.dataset_fingerprint,
            "prepared_path": portable_path(ws, plan.prepared_path),
        },
        "evaluation": cfg.evaluation.model_dump(mode="json"),
        "key": key,
        "eval_version": EVAL_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def evaluate_run(cfg: RunConfig, run_dir: str | Path) -> EvalResult:
    """Score the run's best model on the test split, with baselines; write or reuse the evaluation folder."""
    t0 = time.perf_counter()
    run = Path(run_dir).resolve()
    plan = RunPlan.read(run)
    task, labels = plan.task, plan.labels
    key = evaluation_key(cfg, run)
    ws = Workspace.at(cfg.workspace)
    final = ws.evaluation(key)
    if (final / "metrics.json").is_file():
        return _result(final, reused=True)
    if task == "sft":
        from tasks.evaluation.sft_eval import write_sft_evaluation

        write_sft_evaluation(final, cfg, run, plan, _common(cfg, ws, run, plan, key), t0)
        return _result(final, reused=False)
    primary = primary_metric(task, cfg.evaluation.primary_metric, len(labels))
    test = load_split(plan.prepared_path, "test")
    y_test = test["label"].tolist()
    scored = _score_splits(plan, run, test, cfg)
    details = metric_details(task, labels, y_test, scored["scores"], scored["thresholds"])
    metrics = details["metrics"]
    at_half = compute_metrics(task, labels, y_test, scored["scores"]) if task == "multi_label" else {}
    metrics.update({f"{k}_at_0.5": at_half.get(k) for k in ("f1_micro", "f1_macro") if at_half})
    pred = predictions_from_scores(task, scored["scores"], scored["thresholds"])
    baselines = {}
    if cfg.evaluation.baselines:
        from tasks.evaluation.baselines import score_baselines

        baselines = score_baselines(plan.prepared_path)
    comparison = compare(primary, metrics.get(primary), baselines)
    extra, extra_warn = _extra_metrics(
        cfg.evaluation.extra_metrics,
        y_test if task != "multi_label" else (np.stack(y_test) >= 0.5).astype(int),
        pred,
        cfg.evaluation.trust_metric_code,
    )
    doc = {
        "task": task,
        "split": "test",
        "rows": len(test),
        "primary_metric": primary,
        "metrics": metrics,
        "per_class": details.get("per_class", {}),
        "confusion_matrix": details.get("confusion_matrix"),
        "baselines": baselines,
        "comparison": comparison,
        "extra_metrics": extra,
        "warnings": _warnings(primary, metrics, comparison) + [f"WARNING: {w}" for w in extra_warn],
        **_common(cfg, ws, run, plan, key),
        "prediction_seconds": round(scored["seconds"], 3),
        "texts_per_second": round(len(test) / max(scored["seconds"], 1e-9), 1),
    }
    if task == "multi_label":
        doc["thresholds"] = _threshold_doc(labels, scored, at_half)
    _write(final, doc, plan, run, test, scored, pred, details, t0)
    return _result(final, reused=False)
