"""What a run shows in the Prefect dashboard: tables, a markdown report with inline PNG pictures
(loss curves, confusion matrix), a training-progress artifact and a link to the registered model.

Building the content is plain functions of the stage folders (testable without Prefect); `publish`
sends them as artifacts with stable keys so versions line up on the Artifacts page.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from tasks.files import read_json
from tasks.reporting.tables import search_rows


def artifact_key(name: str, kind: str) -> str:
    """Prefect artifact keys: lowercase letters, numbers and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{kind}".lower()).strip("-")


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "–" if v is None else str(v)


def metrics_table(evaluation: dict, production: dict | None) -> list[dict]:
    """Rows: metric, fine-tuned, each baseline, production (same test set) side by side."""
    metrics = evaluation.get("metrics", {})
    baselines = evaluation.get("baselines", {})
    prod = (production or {}).get("metrics", {})
    rows = []
    for name, value in metrics.items():
        if not isinstance(value, (int, float)):
            continue
        row = {"metric": name, "fine-tuned": round(float(value), 4)}
        for b, vals in baselines.items():
            vals = vals.get("metrics", vals) if isinstance(vals, dict) else {}
            v = vals.get(name)
            row[b] = round(float(v), 4) if isinstance(v, (int, float)) else None
        row["production"] = round(float(prod[name]), 4) if isinstance(prod.get(name), (int, float)) else None
        rows.append(row)
    return rows


def confusion_rows(evaluation: dict) -> list[dict]:
    cm = evaluation.get("confusion_matrix") or {}
    labels, matrix = cm.get("labels", []), cm.get("matrix", [])
    return [
        {"true \\ predicted": t, **{p: int(c) for p, c in zip(labels, row, strict=False)}}
        for t, row in zip(labels, matrix, strict=False)
    ]


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_none_"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _search(run: Path) -> dict | None:
    return read_json(run / "lr_search.json") if (run / "lr_search.json").exists() else None


def _training_lines(run: Path) -> list[str]:
    plan = read_json(run / "plan.json")
    summary = read_json(run / "training_summary.json") if (run / "training_summary.json").exists() else {}
    lines = [
        "## Training",
        "",
        f"- method **{plan.get('method')}** ({plan.get('method_reason')}), base model `{plan.get('base_model_name')}`",
    ]
    keys = (
        "learning_rate",
        "learning_rate_source",
        "epochs",
        "effective_batch_size",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "warmup_ratio",
        "weight_decay",
        "precision",
    )
    lines += ["- " + ", ".join(f"{k} = {plan[k]}" for k in keys if k in plan)]
    if summary:
        lines += [
            f"- best epoch **{summary.get('best_epoch')}** ({summary.get('best_metric_name')} = "
            f"{_fmt(summary.get('best_metric'))}), epochs run {summary.get('epochs_run')}, stopped early: "
            f"{summary.get('stopped_early')}, {_fmt(summary.get('seconds'))} s"
        ]
    if (run / "loss_curve.png").exists():
        lines += ["", f"![training and validation loss]({png_data_uri(run / 'loss_curve.png')})"]
    lines += [""]
    search = _search(run)
    if search:
        lines += [
            "### Learning-rate search",
            "",
            f"Winner **{search.get('best_rate')}** by validation {search.get('metric')} "
            f"(successive halving, rungs {search.get('rungs')} steps, {_fmt(search.get('seconds'))} s).",
            "",
            _md_table(search_rows(search)),
            "",
        ]
        png = Path(search.get("path") or "") / "curves.png"
        if search.get("path") and png.exists():
            lines += [f"![learning-rate search curves]({png_data_uri(png)})", ""]
    return lines


