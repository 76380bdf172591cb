"""Instruction tuning on CPU: the training child's measured peak RSS against the memory planner's total for the same
settings. SmolLM2-135M (bundled), LoRA on all linear layers, packed rows of --length tokens, micro-batch --micro,
one epoch of the SFT demo data (data/demo/sft.jsonl) at a fixed rate. Prints ONE JSON line.

    .venv/bin/python benchmarks/sft_memory.py [--micro 4] [--length 256] [--lora-dropout 0.1]

About 3 minutes on 2 cores; peak RSS is the child's own (training_summary.json), the plan is `finetune estimate`'s
`total_gb` for device cpu (GiB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    a = ap.parse_args()

    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.model.base import resolve_model
    from tasks.model.memory import estimate_memory
    from tasks.training.recipe import train_from_config

    with tempfile.TemporaryDirectory(prefix="bench-sft-memory-") as ws:
        sets = [
            f"workspace={ws}",
            f"data.source={REPO / 'data' / 'demo' / 'sft.jsonl'}",
            "data.task=sft",
            f"data.max_length={a.length}",
            "data.max_rows=400",
            "data.packing=true",
            "model.name_or_path=bundled:smollm2-135m-instruct",
            "method.kind=lora",
            "method.target_modules=all-linear",
            f"method.lora_dropout={a.lora_dropout}",
            "training.learning_rate=1e-3",
            "training.epochs=1",
            f"training.effective_batch_size={a.micro}",
            f"training.micro_batch_size={a.micro}",
        ]
        cfg = load_config(None, sets)
        prepared = prepare_dataset(cfg)
        base = resolve_model(cfg.model, cfg.workspace)
        tokenized = tokenize_dataset(prepared.path, base, cfg)
        t0 = time.perf_counter()
        run = Path(train_from_config(cfg, prepared.path, tokenized.path).path)
        summary = json.loads((run / "training_summary.json").read_text())
        est = estimate_memory(
            base,
            cfg.method.model_dump(mode="json"),
            micro_batch_size=a.micro,
            max_length=a.length,
            task="sft",
            device="cpu",
            device_memory="1000GB",
            effective_batch_size=a.micro,
        )
    plan = est["methods"]["lora"]
    print(
        json.dumps(
            {
                "benchmark": "sft_memory",
                "model": "SmolLM2-135M-Instruct (bundled)",
                "micro_batch": a.micro,
                "length": a.length,
                "lora_dropout": a.lora_dropout,
                "peak_rss_gib": round(summary["peak_rss_mb"] / 1024, 3),
                "planned_total_gib": plan["total_gb"],
                "planned_activations_gib": plan["activations"],
                "planned_over_measured": round(plan["total_gb"] / (summary["peak_rss_mb"] / 1024), 3),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
