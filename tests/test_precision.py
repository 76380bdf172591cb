"""training.precision on CPU: bf16 trains under CPU autocast (matmuls in bfloat16; weights, optimizer state and the
saved model stay float32) and tracks the fp32 run; fp16 on CPU falls back to fp32 with a note; auto stays fp32 on
CPU unless CPU_AUTO_BF16 says otherwise (and then only where the CPU has native bf16)."""

from __future__ import annotations

import json

import pytest
from conftest import prepare_run
from test_train import make_cfg, prepare, step_losses, task_rows, write_rows


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("precision-data") / "single", task_rows("single_label"))


def _train(tmp_path, tiny_llama, source, precision: str):
    from tasks.training import loop

    extra = [f"training.precision={precision}", "training.learning_rate=0.003", "training.epochs=2"]
    cfg = make_cfg(tmp_path / precision, source, tiny_llama, "single_label", "full", extra)
    run = prepare_run(cfg, *prepare(cfg, tiny_llama))
    _, model = loop.run(str(run), return_model=True)
    return run, model


def test_bf16_on_cpu_trains_under_autocast_and_keeps_float32_weights(tmp_path, tiny_llama, source):
    import torch

    run16, model16 = _train(tmp_path, tiny_llama, source, "bf16")
    run32, _ = _train(tmp_path, tiny_llama, source, "fp32")
    plan = json.loads((run16 / "plan.json").read_text())
    assert plan["precision"] == "bf16" and plan["base_dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    from safetensors.torch import load_file

    weights = load_file(str(next((run16 / "model").glob("*.safetensors"))))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    a, b = step_losses(run16), step_losses(run32)
    assert len(a) == len(b) and a != b  # autocast really ran: bf16 rounding changes the losses...
    assert a[0] == pytest.approx(b[0], rel=0.02)  # ...but only by rounding at the first step
    assert sum(a[-4:]) / 4 < 0.8 * sum(a[:4]) / 4  # and it learns


def test_precision_on_cpu_resolves_with_notes(monkeypatch):
    from tasks.training import planner

    assert planner._precision("fp32", "cpu") == ("fp32", None)
    precision, note = planner._precision("fp16", "cpu")
    assert precision == "fp32" and "fp16 requested but training runs on CPU" in note
    monkeypatch.setattr(planner, "_cpu_has_bf16", lambda: False)
    precision, note = planner._precision("bf16", "cpu")
    assert precision == "bf16" and "emulated" in note
    for native, auto_bf16, want in ((True, False, "fp32"), (True, True, "bf16"), (False, True, "fp32")):
        monkeypatch.setattr(planner, "_cpu_has_bf16", lambda native=native: native)
        monkeypatch.setattr(planner, "CPU_AUTO_BF16", auto_bf16)
        assert planner._precision("auto", "cpu") == (want, None), (native, auto_bf16)
