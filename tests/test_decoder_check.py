"""The harness of the GPU check in tests/test_gpu.py (QLoRA vs full fine-tuning of a random-initialised decoder:
peak memory and tokens/s, one line of figures), run here on CPU with a tiny decoder so that the code a GPU session
runs is known to work before it gets a device."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import prepare_run, write_csv
from test_sft import _chat_tokenizer, _sft_rows

TINYLLAMA_SHAPE = {  # TinyLlama-1.1B: 1.10B parameters
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}


def random_decoder(folder: Path, shape: dict, dtype: str = "bfloat16") -> Path:
    """A random-initialised Llama decoder of `shape` with a small ChatML tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _chat_tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    del model
    return folder


def decoder_run(tmp: Path, base: Path, method: str, steps_rows: int = 64, extra: list[str] = ()) -> dict:
    """Train `method` on instruction rows for one epoch in-process; the figures of the GPU check's line."""
    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.training import loop

    src = write_csv(tmp / f"{method}.csv", _sft_rows(steps_rows))
    cfg = load_config(
        None,
        [
            f"workspace={tmp / method}",
            f"data.source={src}",
            f"model.name_or_path={base}",
            "data.task=sft",
            f"method.kind={method}",
            *(["method.target_modules=all-linear"] if method != "full" else []),
            "training.learning_rate=0.001",
            "training.epochs=1",
            "training.effective_batch_size=8",
            "data.max_length=48",
            *extra,
        ],
    )
    prepared = prepare_dataset(cfg)
    tokenized = tokenize_dataset(prepared.path, str(base), cfg)
    run = prepare_run(cfg, prepared.path, tokenized.path)
    t0 = time.perf_counter()
    summary = loop.run(str(run))
    wall = time.perf_counter() - t0
    plan = json.loads((run / "plan.json").read_text())
    tokens = json.loads((Path(tokenized.path) / "tokenized.json").read_text())["tokens"]["train"]["tokens"]
    return {
        "method": method,
        "device": plan["device"],
        "optimizer": plan["optimizer"],
        "precision": plan["precision"],
        "gradient_checkpointing": plan.get("gradient_checkpointing"),
        "trainable_parameters": summary["trainable_parameters"],
        "peak_gpu_mb": summary.get("peak_gpu_mb"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "tokens_per_second": round(
            tokens * summary["epochs_run"] / max(summary["train_seconds_this_attempt"], 1e-9), 1
        ),
        "wall_s": round(wall, 1),
        "steps": summary["global_step"],
    }


def test_the_gpu_checks_harness_runs_qlora_and_full_on_a_tiny_decoder(tmp_path):
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    base = random_decoder(tmp_path / "base", shape | {"num_key_value_heads": 2}, dtype="float32")
    full = decoder_run(tmp_path, base, "full")
    qlora = decoder_run(tmp_path, base, "qlora")
    assert full["device"] == qlora["device"] == "cpu" and full["steps"] == qlora["steps"] > 0
    assert qlora["optimizer"] == full["optimizer"] == "adamw"  # auto: paged only on CUDA
    assert qlora["trainable_parameters"] < full["trainable_parameters"] / 2
    assert full["tokens_per_second"] > 0 and qlora["tokens_per_second"] > 0 and full["peak_rss_mb"] > 0
