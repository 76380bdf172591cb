"""Human-readable markdown reports written next to artifacts (data report; later: evaluation, model card)."""

from __future__ import annotations


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def data_report(m: dict) -> str:
    """The prepared dataset's report.md from its manifest."""
    lines = [f"# Prepared dataset `{m['fingerprint']}`", ""]
    lines += [
        f"- task: **{m['task']}**",
        f"- labels ({len(m['labels'])}): {', '.join(m['labels']) or '(regression target)'}"
        if m["task"] != "sft"
        else "- instruction data: conversations that end with the assistant's answer",
    ]
    lines += ["- sources: " + ", ".join(f"`{f}` (sha256 {h[:12]}…)" for f, h in m["sources"].items())]
    lines += [f"- class weighting: `{m['class_weighting']}`"] + [f"- {n}" for n in m.get("notes", [])]
    leak = m.get("leakage") or {}
    if leak.get("pairs"):
        found = ", ".join(f"{pair} {n}" for pair, n in leak["pairs"].items())
        lines += [
            f"- leakage between the provided splits (data.on_leakage=`{leak['policy']}`): {found} row(s); "
            f"dropped {leak.get('dropped_train_rows', 0)} train row(s)"
        ]
    lines += ["", "## Splits", ""]
    if m["task"] == "sft":
        lines.append(_table(["split", "examples"], [[s, v["rows"]] for s, v in m["splits"].items()]))
        lines += ["", "## Warnings", ""]
        return "\n".join(lines + ([f"- {w}" for w in m["warnings"]] or ["- none"])) + "\n"
    splits = m["splits"]
    if m["task"] == "regression":
        stats = m.get("target_stats", {})
        rows = [
            [s, v["rows"], *(f"{stats.get(s, {}).get(k, float('nan')):.4g}" for k in ("mean", "std", "min", "max"))]
            for s, v in splits.items()
        ]
        lines.append(_table(["split", "rows", "mean", "std", "min", "max"], rows))
    else:
        header = ["label"] + [f"{s} (n={v['rows']})" for s, v in splits.items()] + ["class weight"]
        rows = []
        for name in m["labels"]:
            cells = [name]
            for v in splits.values():
                c, n = v["label_counts"].get(name, 0), v["rows"]
                cells.append(f"{c} ({c / n:.1%})" if n else "0")
            cells.append(f"{m['class_weights'].get(name, 1.0):.4g}")
            rows.append(cells)
        lines.append(_table(header, rows))
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in m["warnings"]] or ["- none"]
    return "\n".join(lines) + "\n"


def truncation_warning(split: str, n: int, total: int, max_length: int) -> str:
    return (
        f"{split}: {n} of {total} row{'s' * (total != 1)} ({n / total:.1%}) are longer than data.max_length={max_length} "
        "tokens and are truncated; raise data.max_length if the end of the text matters"
    )
