"""Run configuration: one error with every problem, overrides, shipped configs, resolved defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config, resolve_training

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
    for expected in ("data.sorce", "data.split.test", "method.kind", "training.epochs", "training.learning_rate", "colour"):
        assert expected in paths, (expected, paths)
    text = str(info.value)
    assert str(bad) in text and "6 problems" in text
    assert "valid keys here: source" in text  # unknown key names the valid ones


def test_overrides_are_typed_and_build_split_mappings():
    cfg = load_config(None, ["training.epochs=2", "data.source.train=a.csv", "data.source.test=b.csv",
                             "method.kind=lora", "training.learning_rate=3e-4", "model.trust_remote_code=false"])
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
        (["data.task=regression", "data.class_weighting=balanced"], "class_weighting must be 'none'"),
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
    full = resolve_training(load_config(None, ["method.kind=full"]))
    lora = resolve_training(load_config(None, ["method.kind=lora"]))
    fixed = resolve_training(load_config(None, ["method.kind=lora", "training.learning_rate=1e-3"]))
    assert full["learning_rate"] == 2e-5 and lora["learning_rate"] == 2e-4
    assert fixed["learning_rate"] == 1e-3 and fixed["learning_rate_source"] == "config"
    assert full["epochs"] == 10  # a cap: early stopping on the validation metric usually ends training
    assert resolve_training(load_config(None))["learning_rate_source"].startswith("auto without a search")


@pytest.mark.parametrize("eff, procs, micro", [(16, 1, None), (64, 1, None), (48, 2, None), (24, 1, 8)])
def test_effective_batch_is_micro_times_accumulation_times_processes(eff, procs, micro):
    sets = [f"training.effective_batch_size={eff}", f"training.processes={procs}"]
    if micro:
        sets.append(f"training.micro_batch_size={micro}")
    t = resolve_training(load_config(None, sets))
    assert t["micro_batch_size"] * t["gradient_accumulation_steps"] * procs == eff
    assert t["micro_batch_size"] <= 32
