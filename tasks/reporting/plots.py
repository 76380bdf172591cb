"""Plots written next to artifacts (matplotlib, Agg backend: no display needed), and helpers to show them
in the Prefect dashboard, which renders PNGs given inline as `data:image/png;base64,...` in markdown.

- `confusion_matrix_png(matrix, labels, out_png)`: single-label matrix (rows true, columns predicted),
  cells coloured by row share and annotated with counts.
- `multilabel_matrix_png(rows, labels, out_png)`: per-label [tn, fp, fn, tp] counts.
- `loss_curve_png(metrics_jsonl_path, out_png)`: training loss per step and validation loss (and the
  first validation metric) per evaluation, from a run's metrics.jsonl.
- `regression_scatter_png(y_true, y_pred, out_png)`.
- `png_data_uri(path)`, `inline_images(markdown, base_dir)`.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return out


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def confusion_matrix_png(
    matrix, labels: list[str], out_png: str | Path, title: str = "Confusion matrix (test)"
) -> Path:
    """Heatmap of a K x K confusion matrix: colour = share of the true class's row, text = count."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    k = len(labels)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(16, max(4, 0.55 * k + 2.5))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(k), [_short(x) for x in labels], rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), [_short(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8 if k > 10 else 10,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    return _save(fig, out_png)


def multilabel_matrix_png(rows, labels: list[str], out_png: str | Path, title: str = "Per-label counts (test)") -> Path:
    """Per-label [tn, fp, fn, tp] counts as a labels x 4 heatmap (colour = share of the label's rows)."""
    plt = _plt()
    m = np.asarray(rows, dtype=np.float64).reshape(len(labels), 4)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, max(3, 0.3 * len(labels) + 1.5)))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of rows")
    ax.set_xticks(range(4), ["tn", "fp", "fn", "tp"])
    ax.set_yticks(range(len(labels)), [_short(x) for x in labels])
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(4):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.5 else "black",
            )
    return _save(fig, out_png)


def regression_scatter_png(y_true, y_pred, out_png: str | Path, title: str = "Predicted vs true (test)") -> Path:
    plt = _plt()
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(t, p, s=8, alpha=0.5)
    if len(t):
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    return _save(fig, out_png)


def read_metrics_jsonl(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) from a run's metrics.jsonl; unreadable lines are skipped."""
    steps, evals = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if rec.get("type") == "step" and rec.get("loss") is not None:
            steps.append(rec)
        elif rec.get("type") == "eval":
            evals.append(rec)
    return steps, evals


def loss_curve_png(metrics_jsonl_path: str | Path, out_png: str | Path) -> Path | None:
    """Training loss per step and validation loss per evaluation (left), the first validation metric (right).

    Returns the PNG path, or None when the file holds no step or eval records (nothing to plot).
    """
    steps, evals = read_metrics_jsonl(metrics_jsonl_path)
    if not steps and not evals:
        return None
    plt = _plt()
    skip = {"type", "step", "epoch", "val_loss", "loss", "learning_rate", "seconds"}
    found = [k for e in evals for k, v in e.items() if k not in skip and isinstance(v, (int, float))]
    metric = next((k for k in ("f1_macro", "f1_micro", "r2", "accuracy") if k in found), found[0] if found else None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", linewidth=1)
    val = [(e["step"], e["val_loss"]) for e in evals if e.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=False), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend()
    if metric:
        pts = [(e["step"], e[metric]) for e in evals if isinstance(e.get(metric), (int, float))]
        axes[0][1].plot(*zip(*pts, strict=False), marker="o", color="tab:green")
        axes[0][1].set_xlabel("optimizer step")
        axes[0][1].set_title(f"validation {metric}")
    return _save(fig, out_png)


def line_chart(
    series: list[tuple[str, list[float], str]], out_png: str | Path, *, xlabel: str, ylabel: str, title: str
) -> Path | None:
    """One line per (label, values, style); None when no series has values."""
    series = [s for s in series if s[1]]
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, values, style in series:
        ax.plot(range(1, len(values) + 1), values, style, label=label, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6)
    return _save(fig, out_png)


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def inline_images(markdown: str, base_dir: str | Path) -> str:
    """Replace `![alt](file.png)` links relative to base_dir with inline data URIs (for Prefect artifacts)."""

    def repl(m: re.Match) -> str:
        p = Path(base_dir) / m.group(2)
        return f"![{m.group(1)}]({png_data_uri(p)})" if p.is_file() else m.group(0)

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", repl, markdown)
