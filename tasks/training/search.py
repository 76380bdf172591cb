"""Learning-rate search for `training.learning_rate: auto`: successive halving over a few candidate rates.

Rung 1 trains every candidate briefly (a quarter of an epoch: warmup, then the candidate's full rate to the
end, no decay, because the real run spends most of its epochs near its peak rate; tasks/training/loop.py
says what the other schedules did) and scores it on the validation split with the evaluation's primary metric
(f1_macro single-label, f1_micro multi-label, r2 regression; val_loss breaks ties); the best `keep` share goes on
to rung 2 with more steps (trained again from the start, so each trial depends only on its rate and budget), up
to about one epoch. A trial whose loss goes non-finite is discarded. The winner's rate trains the real run.

The candidates, rungs and metric come from the plan (`plan.search`, resolved by tasks/training/planner.py).
- `successive_halving(candidates, rungs, run_rung, ...)`: the pure search; `run_rung([(rate, steps), ...])`
  returns one Trial per pair. Tests give it a made-up scorer; `search_learning_rate` gives it real trials, one
  after another; the flow gives it Prefect tasks (`.map`), so any task runner (threads, Dask, Ray) spreads them.
- `run_trial(plan, ws, rate, steps)`: one trial, a training child in `<workspace>/lr-trials/<key>/`.
- `write_search(plan, ws, result)`: `<workspace>/lr-search/<key>/search.json` + `curves.png`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.files import atomic_dir, sha256_json, write_json
from tasks.plan import RunPlan
from tasks.records import Trial
from tasks.training.launch import TrainingError, train
from tasks.workspace import Workspace


@dataclass
class SearchResult:
    best_rate: float
    metric: str
    candidates: list[float]
    rungs: list[int]
    trials: list[Trial]
    seconds: float
    path: str | None = None

    def summary(self) -> dict:
        return {
            "best_rate": self.best_rate,
            "metric": self.metric,
            "candidates": self.candidates,
            "rungs": self.rungs,
            "seconds": round(self.seconds, 3),
            "path": self.path,
            "trials": [{k: v for k, v in asdict(t).items() if k != "curve"} for t in self.trials],
        }


class SearchError(RuntimeError):
    """Every candidate diverged or failed."""


def _rank_key(t: Trial, higher_is_better: bool):
    score = t.score if higher_is_better else -t.score
    loss = t.val_loss if t.val_loss is not None and math.isfinite(t.val_loss) else math.inf
    return (-score, loss, t.rate)  # best score first; lower val_loss, then the smaller rate, break ties


def successive_halving(
    candidates: Sequence[float],
    rungs: Sequence[int],
    run_rung: Callable[[list[tuple[float, int]]], list[Trial]],
    *,
    keep: float = 0.5,
    higher_is_better: bool = True,
    metric: str = "score",
) -> SearchResult:
    """Run rung after rung, keeping the best `keep` share of the usable trials; the best of the last rung wins."""
    if not candidates:
        raise ValueError("no candidate learning rates")
    t0 = time.perf_counter()
    alive, trials = list(dict.fromkeys(float(c) for c in candidates)), []
    last: list[Trial] = []
    for i, steps in enumerate(rungs):
        results = run_rung([(rate, int(steps)) for rate in alive])
        for t in results:
            t.rung = i + 1
        trials += results
        usable = sorted((t for t in results if t.usable), key=lambda t: _rank_key(t, higher_is_better))
        if not usable:
            if last:
                break  # every survivor diverged with more steps: the previous rung's best stands
            raise SearchError(
                f"every candidate learning rate failed or diverged in rung {i + 1}: "
                + ", ".join(f"{t.rate:g} (score {t.score}, diverged {t.diverged})" for t in results)
            )
        last = usable
        if i + 1 < len(rungs):
            alive = [t.rate for t in usable[: max(1, math.ceil(len(usable) * keep))]]
            if len(alive) == 1:
                break  # one survivor: more steps would not change the choice
    return SearchResult(
        best_rate=last[0].rate,
        metric=metric,
        candidates=[float(c) for c in candidates],
        rungs=[int(r) for r in rungs],
        trials=trials,
        seconds=time.perf_counter() - t0,
    )


# ---- real trials ---------------------------------------------------------------------------------------


def trial_threads(plan: RunPlan) -> int | None:
    """Parallel trials split the CPU cores between them instead of oversubscribing them."""
    parallel = int(plan.search.get("max_parallel", 1))
    return max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None


def run_trial(plan: RunPlan, ws: Workspace, rate: float, steps: int) -> Trial:
    """Train one candidate for `steps` optimizer steps and score it on validation (reused when finished)."""
    metric = plan.search["metric"]
    t0 = time.perf_counter()
    try:
        res = train(plan.for_trial(rate, steps), ws, threads=trial_threads(plan))
    except TrainingError as exc:  # a child that crashed on non-finite values counts as diverged
        if "nan" not in str(exc).lower() and "inf" not in str(exc).lower():
            raise
        return Trial(rate=float(rate), steps=int(steps), score=None, diverged=True, seconds=time.perf_counter() - t0)
    run = Path(res.path)
    summary = Workspace.read_summary(run)
    final = summary.final_eval or {}
    curve = []
    if (run / "metrics.jsonl").exists():
        curve = [
            json.loads(ln).get("loss")
            for ln in (run / "metrics.jsonl").read_text().splitlines()
            if '"type": "step"' in ln
        ]
    score = final.get(metric)
    diverged = summary.diverged or score is None or not math.isfinite(float(score))
    return Trial(
        rate=float(rate),
        steps=int(steps),
        score=None if score is None else float(score),
        val_loss=final.get("val_loss"),
        diverged=diverged,
        seconds=float(summary.seconds or 0.0),
        path=str(run),
        reused=res.reused,
        curve=[c for c in curve if c is not None],
    )


def search_learning_rate(
    plan: RunPlan, ws: Workspace, run_rung: Callable[[list[tuple[float, int]]], list[Trial]] | None = None
) -> SearchResult:
    """The whole search; trials one after another unless `run_rung` runs a rung's trials in parallel."""
    s = plan.search
    if run_rung is None:

        def run_rung(pairs):
            return [run_trial(plan, ws, r, st) for r, st in pairs]

    result = successive_halving(
        s["candidates"],
        s["rungs"],
        run_rung,
        keep=s["keep"],
        higher_is_better=s["higher_is_better"],
        metric=s["metric"],
    )
    write_search(plan, ws, result)
    return result


def write_search(plan: RunPlan, ws: Workspace, result: SearchResult) -> Path:
    """`<workspace>/lr-search/<key>/search.json` and `curves.png` (training loss per trial)."""
    key = sha256_json({"trials": [t.path or f"{t.rate}-{t.steps}" for t in result.trials], "method": plan.method})[:16]
    out = ws.search(key)
    result.path = str(out)
    if (out / "search.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        write_json(tmp / "search.json", result.summary() | {"method": plan.method})
        curves_png(result, tmp / "curves.png")
    return out


def curves_png(result: SearchResult, out_png: str | Path) -> Path | None:
    from tasks.reporting.plots import line_chart

    series = [
        (
            f"lr {t.rate:g}, {t.steps} steps: {result.metric} " + (f"{t.score:.3f}" if t.usable else "diverged"),
            t.curve,
            "-" if t.rate == result.best_rate else "--",
        )
        for t in result.trials
        if t.curve
    ]
    return line_chart(
        series,
        out_png,
        xlabel="optimizer step",
        ylabel="training loss",
        title=f"Learning-rate search (winner {result.best_rate:g})",
    )
