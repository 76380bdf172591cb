"""Run configuration: one error with every problem, overrides, shipped configs, resolved defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError
from tasks.config_loading import load_config
from tasks.training.planner import batch_plan, learning_rate_for

REPO = Path(__file__).resolve().parents[1]


def test_every_problem_is_reported_once_with_its_field_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "workspace: ws\n"
        "data:\n  sorce: x.csv\n  split: {test: 0.9}\n"
        "method: {kind: lorax}\n"
        "training: {epochs: many, learning_rate: 5}\n"
        "colour: blue\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    paths = [p for p, _ in info.value.problems]
    assert paths == sorted(paths, key=paths.index)  # stable order
    for expected in (
        "data.sorce",
        "data.split.test",
        "method.kind",
        "training.epochs",
        "training.learning_rate",
        "colour",
    ):
        assert expected in paths, (expected, paths)
    text = str(info.value)
    assert str(bad) in text and "6 problems" in text
    assert "valid keys here: source" in text  # unknown key names the valid ones


def test_overrides_are_typed_and_build_split_mappings():
    cfg = load_config(
        None,
        [
            "training.epochs=2",
            "data.source.train=a.csv",
            "data.source.test=b.csv",
            "method.kind=lora",
            "training.learning_rate=3e-4",
            "model.trust_remote_code=false",
        ],
    )
    assert cfg.training.epochs == 2
    assert cfg.data.source == {"train": "a.csv", "test": "b.csv"}
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.model.trust_remote_code is False


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["training.epochs"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.kind=full", "method.lora_r=4"], "only apply to lora/qlora/dora"),
        (["method.kind=lora", "method.quant_type=nf4"], "only apply to qlora"),
        (["data.task=regression", "data.class_weighting=balanced"], "data.class_weighting: must be 'none'"),
        (["training.effective_batch_size=10", "training.micro_batch_size=4"], "multiple of"),
        (["data.source.train=a.csv", "data.source.dev=b.csv"], "unknown split name"),
        (["registry.name=../escape"], "registry.name"),
    ],
)
def test_contradictory_settings_are_rejected(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_shipped_configs_all_load():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ must ship at least one config"
    for path in configs:
        load_config(path)


def test_method_defaults_are_resolved_in_one_place():
    assert learning_rate_for(load_config(None, ["training.learning_rate=default"]), "full") == (
        2e-5,
        "method default for full",
    )
    assert learning_rate_for(load_config(None, ["training.learning_rate=default"]), "lora")[0] == 2e-4
    assert learning_rate_for(load_config(None, ["training.learning_rate=1e-3"]), "lora") == (1e-3, "config")
    assert learning_rate_for(load_config(None), "full") == (None, "search pending")  # auto: the search decides
    assert (
        load_config(None).training.epochs == 10
    )  # a cap: early stopping on the validation metric usually ends training


def test_learning_rate_takes_auto_a_number_or_default_never_null():
    with pytest.raises(ConfigError, match="use 'default'"):
        load_config(None, ["training.learning_rate=null"])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_config(None, ["training.learning_rate=fast"])


@pytest.mark.parametrize("eff, procs, micro", [(16, 1, None), (64, 1, None), (48, 2, None), (24, 1, 8)])
def test_effective_batch_is_micro_times_accumulation_times_processes(eff, procs, micro):
    m, accum = batch_plan(eff, procs, micro)
    assert m * accum * procs == eff
    assert m <= 32


def test_field_and_cross_field_errors_come_in_one_round(tmp_path):
    """A wrong type, an unknown key and two contradictions: all four in one error, not one per round."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: {kind: full, lora_r: 4}\n"
        "training: {epochs: many, effective_batch_size: 10, micro_batch_size: 4}\n"
        "data: {task: regression, class_weighting: balanced, colour: red}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    paths = [p for p, _ in info.value.problems]
    assert {"training.epochs", "data.colour", "method", "training.effective_batch_size", "data.class_weighting"} <= set(
        paths
    )
    text = str(info.value)
    assert "only apply to lora/qlora/dora" in text and "multiple of" in text and "must be 'none'" in text


def test_a_check_whose_input_does_not_parse_is_skipped_not_guessed():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.micro_batch_size=lots", "training.effective_batch_size=10"])
    assert [p for p, _ in info.value.problems] == ["training.micro_batch_size"]


def test_yaml_duplicate_keys_and_yes_for_a_number_are_errors(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: {name_or_path: a}\ntraining: {epochs: 2}\nmodel: {name_or_path: b}\n")
    with pytest.raises(ConfigError, match="duplicate key 'model'"):
        load_config(dup)
    yes = tmp_path / "yes.yaml"
    yes.write_text("training: {epochs: yes}\n")
    with pytest.raises(ConfigError, match="training.epochs: .*boolean"):
        load_config(yes)
    assert load_config(None, ["model.trust_remote_code=yes"]).model.trust_remote_code is True  # a real bool field
