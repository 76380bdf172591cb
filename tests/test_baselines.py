"""Majority and TF-IDF baselines: exact majority rates, and TF-IDF learning toy sets it should learn."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from conftest import WORDS, shared_data, toy_rows, write_csv

from tasks.config import RunConfig
from tasks.data.prepare import prepare_dataset
from tasks.data.sources import load_split
from tasks.evaluation.baselines import majority_scores, score_baselines, texts_of, tfidf_scores
from tasks.evaluation.metrics import compute_metrics


def _df(rows, labels):
    return pd.DataFrame(
        {
            "id": [str(i) for i in range(len(rows))],
            "text": [r["text"] for r in rows],
            "label": [labels.index(r["label"]) for r in rows],
        }
    )


def test_majority_single_label_scores_the_majority_rate():
    train = pd.DataFrame({"label": [0, 1, 1, 1, 2, 2]})
    y_test = np.array([1, 0, 1, 2, 1, 0, 0, 2, 1, 1])
    s = majority_scores(train, len(y_test), "single_label", 3)
    assert s.shape == (10, 3) and (s.argmax(1) == 1).all()
    m = compute_metrics("single_label", ["a", "b", "c"], y_test, s)
    assert m["accuracy"] == pytest.approx(np.mean(y_test == 1))  # 0.5


def test_majority_tie_picks_one_class_and_regression_uses_train_mean():
    s = majority_scores(pd.DataFrame({"label": [0, 1]}), 3, "single_label", 2)
    assert (s.argmax(1) == 0).all()
    r = majority_scores(pd.DataFrame({"label": [1.0, 2.0, 6.0]}), 4, "regression", 0)
    assert r.tolist() == [3.0] * 4


def test_majority_multi_label_predicts_each_labels_train_majority():
    train = pd.DataFrame({"label": [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]})
    s = majority_scores(train, 2, "multi_label", 3)
    assert s[0].tolist() == pytest.approx([1.0, 1 / 3, 1 / 3])
    assert ((s >= 0.5).astype(int) == [1, 0, 0]).all()


def test_tfidf_learns_a_separable_toy_set():
    labels = ["pos", "neg", "neu"]
    train, val, test = (_df(toy_rows(n, seed=seed), labels) for n, seed in ((150, 0), (30, 1), (60, 2)))
    b = tfidf_scores(train, val, test, "single_label", labels)
    m = compute_metrics("single_label", labels, test["label"], b.test)
    assert m["accuracy"] >= 0.95 and m["f1_macro"] >= 0.95
    assert b.settings["C"] in (0.5, 2.0, 8.0) and b.settings["features"] > 10
    maj = compute_metrics("single_label", labels, test["label"], majority_scores(train, len(test), "single_label", 3))
    assert maj["f1_macro"] < 0.3 < m["f1_macro"]


def test_tfidf_multi_label_and_regression_learn_word_signals():
    rng = random.Random(5)
    vocab = {0: WORDS["pos"], 1: WORDS["neg"]}

    def rows(n):
        out = []
        for _ in range(n):
            hot = [float(rng.random() < 0.5), float(rng.random() < 0.5)]
            words = [w for j in (0, 1) if hot[j] for w in rng.choices(vocab[j], k=3)] + rng.choices(WORDS["neu"], k=2)
            rng.shuffle(words)
            out.append({"text": " ".join(words), "hot": hot, "value": 2.0 * hot[0] - hot[1]})
        return out

    splits = [rows(n) for n in (200, 60, 80)]
    ml = [pd.DataFrame({"text": [r["text"] for r in s], "label": [r["hot"] for r in s]}) for s in splits]
    b = tfidf_scores(*ml, "multi_label", ["p", "n"])
    assert b.thresholds is not None and b.thresholds.shape == (2,)
    assert compute_metrics("multi_label", ["p", "n"], ml[2]["label"], b.test, b.thresholds)["f1_micro"] >= 0.9
    rg = [pd.DataFrame({"text": [r["text"] for r in s], "label": [r["value"] for r in s]}) for s in splits]
    r = tfidf_scores(*rg, "regression", [], balanced=False)
    assert r.settings["model"] == "Ridge" and "alpha" in r.settings
    assert compute_metrics("regression", [], rg[2]["label"], r.test)["r2"] >= 0.8


def test_texts_of_joins_sentence_pairs():
    df = pd.DataFrame({"text": ["a b"], "text_pair": ["c"]})
    assert texts_of(df) == ["a b || c"]


def test_score_baselines_on_a_prepared_dataset(tmp_path, workspace):
    src = write_csv(tmp_path / "toy.csv", toy_rows(150))
    cfg = RunConfig(workspace=str(workspace), data={"source": str(src)})
    prepared = prepare_dataset(cfg)
    out = score_baselines(prepared.path)
    assert set(out) == {"majority", "tfidf"}
    test = load_split(prepared.path, "test")
    rate = test["label"].value_counts(normalize=True).max()
    assert out["majority"]["metrics"]["accuracy"] <= rate + 1e-9
    assert out["tfidf"]["metrics"]["f1_macro"] >= 0.9
    assert out["tfidf"]["seconds"] >= 0


@pytest.mark.slow
def test_tfidf_on_real_sms_spam(tmp_path):
    path = shared_data("sms_spam")
    cfg = RunConfig(
        workspace=str(tmp_path / "ws"),
        data={"source": {"train": str(path / "train.csv"), "test": str(path / "test.csv")}, "max_rows": 2000},
    )
    prepared = prepare_dataset(cfg)
    out = score_baselines(prepared.path)
    assert out["tfidf"]["metrics"]["f1_macro"] > 0.85
    assert out["tfidf"]["metrics"]["roc_auc"] > 0.95
    assert out["majority"]["metrics"]["f1_macro"] < 0.5