def run_report(folders: dict[str, str | None], records: dict[str, Any]) -> str:
    """The run's markdown report, with the loss curves and confusion matrix inline as PNG."""
    prepared, run, evaluation = folders.get("prepared"), folders.get("run"), folders.get("evaluation")
    lines = ["# Fine-tuning run", ""]
    if prepared and (Path(prepared) / "manifest.json").exists():
        m = read_json(Path(prepared) / "manifest.json")
        rows = ", ".join(f"{s} {v['rows']}" for s, v in m["splits"].items())
        lines += [
            "## Data",
            "",
            f"- dataset `{m['fingerprint']}`: task **{m['task']}**, {len(m['labels'])} labels; rows: {rows}",
            f"- class weighting `{m['class_weighting']}`",
        ]
        lines += [f"- warning: {w}" for w in m.get("warnings", [])] + [""]
    if run and (Path(run) / "plan.json").exists():
        lines += _training_lines(Path(run))
    if evaluation and (Path(evaluation) / "metrics.json").exists():
        ev = read_json(Path(evaluation) / "metrics.json")
        lines += [
            "## Test metrics (held-out test split)",
            "",
            _md_table(metrics_table(ev, records.get("production_metrics"))),
            "",
        ]
        if ev.get("comparison"):
            lines += [f"- {k}: {_fmt(v)}" for k, v in ev["comparison"].items() if not isinstance(v, dict)] + [""]
        cm_png = Path(evaluation) / "confusion_matrix.png"
        if cm_png.exists():
            lines += ["### Confusion matrix", "", f"![confusion matrix]({png_data_uri(cm_png)})", ""]
    merge = records.get("merge_verification")
    if merge:
        lines += (
            ["## Merge verification", ""]
            + [f"- {k}: {_fmt(v)}" for k, v in merge.items() if not isinstance(v, (dict, list))]
            + [""]
        )
    reg = records.get("registry")
    if reg:
        lines += [
            "## Registry",
            "",
            f"- registered **{reg.get('name')}** version **{reg.get('version')}** at `{reg.get('path')}`",
            f"- promoted to production: **{reg.get('promoted')}**",
        ]
        comp = reg.get("comparison") or {}
        if comp:
            lines += [f"- decision: **{comp.get('decision')}**: {comp.get('reason')}"]
            lines += [
                f"- gate check {c['check']}: {'passed' if c['passed'] else '**FAILED**'} ({c['why']})"
                for c in comp.get("baseline_checks") or []
            ]
            lines += [f"- full record: `{json.dumps(comp, default=str)}`"]
    return "\n".join(lines) + "\n"


def publish(name: str, folders: dict[str, str | None], records: dict[str, Any]) -> dict[str, str]:
    """Create the run's artifacts (stable keys); returns key -> kind."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    made = {}
    evaluation = folders.get("evaluation")
    if evaluation and (Path(evaluation) / "metrics.json").exists():
        ev = read_json(Path(evaluation) / "metrics.json")
        key = artifact_key(name, "test-metrics")
        create_table_artifact(
            metrics_table(ev, records.get("production_metrics")),
            key=key,
            description="Test metrics: fine-tuned model, baselines and the production model, same test split.",
        )
        made[key] = "table"
        if ev.get("confusion_matrix"):
            key = artifact_key(name, "confusion-matrix")
            create_table_artifact(
                confusion_rows(ev), key=key, description="Confusion matrix on the test split (rows: true)."
            )
            made[key] = "table"
        samples = Path(evaluation) / "samples.json"
        if samples.exists():  # instruction tuning: prompts with the base model's and the fine-tuned model's answers
            key = artifact_key(name, "samples")
            create_table_artifact(
                read_json(samples),
                key=key,
                description="Sample test prompts: reference, base model and fine-tuned answers.",
            )
            made[key] = "table"
    run = folders.get("run")
    search = _search(Path(run)) if run else None
    if search:
        key = artifact_key(name, "lr-search")
        create_table_artifact(
            search_rows(search),
            key=key,
            description=f"Learning-rate search: trials by rung, validation {search.get('metric')}, winner.",
        )
        made[key] = "table"
    key = artifact_key(name, "report")
    create_markdown_artifact(
        run_report(folders, records), key=key, description="Run report: data, training, test metrics, merge, promotion."
    )
    made[key] = "markdown"
    reg = records.get("registry")
    if reg and reg.get("path"):
        key = artifact_key(name, "model")
        create_link_artifact(
            Path(reg["path"]).resolve().as_uri(),
            link_text=f"{reg.get('name')} v{reg.get('version')}",
            key=key,
            description="The registered model folder.",
        )
        made[key] = "link"
    return made
