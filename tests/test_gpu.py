"""CUDA checks: QLoRA's 4-bit base on a GPU, bf16 compute, the merge into the dequantized weights, GPU memory.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu tests/test_gpu.py -s`.
The CPU suite covers the same code paths with float32 compute (tests/test_train.py, tests/test_export.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import toy_rows, write_csv
from test_export import make_eval
from test_train import learnable_bert, make_cfg, prepare, step_losses  # noqa: F401 (learnable_bert: a fixture)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA device (none here)")]


def test_qlora_trains_in_4bit_on_cuda_with_bf16_compute_and_exports_a_faithful_merge(tmp_path, learnable_bert):
    import torch
    from conftest import prepare_run

    from tasks.files import read_json
    from tasks.release.export import export_run
    from tasks.training import loop as train_worker

    src = write_csv(tmp_path / "toy.csv", toy_rows(240))
    cfg = make_cfg(
        tmp_path / "ws",
        src,
        learnable_bert,
        "single_label",
        "qlora",
        ["training.learning_rate=0.01", "training.epochs=4"],
    )
    run = prepare_run(cfg, *prepare(cfg, learnable_bert))
    summary, trained = train_worker.run(str(run), return_model=True)
    plan = read_json(run / "plan.json")

    assert plan["device"].startswith("cuda")
    assert plan["quantization"]["compute_dtype"] == "bfloat16"  # auto on a bf16-capable GPU
    assert plan["optimizer"] == "paged_adamw_32bit"  # training.optimizer=auto for a 4-bit base on CUDA
    four_bit = [m for m in trained.modules() if type(m).__module__.startswith("bitsandbytes")]  # not peft's wrappers
    assert four_bit and all(m.weight.device.type == "cuda" for m in four_bit)
    losses = step_losses(run)
    assert losses and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"training loss did not go down on CUDA: {first:.4f} -> {last:.4f}"
    assert summary["peak_gpu_mb"] > 0

    result = export_run(cfg, str(run), str(make_eval(tmp_path / "ws", run)))
    v = result.merge_verification
    assert v["passed"] and v["quantized_reference"] and v["dequantized_layers"] == len(four_bit)
    assert v["merged_vs_adapter"]["max_abs_logit_diff"] < cfg.export.merge_tolerance
    q = v["merged_vs_quantized"]  # the 4-bit model computes in bf16: rounding, not quantization error
    assert q["identical_prediction_share"] >= cfg.export.qlora_min_agreement
    files = {p.name for p in Path(result.path).iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt")) for n in files)
    print(
        "GPU_FIGURES "
        + json.dumps(
            {
                "device": torch.cuda.get_device_name(0),
                "peak_gpu_mb": summary["peak_gpu_mb"],
                "steps": summary["global_step"],
                "loss_first5": round(first, 4),
                "loss_last5": round(last, 4),
                "samples_per_second": summary["samples_per_second"],
                "merged_vs_adapter": v["merged_vs_adapter"]["max_abs_logit_diff"],
                "merged_vs_4bit": q,
            }
        )
    )


def test_qlora_against_full_on_a_1b_decoder_peak_memory_and_tokens_per_second(tmp_path):
    """[2-4]'s GPU check: a random-initialised decoder of TinyLlama-1.1B's shape, full fine-tuning vs QLoRA (paged
    AdamW, training.optimizer=auto), one epoch of instruction rows each; prints one line of figures."""
    import torch
    from test_decoder_check import TINYLLAMA_SHAPE, decoder_run, random_decoder

    base = random_decoder(tmp_path / "base-1b", TINYLLAMA_SHAPE)
    runs = {}
    for method in ("full", "qlora"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        runs[method] = decoder_run(tmp_path, base, method, steps_rows=160)
    full, qlora = runs["full"], runs["qlora"]
    assert full["device"].startswith("cuda") and qlora["optimizer"] == "paged_adamw_32bit"
    assert qlora["peak_gpu_mb"] < full["peak_gpu_mb"] / 2, runs  # 4-bit base and adapters vs fp32 weights + AdamW
    print("GPU_DECODER_FIGURES " + json.dumps({"device": torch.cuda.get_device_name(0), "runs": runs}))
