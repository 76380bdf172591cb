"""Learning-rate search for `training.learning_rate: auto`: successive halving over a few candidate rates.

Rung 1 trains every candidate briefly (a quarter of an epoch: warmup, then the candidate's full rate to the
end, no decay, because the real run spends most of its epochs near its peak rate; tasks/train_worker.py
says what the other schedules did) and scores it on the validation split with
the evaluation's primary metric (f1_macro single-label, f1_micro multi-label, r2 regression; val_loss
breaks ties); the best `keep` share goes on to rung 2 with more steps (trained again from the start, so
each trial depends only on its rate and budget), up to about one epoch. A trial whose loss goes non-finite is
discarded. The winner's rate trains the real run.

- `candidate_rates(method)`, `default_rungs(train_rows, effective_batch)`: the plan.
- `successive_halving(candidates, rungs, run_rung, ...)`: the pure search; `run_rung([(rate, steps), ...])`
  returns one Trial per pair. Tests give it a made-up scorer; `search_learning_rate` gives it real trials,
  one after another; the flow gives it Prefect tasks (`.map`), so any task runner (threads, Dask, Ray)
  spreads them.
- `run_trial(cfg, prepared_dir, tokenized_dir, rate, steps)`: one trial, a training child in
  `<workspace>/lr-trials/<key>/` (key: dataset + tokenized + base model + model/method/training settings
  + rate + steps), reused when it already finished.
- `write_search(cfg, result)`: `<workspace>/lr-search/<key>/search.json` + `curves.png`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tasks.files import read_json, sha256_json, write_json

# Candidates spanning each method's useful range (log-spaced).
CANDIDATES = {"full": [1e-5, 3e-5, 1e-4, 3e-4], "adapter": [1e-4, 5e-4, 2e-3, 5e-3]}
PRIMARY_METRIC = {"single_label": "f1_macro", "multi_label": "f1_micro", "regression": "r2"}
SEARCH_VERSION = "2"  # 2: trials train at their full rate after warmup (no decay); the last rung is about one epoch
# Training settings that do not change a trial (the trial sets rate, steps and schedule itself).
TRIAL_EXCLUDED = ("learning_rate", "epochs", "early_stopping", "search", "timeout_s", "save_every_steps",
                  "eval_every_epochs")


@dataclass
class Trial:
    rate: float
    steps: int
    score: float | None
    val_loss: float | None = None
    diverged: bool = False
    seconds: float = 0.0
    path: str | None = None
    reused: bool = False
    curve: list[float] = field(default_factory=list)  # training loss per step
    rung: int = 0

    @property
    def usable(self) -> bool:
        return not self.diverged and self.score is not None and math.isfinite(self.score)


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
        return {"best_rate": self.best_rate, "metric": self.metric, "candidates": self.candidates, "rungs": self.rungs,
                "seconds": round(self.seconds, 3), "path": self.path,
                "trials": [{k: v for k, v in asdict(t).items() if k != "curve"} for t in self.trials]}


class SearchError(RuntimeError):
    """Every candidate diverged or failed."""


def candidate_rates(method: str) -> list[float]:
    return list(CANDIDATES["full" if method == "full" else "adapter"])


def default_rungs(train_rows: int, effective_batch: int) -> list[int]:
    """Rung 1: 25 % of an epoch (8..60 steps); rung 2: four times that, at most one epoch (at least twice rung 1).

    Rung 2 ends where the real run is first evaluated (one epoch) when the epoch is short enough: an unstable
    rate needs steps at full rate to show (GoEmotions, QLoRA, after warmup at full rate: 5e-3 scored micro-F1
    0.304 at 28 steps, ahead of 2e-3, and 0.242 at 112 steps, behind 2e-3's 0.345)."""
    per_epoch = max(1, math.ceil(train_rows / max(1, effective_batch)))
    first = int(min(60, max(8, round(0.25 * per_epoch))))
    return [first, max(2 * first, min(per_epoch, 4 * first))]


def _rank_key(t: Trial, higher_is_better: bool):
    score = t.score if higher_is_better else -t.score
    loss = t.val_loss if t.val_loss is not None and math.isfinite(t.val_loss) else math.inf
    return (-score, loss, t.rate)  # best score first; lower val_loss, then the smaller rate, break ties


def successive_halving(candidates: Sequence[float], rungs: Sequence[int],
                       run_rung: Callable[[list[tuple[float, int]]], list[Trial]], *, keep: float = 0.5,
                       higher_is_better: bool = True, metric: str = "score") -> SearchResult:
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
            raise SearchError(f"every candidate learning rate failed or diverged in rung {i + 1}: "
                              + ", ".join(f"{t.rate:g} (score {t.score}, diverged {t.diverged})" for t in results))
        last = usable
        if i + 1 < len(rungs):
            n = max(1, math.ceil(len(usable) * keep))
            alive = [t.rate for t in usable[:n]]
            if len(alive) == 1 and i + 1 < len(rungs):
                break  # one survivor: more steps would not change the choice
    return SearchResult(best_rate=last[0].rate, metric=metric, candidates=[float(c) for c in candidates],
                        rungs=[int(r) for r in rungs], trials=trials, seconds=time.perf_counter() - t0)


# ---- real trials ---------------------------------------------------------------------------------------

def primary_metric(cfg, task: str) -> str:
    return cfg.evaluation.primary_metric or PRIMARY_METRIC[task]


def trial_key(cfg, dataset_fp: str, tokenized_key: str, base_fp: str, method: str, rate: float, steps: int) -> str:
    from tasks.base_model import resolve_model
    from tasks.heads import resolve_head

    training = cfg.training.model_dump(mode="json", exclude=set(TRIAL_EXCLUDED))
    return sha256_json({
        "dataset": dataset_fp, "tokenized": tokenized_key, "base_model": base_fp,
        "model": {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision,
                  "head": resolve_head(cfg.model.head, resolve_model(cfg.model), cfg.model.revision)[0]},
        "method": cfg.method.model_dump(mode="json"), "resolved_method": method, "training": training,
        "max_length": cfg.data.max_length, "rate": float(rate), "steps": int(steps), "version": SEARCH_VERSION,
    })[:20]


def with_rate(cfg, rate: float):
    """A copy of the config with training.learning_rate fixed (only the keys the user set are re-validated)."""
    from tasks.config import RunConfig

    raw = cfg.model_dump(mode="json", exclude_unset=True)
    raw.setdefault("training", {})["learning_rate"] = float(rate)
    return RunConfig.model_validate(raw)


def trial_config(cfg, rate: float, steps: int):
    """The run config a trial trains with: the rate fixed, early stopping off (the trial stops at `steps`)."""
    from tasks.config import RunConfig

    raw = with_rate(cfg, rate).model_dump(mode="json", exclude_unset=True)
    raw["training"].setdefault("early_stopping", {})["metric"] = "loss"
    return RunConfig.model_validate(raw)


def run_trial(cfg, prepared_dir: str, tokenized_dir: str, rate: float, steps: int) -> Trial:
    """Train one candidate for `steps` optimizer steps and score it on validation (reused when finished)."""
    from tasks.train import TrainingError, train_model

    task = read_json(Path(prepared_dir) / "manifest.json")["task"]
    metric = primary_metric(cfg, task)
    t0 = time.perf_counter()
    try:
        res = train_model(trial_config(cfg, rate, steps), prepared_dir, tokenized_dir,
                          trial={"max_steps": int(steps), "rate": float(rate)})
    except TrainingError as exc:  # a child that crashed on non-finite values counts as diverged
        if "nan" not in str(exc).lower() and "inf" not in str(exc).lower():
            raise
        return Trial(rate=float(rate), steps=int(steps), score=None, diverged=True, seconds=time.perf_counter() - t0)
    run = Path(res.path)
    summary = read_json(run / "training_summary.json")
    final = summary.get("final_eval") or {}
    curve = []
    if (run / "metrics.jsonl").exists():
        import json

        curve = [json.loads(ln).get("loss") for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if '"type": "step"' in ln]
    score = final.get(metric)
    diverged = bool(summary.get("diverged")) or score is None or not math.isfinite(float(score))
    return Trial(rate=float(rate), steps=int(steps), score=None if score is None else float(score),
                 val_loss=final.get("val_loss"), diverged=diverged, seconds=float(summary.get("seconds") or 0.0),
                 path=str(run), reused=res.reused, curve=[c for c in curve if c is not None])


def plan(cfg, prepared_dir: str, method: str) -> tuple[list[float], list[int], str, bool]:
    """(candidates, rung steps, metric, higher_is_better) for this config and dataset."""
    from tasks.losses import LOWER_IS_BETTER

    manifest = read_json(Path(prepared_dir) / "manifest.json")
    s = cfg.training.search
    candidates = list(s.candidates) if s.candidates else candidate_rates(method)
    rungs = list(s.rung_steps) if s.rung_steps else default_rungs(
        int(manifest["splits"]["train"]["rows"]), cfg.training.effective_batch_size)
    metric = primary_metric(cfg, manifest["task"])
    return candidates, rungs, metric, metric not in LOWER_IS_BETTER


def resolved_method(cfg, prepared_dir: str) -> str:
    if cfg.method.kind != "auto":
        return cfg.method.kind
    from tasks.base_model import resolve_model
    from tasks.config import resolve_training
    from tasks.train import resolve_method

    return resolve_method(cfg, resolve_model(cfg.model), cfg.data.max_length, resolve_training(cfg)["micro_batch_size"])[0]


def search_learning_rate(cfg, prepared_dir: str, tokenized_dir: str,
                         run_rung: Callable[[list[tuple[float, int]]], list[Trial]] | None = None) -> SearchResult:
    """The whole search; trials one after another unless `run_rung` runs a rung's trials in parallel."""
    method = resolved_method(cfg, prepared_dir)
    candidates, rungs, metric, higher = plan(cfg, prepared_dir, method)
    if run_rung is None:
        def run_rung(pairs):
            return [run_trial(cfg, prepared_dir, tokenized_dir, r, s) for r, s in pairs]
    result = successive_halving(candidates, rungs, run_rung, keep=cfg.training.search.keep, higher_is_better=higher,
                                metric=metric)
    write_search(cfg, prepared_dir, tokenized_dir, method, result)
    return result


def write_search(cfg, prepared_dir: str, tokenized_dir: str, method: str, result: SearchResult) -> Path:
    """`<workspace>/lr-search/<key>/search.json` and `curves.png` (training loss per trial)."""
    from tasks.files import atomic_dir

    key = sha256_json({"trials": [t.path or f"{t.rate}-{t.steps}" for t in result.trials], "method": method})[:16]
    out = cfg.workspace_path() / "lr-search" / key
    result.path = str(out)
    if (out / "search.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        write_json(tmp / "search.json", result.summary() | {"method": method})
        curves_png(result, tmp / "curves.png")
    return out


def curves_png(result: SearchResult, out_png: str | Path) -> Path | None:
    from tasks.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    for t in result.trials:
        if not t.curve:
            continue
        drawn = True
        style = "-" if t.rate == result.best_rate else "--"
        label = f"lr {t.rate:g}, {t.steps} steps: {result.metric} " + (f"{t.score:.3f}" if t.usable else "diverged")
        ax.plot(range(1, len(t.curve) + 1), t.curve, style, label=label, linewidth=1.2)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Learning-rate search (winner {result.best_rate:g})")
    ax.legend(fontsize=6)
    return _save(fig, out_png)


def search_rows(summary: dict) -> list[dict]:
    """Table rows for the dashboard / model card."""
    return [{"rung": t["rung"], "learning_rate": f"{t['rate']:g}", "steps": t["steps"],
             summary["metric"]: None if t["score"] is None else round(float(t["score"]), 4),
             "val_loss": None if t.get("val_loss") is None else round(float(t["val_loss"]), 4),
             "diverged": t["diverged"], "seconds": round(float(t.get("seconds") or 0), 1),
             "winner": t["rate"] == summary["best_rate"]} for t in summary["trials"]]
