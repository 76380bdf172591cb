"""The promotion gate is honest: a version must beat the majority and TF-IDF baselines (by registry.min_delta, a tie
is not a win) before it can become production, the first version included, and the decision says which check failed.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import RunConfig
from tasks.files import write_json


def _export(ws: Path, tag: str, value: float, majority: float, tfidf: float | None) -> tuple[Path, Path]:
    """An export + evaluation folder as the stages write them (the registry never loads the model)."""
    exp, ev = ws / "exports" / tag, ws / "evaluations" / tag
    exp.mkdir(parents=True)
    (exp / "model.safetensors").write_bytes(b"weights " + tag.encode())
    write_json(exp / "config.json", {"model_type": "bert"})
    write_json(
        exp / "lineage.json",
        {
            "export_key": tag,
            "method": "full",
            "task": "single_label",
            "test_set_fingerprint": "T1",
            "dataset_fingerprint": "D1",
        },
    )
    baselines = {"majority": {"metrics": {"f1_macro": majority}, "settings": {}, "seconds": 0.0}}
    if tfidf is not None:
        baselines["tfidf"] = {"metrics": {"f1_macro": tfidf}, "settings": {}, "seconds": 0.0}
    write_json(
        ev / "metrics.json",
        {
            "task": "single_label",
            "split": "test",
            "primary_metric": "f1_macro",
            "metrics": {"f1_macro": value},
            "baselines": baselines,
        },
    )
    return exp, ev


def _register(ws: Path, tag: str, value: float, majority: float, tfidf: float | None, **registry):
    from tasks.release.registry import register_version

    cfg = RunConfig(workspace=str(ws), registry={"name": "gate", **registry})
    return register_version(cfg, *(str(p) for p in _export(ws, tag, value, majority, tfidf)))


def test_a_first_version_that_ties_the_majority_baseline_is_not_promoted(tmp_path):
    """Reproduced on main: a model tying the majority baseline and losing to TF-IDF became production, and the report
    called the tie a win ("beats the majority baseline ... +0.0000")."""
    res = _register(tmp_path, "tie", value=0.3333, majority=0.3333, tfidf=0.71)
    assert not res.promoted and res.comparison["decision"] == "keep"
    checks = {c["check"]: c for c in res.comparison["baseline_checks"]}
    assert not checks["beats majority"]["passed"] and "a tie is not a win" in checks["beats majority"]["why"]
    assert not checks["beats tfidf"]["passed"]
    assert "failed the baseline check" in res.comparison["reason"] and "beats tfidf" in res.comparison["reason"]
    aliases = tmp_path / "registry" / "gate" / "aliases.json"
    assert not aliases.exists() or json.loads(aliases.read_text())["production"] is None
    gate = json.loads((Path(res.path) / "gate.json").read_text())
    assert gate["baseline_checks"] == res.comparison["baseline_checks"]  # the report's record says which check failed


def test_beating_both_baselines_by_min_delta_promotes_and_less_does_not(tmp_path):
    assert _register(tmp_path, "good", value=0.80, majority=0.33, tfidf=0.71).promoted
    near = _register(tmp_path / "b", "near", value=0.72, majority=0.33, tfidf=0.71, min_delta=0.02)
    assert not near.promoted and "needs > 0 and >= min_delta 0.02" in near.comparison["reason"]


def test_tfidf_check_can_be_turned_off_but_majority_is_default(tmp_path):
    res = _register(tmp_path, "no-tfidf", value=0.60, majority=0.33, tfidf=0.71, must_beat=["majority"])
    assert res.promoted and [c["check"] for c in res.comparison["baseline_checks"]] == ["beats majority"]


def test_a_baseline_that_was_not_scored_fails_its_check_with_the_fix(tmp_path):
    res = _register(tmp_path, "unscored", value=0.90, majority=0.33, tfidf=None)
    assert not res.promoted
    assert (
        "tfidf baseline was not scored" in res.comparison["reason"] and "registry.must_beat" in res.comparison["reason"]
    )


def test_a_later_version_must_beat_baselines_and_production(tmp_path):
    assert _register(tmp_path, "v1", value=0.80, majority=0.33, tfidf=0.71).promoted
    worse_than_tfidf = _register(tmp_path, "v2", value=0.90, majority=0.33, tfidf=0.95)
    assert not worse_than_tfidf.promoted and "production unchanged" in worse_than_tfidf.comparison["reason"]
    better = _register(tmp_path, "v3", value=0.85, majority=0.33, tfidf=0.71)
    assert better.promoted and better.version == 3


def test_the_evaluation_report_does_not_call_a_tie_a_win():
    from tasks.evaluation.records import compare

    out = compare(
        "f1_macro", 0.5, {"majority": {"metrics": {"f1_macro": 0.5}}, "tfidf": {"metrics": {"f1_macro": 0.4}}}
    )
    assert out["baselines"]["majority"]["model_beats"] is False and out["baselines"]["majority"]["tie"] is True
    assert out["baselines"]["tfidf"]["model_beats"] is True
