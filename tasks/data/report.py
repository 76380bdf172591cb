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
        f"- labels ({len(m['labels'])}): {', '.join(m['labels']) or '(regression target)'}",
    ]
    lines += ["- sources: " + ", ".join(f"`{f}` (sha256 {h[:12]}…)" for f, h in m["sources"].items())]
    lines += [f"- class weighting: `{m['class_weighting']}`"] + [f"- {n}" for n in m.get("notes", [])]
    lines += ["", "## Splits", ""]
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
