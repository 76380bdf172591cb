"""The evaluation folder's report.md and confusion_matrix.md, rendered from metrics.json's content."""

from __future__ import annotations


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _delta(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def confusion_table(cm: dict) -> str:
    """Markdown table: single-label rows = true, columns = predicted; multi-label rows = labels, [tn fp fn tp]."""
    labels = cm["labels"]
    if cm.get("kind") == "per_label":
        return _table(["label", *cm["columns"]], [[n, *row] for n, row in zip(labels, cm["matrix"], strict=False)])
    header = ["true \\ predicted", *labels, "total"]
    rows = [[n, *row, sum(row)] for n, row in zip(labels, cm["matrix"], strict=False)]
    cols = [sum(r[j] for r in cm["matrix"]) for j in range(len(labels))]
    rows.append(["total", *cols, sum(cols)])
    return _table(header, rows)


def _summary(doc: dict) -> list[str]:
    primary, metrics, comp, run = doc["primary_metric"], doc["metrics"], doc["comparison"], doc["run"]
    lines = [f"# Evaluation `{doc['key']}`", ""]
    lines += [w if w.startswith("WARNING") else f"WARNING: {w}" for w in doc["warnings"] if w.startswith("WARNING")]
    if doc["warnings"]:
        lines.append("")
    lines += [
        f"- run: `{run['path']}` (method **{run.get('method')}**, base model `{run.get('base_model')}`)",
        f"- split: **test** ({doc['rows']} rows, never seen in training; validation only tunes thresholds)",
        f"- primary metric: **{primary} = {_fmt(metrics.get(primary))}**",
        f"- prediction: {doc['prediction_seconds']} s ({doc['texts_per_second']} texts/s)",
    ]
    for name, c in comp["baselines"].items():
        verdict = {True: "beats", False: "LOSES TO", None: "cannot be compared with"}[c["model_beats"]]
        if c.get("tie"):
            verdict = "only TIES (not a win) with"
        lines.append(
            f"- the fine-tuned model {verdict} the {name} baseline on {primary}: "
            f"{_fmt(comp['model'])} vs {_fmt(c['value'])} (delta {_delta(c['delta'])})"
        )
    return lines


def _data(doc: dict, manifest: dict) -> list[str]:
    lines = ["", "## Data", ""]
    lines += [
        f"- dataset `{manifest['fingerprint']}`, task **{manifest['task']}**, "
        f"{len(manifest['labels'])} label(s): {', '.join(manifest['labels'][:30]) or '(regression target)'}"
    ]
    lines += ["- rows: " + ", ".join(f"{s} {v['rows']}" for s, v in manifest["splits"].items())]
    lines += [
        f"- class weighting: `{manifest.get('class_weighting')}`; per-split label counts: "
        f"`{doc['run'].get('prepared_path', '')}/report.md`"
    ]
    return lines + [f"- data warning: {w}" for w in manifest.get("warnings", [])]


def _metrics(doc: dict) -> list[str]:
    primary, metrics, comp = doc["primary_metric"], doc["metrics"], doc["comparison"]
    lines = ["", "## Metrics (test)", ""]
    names = list(doc["baselines"])
    header = ["metric", "fine-tuned", *names, *(f"delta vs {n}" for n in names)]
    rows = []
    for k, v in metrics.items():
        base = [doc["baselines"][n]["metrics"].get(k) for n in names]
        deltas = [None if v is None or b is None else v - b for b in base]
        mark = f"**{k}**" if k == primary else k
        rows.append([mark, _fmt(v), *(_fmt(b) for b in base), *(_delta(d) for d in deltas)])
    lines.append(_table(header, rows))
    if names:
        lines += ["", "Baselines (fit on train, scored on the same test split):", ""]
        for n, b in doc["baselines"].items():
            settings = ", ".join(f"{k}: {v}" for k, v in b["settings"].items())
            lines.append(f"- **{n}**: {settings} ({b['seconds']} s)")
    higher = "higher" if comp["higher_is_better"] else "lower"
    return lines + ["", f"Deltas are fine-tuned minus baseline; for {primary}, {higher} is better."]


def _details(doc: dict, images: dict[str, str]) -> list[str]:
    lines = []
    if doc.get("per_class"):
        lines += ["", "## Per class" if doc["task"] == "single_label" else "## Per label", ""]
        extra = ["threshold"] if doc["task"] == "multi_label" else []
        rows = [
            [n, _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), c["support"], *(_fmt(c[e]) for e in extra)]
            for n, c in doc["per_class"].items()
        ]
        lines.append(_table(["label", "precision", "recall", "f1", "support", *extra], rows))
    if doc.get("confusion_matrix"):
        lines += ["", "## Confusion matrix", "", confusion_table(doc["confusion_matrix"]), ""]
        if "confusion" in images:
            lines.append(f"![confusion matrix]({images['confusion']})")
    if "scatter" in images:
        lines += ["", "## Predicted vs true", "", f"![predicted vs true]({images['scatter']})"]
    if doc.get("thresholds"):
        t, metrics = doc["thresholds"], doc["metrics"]
        v = t["validation"]
        lines += [
            "",
            "## Thresholds (tuned on validation)",
            "",
            f"Per-label thresholds maximize each label's F1 on validation ({t['grid']}) and are applied to test.",
            f"Validation f1_micro: {_fmt(v['tuned'].get('f1_micro'))} tuned vs "
            f"{_fmt(v['at_0.5'].get('f1_micro'))} at 0.5; test f1_micro: {_fmt(metrics.get('f1_micro'))} tuned vs "
            f"{_fmt(metrics.get('f1_micro_at_0.5'))} at 0.5.",
        ]
    if doc.get("extra_metrics"):
        lines += ["", "## Extra metrics", ""]
        for name, r in doc["extra_metrics"].items():
            lines.append(f"- `{name}`: " + (f"ERROR {r['error']}" if "error" in r else str(r["values"])))
    if "loss" in images:
        lines += ["", "## Training curve", "", f"![loss curve]({images['loss']})"]
    return lines


def render_report(doc: dict, manifest: dict, images: dict[str, str]) -> str:
    """report.md: summary, warnings first, data, metrics vs baselines, per-class, confusion matrix, thresholds."""
    lines = _summary(doc) + _data(doc, manifest) + _metrics(doc) + _details(doc, images)
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in doc["warnings"]] or ["- none"]
    return "\n".join(lines) + "\n"
