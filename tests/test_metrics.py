"""The project's metric modules (local `evaluate` modules) against scikit-learn/scipy on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn import metrics as skm

from tasks.evaluation.metrics import (
    THRESHOLD_GRID,
    MetricError,
    compute_metrics,
    higher_is_better,
    load_extra_metric,
    load_metric,
    metric_details,
    metric_names,
    primary_metric,
    tune_thresholds,
)


def _probs(rng, y, k, noise=1.2):
    logits = rng.normal(size=(len(y), k)) * noise
    logits[np.arange(len(y)), y] += 1.0
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def test_metric_modules_load_by_local_path_offline():
    import evaluate

    m = load_metric("classification", "single_label")
    assert isinstance(m, evaluate.Metric)
    assert isinstance(load_metric("regression"), evaluate.Metric)
    out = m.compute(predictions=[0, 1, 1], references=[0, 1, 0], label_names=["a", "b"])
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_single_label_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    s = _probs(rng, y, 3)
    p = s.argmax(1)
    d = metric_details("single_label", ["a", "b", "c"], y, s)
    m = d["metrics"]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    for avg in ("macro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, p, average=avg))
        assert m[f"precision_{avg}"] == pytest.approx(skm.precision_score(y, p, average=avg))
        assert m[f"recall_{avg}"] == pytest.approx(skm.recall_score(y, p, average=avg))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert "roc_auc" not in m  # multiclass: no binary AUCs
    per_f1 = skm.f1_score(y, p, average=None)
    assert [d["per_class"][n]["f1"] for n in "abc"] == pytest.approx(per_f1.tolist())
    assert [d["per_class"][n]["support"] for n in "abc"] == np.bincount(y, minlength=3).tolist()
    assert d["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, p).tolist()
    assert d["confusion_matrix"]["labels"] == ["a", "b", "c"]


def test_binary_roc_and_pr_auc_use_the_second_label():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=150)
    s = _probs(rng, y, 2, noise=1.5)
    m = compute_metrics("single_label", ["ham", "spam"], y, s)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s[:, 1]))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, s[:, 1]))
    assert 0.5 < m["roc_auc"] < 1.0  # informative but imperfect scores: a real check, not a corner case
    # known small case: AUC 0.75 (3 of 4 positive/negative pairs ordered correctly)
    m2 = compute_metrics("single_label", ["n", "p"], [0, 0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.65, 0.35], [0.2, 0.8]])
    assert m2["roc_auc"] == pytest.approx(0.75)
    assert m2["pr_auc"] == pytest.approx(skm.average_precision_score([0, 0, 1, 1], [0.1, 0.6, 0.35, 0.8]))


def test_single_class_in_test_leaves_auc_undefined():
    d = metric_details("single_label", ["n", "p"], [1, 1, 1], [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    assert d["metrics"]["roc_auc"] is None
    assert "roc_auc" not in compute_metrics("single_label", ["n", "p"], [1, 1, 1], [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])


def test_class_missing_from_predictions_and_truth_keeps_full_matrix():
    d = metric_details("single_label", ["a", "b", "c"], [0, 0, 1], [[0.9, 0.1, 0], [0.2, 0.8, 0], [0.3, 0.7, 0]])
    assert d["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert d["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_multi_label_matches_sklearn():
    rng = np.random.default_rng(2)
    y = (rng.random((120, 4)) < 0.3).astype(int)
    s = np.clip(y * 0.45 + rng.random((120, 4)) * 0.6, 0, 1)
    t = np.array([0.3, 0.5, 0.6, 0.45])
    d = metric_details("multi_label", list("wxyz"), [r.astype(float) for r in y], s, t)
    p = (s >= t).astype(int)
    m = d["metrics"]
    assert m["f1_micro"] == pytest.approx(skm.f1_score(y, p, average="micro"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, p))
    assert [d["per_class"][n]["f1"] for n in "wxyz"] == pytest.approx(skm.f1_score(y, p, average=None).tolist())
    assert [d["per_class"][n]["threshold"] for n in "wxyz"] == pytest.approx(t.tolist())
    rows = d["confusion_matrix"]["matrix"]
    assert rows == [c.ravel().tolist() for c in skm.multilabel_confusion_matrix(y, p)]
    assert all(sum(r) == 120 for r in rows)
    # default threshold 0.5
    m05 = compute_metrics("multi_label", list("wxyz"), y, s)
    assert m05["f1_micro"] == pytest.approx(skm.f1_score(y, (s >= 0.5).astype(int), average="micro"))


def test_tuned_thresholds_improve_validation_f1_over_half():
    # label 0: positives score ~0.3 (model under-confident); label 1: negatives score ~0.7 (over-confident)
    rng = np.random.default_rng(3)
    n = 200
    y = (rng.random((n, 2)) < 0.4).astype(int)
    s = np.empty((n, 2))
    s[:, 0] = np.where(y[:, 0] == 1, rng.uniform(0.25, 0.45, n), rng.uniform(0.0, 0.2, n))
    s[:, 1] = np.where(y[:, 1] == 1, rng.uniform(0.85, 1.0, n), rng.uniform(0.55, 0.8, n))
    t = tune_thresholds(y, s)
    assert 0.2 <= t[0] <= 0.25 and 0.8 <= t[1] <= 0.85
    tuned = compute_metrics("multi_label", ["a", "b"], y, s, t)
    half = compute_metrics("multi_label", ["a", "b"], y, s)
    assert tuned["f1_micro"] == pytest.approx(1.0)
    assert tuned["f1_micro"] > half["f1_micro"] + 0.2
    assert tuned["f1_macro"] > half["f1_macro"]


def test_thresholds_label_without_positives_and_ties_stay_near_half():
    y = np.array([[0, 1], [0, 1], [0, 0]])
    s = np.array([[0.2, 0.9], [0.1, 0.8], [0.3, 0.1]])
    t = tune_thresholds(y, s, min_positives=1)
    assert t[0] == 0.5  # no positives: F1 is 0 everywhere, keep the default
    assert 0.1 < t[1] <= 0.8 and abs(t[1] - 0.5) < 1e-9  # every threshold in (0.1, 0.8] is perfect: closest to 0.5


def test_labels_with_few_positives_share_the_micro_f1_threshold():
    """A label with fewer validation positives than min_positives gets the one threshold that maximizes
    micro-F1 over all labels, not a threshold fitted to its few examples."""
    rng = np.random.default_rng(5)
    n = 400
    y = np.zeros((n, 3), dtype=int)
    y[:, 0] = rng.random(n) < 0.5
    y[:, 1] = rng.random(n) < 0.5
    y[rng.choice(n, 3, replace=False), 2] = 1  # three positives
    s = np.where(y == 1, 0.75, 0.15) + rng.normal(0, 0.05, (n, 3))
    s[y[:, 2] == 1, 2] = 0.04  # the rare label's few positives happen to score lowest: its own best threshold is tiny
    s = np.clip(s, 0, 1)
    own = tune_thresholds(y, s, min_positives=1)
    assert own[2] <= 0.05
    t = tune_thresholds(y, s, min_positives=10)
    assert t[0] == own[0] and t[1] == own[1]  # enough positives: their own thresholds
    pooled = [compute_metrics("multi_label", list("abc"), y, s, np.full(3, g))["f1_micro"] for g in THRESHOLD_GRID]
    ties = [g for g, f in zip(THRESHOLD_GRID, pooled, strict=False) if np.isclose(f, max(pooled))]
    assert t[2] == min(ties, key=lambda g: abs(g - 0.5)) and 0.3 <= t[2] <= 0.6  # ties: closest to 0.5


def test_regression_matches_sklearn_and_scipy():
    rng = np.random.default_rng(4)
    y = rng.normal(size=100)
    p = y + rng.normal(scale=0.5, size=100)
    m = compute_metrics("regression", [], y, p)
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y, p))
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, p))
    assert m["r2"] == pytest.approx(skm.r2_score(y, p))
    assert m["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert m["spearman"] == pytest.approx(spearmanr(p, y)[0])
    const = metric_details("regression", [], y, np.zeros(100))["metrics"]
    assert const["pearson"] is None and const["spearman"] is None


def test_shape_errors_are_clear():
    with pytest.raises(MetricError, match="shape"):
        compute_metrics("single_label", ["a", "b", "c"], [0, 1], [[0.5, 0.5], [0.4, 0.6]])
    with pytest.raises(MetricError, match="2 true labels but 3"):
        compute_metrics("single_label", ["a", "b"], [0, 1], [[0.5, 0.5]] * 3)


def test_primary_metric_defaults_and_validation():
    assert primary_metric("single_label") == "f1_macro"
    assert primary_metric("multi_label") == "f1_micro"
    assert primary_metric("regression") == "r2"
    assert primary_metric("single_label", "roc_auc", 2) == "roc_auc"
    with pytest.raises(MetricError, match="roc_auc.*not computed.*3 labels"):
        primary_metric("single_label", "roc_auc", 3)
    assert not higher_is_better("mse") and higher_is_better("f1_macro")
    assert set(compute_metrics("regression", [], [1.0, 2.0, 3.0], [1.1, 2.2, 2.9])) == set(metric_names("regression"))


def test_extra_metric_local_path_loads_and_hub_name_fails_clearly():
    from tasks.evaluation.metrics import METRICS_DIR

    # a folder path runs that folder's code: the trusted path (evaluation.trust_metric_code)
    m = load_extra_metric(f"{METRICS_DIR / 'classification'}:single_label", trust_code=True)
    assert m.compute(predictions=[1, 1], references=[1, 0])["accuracy"] == 0.5
    with pytest.raises(MetricError, match="extra metric 'no_such_metric_xyz' could not be loaded.*network"):
        load_extra_metric("no_such_metric_xyz", trust_code=True)
    # without trust: the shipped modules by name only (refusals: tests/test_security.py)
    shipped = load_extra_metric("classification:single_label")
    assert shipped.compute(predictions=[1, 0], references=[1, 1])["accuracy"] == 0.5
    with pytest.raises(MetricError, match="not one of the shipped metric modules.*trust_metric_code"):
        load_extra_metric(f"{METRICS_DIR / 'classification'}:single_label")
