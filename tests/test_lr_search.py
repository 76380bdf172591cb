"""Learning-rate search: successive halving over known scores, diverged trials discarded, real trials."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import toy_rows, write_csv

from tasks.model.methods import get_method
from tasks.reporting.tables import search_rows
from tasks.training.planner import default_rungs
from tasks.training.search import SearchError, Trial, successive_halving


def candidate_rates(method: str) -> list[float]:
    return list(get_method(method).search_candidates)


def scorer(table: dict[float, float], calls: list):
    """A test-made trial runner: the score of a rate grows with the steps it gets (NaN = diverged)."""

    def run_rung(pairs):
        calls.append(list(pairs))
        out = []
        for rate, steps in pairs:
            s = table[rate]
            diverged = isinstance(s, float) and math.isnan(s)
            out.append(
                Trial(
                    rate=rate,
                    steps=steps,
                    score=None if diverged else s + steps / 1000,
                    val_loss=1.0 - (0 if diverged else s),
                    diverged=diverged,
                )
            )
        return out

    return run_rung


def test_picks_the_best_candidate_and_halves_each_rung():
    calls: list = []
    table = {1e-5: 0.20, 3e-5: 0.55, 1e-4: 0.71, 3e-4: 0.60}
    res = successive_halving(list(table), [10, 20], scorer(table, calls), keep=0.5, metric="f1_macro")
    assert res.best_rate == 1e-4 and res.metric == "f1_macro"
    assert calls[0] == [(r, 10) for r in table]  # rung 1: every candidate, short budget
    assert sorted(calls[1]) == [(1e-4, 20), (3e-4, 20)]  # rung 2: the best half, more steps
    assert [t.rung for t in res.trials] == [1, 1, 1, 1, 2, 2]


def test_lower_is_better_metric_and_tie_break_on_val_loss():
    calls: list = []
    table = {0.1: 0.5, 0.2: 0.5, 0.3: 0.9}
    res = successive_halving(list(table), [5], scorer(table, calls), higher_is_better=False, metric="mse")
    assert res.best_rate in (0.1, 0.2)  # lowest score wins
    # equal scores: the lower validation loss wins
    t = [Trial(rate=1.0, steps=1, score=0.5, val_loss=0.4), Trial(rate=2.0, steps=1, score=0.5, val_loss=0.1)]
    assert successive_halving([1.0, 2.0], [1], lambda pairs: t).best_rate == 2.0


def test_a_diverged_trial_is_discarded_even_if_it_reports_a_score():
    calls: list = []
    table = {1e-4: 0.5, 5e-4: 0.6, 2e-3: float("nan"), 5e-3: 0.1}
    res = successive_halving(list(table), [8, 16], scorer(table, calls))
    assert res.best_rate == 5e-4
    assert all(r != 2e-3 for r, _ in calls[1])
    # a trial flagged diverged with a (stale) high score never wins
    t = [Trial(rate=1.0, steps=1, score=0.99, diverged=True), Trial(rate=2.0, steps=1, score=0.3)]
    assert successive_halving([1.0, 2.0], [1], lambda pairs: t).best_rate == 2.0
    inf = [Trial(rate=1.0, steps=1, score=float("inf")), Trial(rate=2.0, steps=1, score=0.3)]
    assert successive_halving([1.0, 2.0], [1], lambda pairs: inf).best_rate == 2.0


def test_all_diverged_raises_and_later_rung_divergence_keeps_earlier_best():
    with pytest.raises(SearchError, match="diverged"):
        successive_halving(
            [1.0, 2.0], [3], lambda pairs: [Trial(rate=r, steps=s, score=None, diverged=True) for r, s in pairs]
        )

    def run_rung(pairs):
        if pairs[0][1] == 3:
            return [Trial(rate=r, steps=s, score=r / 10) for r, s in pairs]
        return [Trial(rate=r, steps=s, score=None, diverged=True) for r, s in pairs]

    assert successive_halving([1.0, 2.0, 3.0, 4.0], [3, 6], run_rung).best_rate == 4.0


def test_candidates_and_rungs_span_the_method_range():
    full, lora = candidate_rates("full"), candidate_rates("lora")
    assert min(full) <= 1e-5 * 1.01 and max(full) >= 3e-4 * 0.99 and len(full) >= 3
    assert min(lora) <= 1e-4 * 1.01 and max(lora) >= 5e-3 * 0.99 and candidate_rates("qlora") == lora
    assert default_rungs(640, 16) == [10, 40]  # 40 steps per epoch: rung 2 is one epoch
    assert default_rungs(1800, 16) == [28, 112]  # 113 steps per epoch: four times rung 1
    assert default_rungs(40, 16) == [8, 16] and default_rungs(100_000, 16) == [60, 240]


def test_search_rows_mark_the_winner():
    res = successive_halving(
        [1.0, 2.0], [1], lambda pairs: [Trial(rate=r, steps=s, score=r) for r, s in pairs], metric="f1_macro"
    )
    rows = search_rows(res.summary())
    assert [r["winner"] for r in rows] == [False, True] and rows[1]["f1_macro"] == 2.0
    json.dumps(res.summary())


# ---- real trials on a tiny BERT ------------------------------------------------------------------------


def _cfg(tmp_path: Path, model: Path, *sets: str):
    from tasks.config_loading import load_config

    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    return load_config(
        None,
        [
            f"workspace={tmp_path / 'ws'}",
            f"data.source={data}",
            f"model.name_or_path={model}",
            "data.max_length=32",
            "training.effective_batch_size=8",
            "training.epochs=2",
            "training.warmup_ratio=0",
            *sets,
        ],
    )


def _prepare(cfg, model: Path):
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset

    prep = prepare_dataset(cfg)
    return prep.path, tokenize_dataset(prep.path, str(model), cfg).path


@pytest.mark.child
def test_real_search_discards_a_diverging_trial_and_trains_the_winner(tmp_path, tiny_bert, monkeypatch):
    from conftest import train_model

    monkeypatch.setenv("FINETUNE_TEST_NAN_ABOVE_LR", "0.05")  # the worker's hook: 0.1 gets a NaN loss
    cfg = _cfg(
        tmp_path,
        tiny_bert,
        "training.search.candidates=[0.0001, 0.001, 0.003, 0.1]",
        "training.search.rung_steps=[3, 5]",
    )
    assert cfg.training.learning_rate == "auto"
    prepared, tokenized = _prepare(cfg, tiny_bert)
    res = train_model(cfg, prepared, tokenized)  # auto: the search runs first (trials one after another)
    search = json.loads((Path(res.path) / "lr_search.json").read_text())
    plan = json.loads((Path(res.path) / "plan.json").read_text())
    by_rate = {(t["rate"], t["steps"]): t for t in search["trials"]}
    assert by_rate[(0.1, 3)]["diverged"] and by_rate[(0.1, 3)]["score"] is None
    assert (0.1, 5) not in by_rate  # discarded: never promoted to rung 2
    rung1 = sorted(
        (t for t in search["trials"] if t["steps"] == 3 and not t["diverged"]),
        key=lambda t: (-t["score"], t["val_loss"], t["rate"]),
    )
    assert {t["rate"] for t in search["trials"] if t["steps"] == 5} == {t["rate"] for t in rung1[:2]}  # best half
    rung2 = [t for t in search["trials"] if t["steps"] == 5]
    best = max(rung2, key=lambda t: t["score"])
    assert search["best_rate"] == best["rate"] and search["metric"] == "f1_macro"
    assert plan["learning_rate"] == search["best_rate"] and plan["learning_rate_source"] == "search"
    trials = sorted((tmp_path / "ws" / "lr-trials").iterdir())
    assert len(trials) == 6
    for d in trials:
        s = json.loads((d / "training_summary.json").read_text())
        assert s["trial"] and not (d / "model").exists() and not (d / "checkpoints").exists()
        assert s["global_step"] <= s["max_steps"]
    assert (Path(search["path"]) / "search.json").is_file()

    # a trial trains at its full rate to its last step (warmup_ratio 0 here): no decay that would anneal the
    # weights just before scoring and flatter high rates; the real run decays
    def step_rates(d):
        return [
            json.loads(ln)["learning_rate"]
            for ln in (d / "metrics.jsonl").read_text().splitlines()
            if '"type": "step"' in ln
        ]

    winner = next(
        d
        for d in trials
        if json.loads((d / "training_summary.json").read_text())["max_steps"] == 5
        and json.loads((d / "plan.json").read_text())["learning_rate"] == search["best_rate"]
    )
    assert step_rates(winner) == pytest.approx([search["best_rate"]] * 5)
    real = step_rates(Path(res.path))
    assert real[0] == pytest.approx(search["best_rate"]) and real[-1] < 0.5 * search["best_rate"]

    # the same search again: every trial and the run are reused
    again = train_model(cfg, prepared, tokenized)
    assert again.reused and again.path == res.path


@pytest.mark.flow
def test_flow_runs_the_search_as_mapped_tasks_and_publishes_it(tmp_path, tiny_bert):
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune
    from tasks.reporting.artifacts import run_report

    cfg = _cfg(
        tmp_path,
        tiny_bert,
        "training.search.candidates=[0.0003, 0.003]",
        "training.search.rung_steps=[2]",
        "training.epochs=1",
        "registry.name=toy",
    )
    with prefect_test_harness(server_startup_timeout=120):
        summary = finetune(cfg)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            keys = {a.key for a in client.read_artifacts()}
    assert summary["tasks"]["lr-search"]["best_rate"] in (0.0003, 0.003)
    assert "toy-lr-search" in keys
    best = json.loads((Path(summary["folders"]["run"]) / "lr_search.json").read_text())["best_rate"]
    report = run_report(summary["folders"], {})
    assert "Learning-rate search" in report and "data:image/png;base64," in report
    card = (Path(summary["folders"]["export"]) / "README.md").read_text()
    assert "Learning-rate search" in card and f"{best:g}" in card
