"""Tables shared by the dashboard, the reports and the model card (pure: dicts in, rows out)."""

from __future__ import annotations


def search_rows(summary: dict) -> list[dict]:
    """The learning-rate search's trials as table rows (rung, rate, steps, validation score, winner)."""
    return [
        {
            "rung": t["rung"],
            "learning_rate": f"{t['rate']:g}",
            "steps": t["steps"],
            summary["metric"]: None if t["score"] is None else round(float(t["score"]), 4),
            "val_loss": None if t.get("val_loss") is None else round(float(t["val_loss"]), 4),
            "diverged": t["diverged"],
            "seconds": round(float(t.get("seconds") or 0), 1),
            "winner": t["rate"] == summary["best_rate"],
        }
        for t in summary["trials"]
    ]
