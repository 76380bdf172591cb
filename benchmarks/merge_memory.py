"""Peak memory of merging a LoRA adapter into a ~1B decoder: today's in-memory float32 merge vs the shard-wise bf16
merge (tasks/release/shard_merge.py). Prints one JSON line.

A random-initialised Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 kv
heads, vocab 32000) is built in bfloat16 and saved as sharded safetensors (500MB shards), with a random LoRA adapter on
every linear layer saved by peft (r 16). Each measurement runs in a fresh subprocess and reports its peak RSS
(VmHWM from /proc/self/status), beside the same figure of a process that only imports torch/transformers/peft:
  (a) float32: AutoModelForCausalLM.from_pretrained(float32) + PeftModel + merge_and_unload + save_pretrained
      (what tasks/release/merge.py does without the shard-wise path, minus the verification);
  (b) shard-wise: tasks.release.shard_merge.shard_merge into bfloat16 shards.

    .venv/bin/python benchmarks/merge_memory.py [--layers 22] [--workdir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
base, adapter, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
cfg = LlamaConfig(num_hidden_layers=layers, **SHAPE)
torch.set_default_dtype(torch.bfloat16)
model = LlamaForCausalLM(cfg)
model.save_pretrained(base, max_shard_size="500MB")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
model.save_pretrained(adapter)
print(sum(p.numel() for p in model.base_model.model.parameters() if not p.requires_grad))
"""

PEAK = """
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

IMPORTS = (
    PEAK
    + """
import torch, transformers, peft
print(peak())
"""
)

FLOAT32 = (
    PEAK
    + """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
merged.save_pretrained(out, max_shard_size="500MB")
print(peak())
"""
)

SHARDWISE = (
    PEAK
    + """
import sys, torch, peft, transformers
from transformers import AutoConfig, AutoModelForCausalLM
from tasks.release.shard_merge import shard_merge
base, adapter, out = sys.argv[1:4]
with torch.device("meta"):
    meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
shard_merge(base, adapter, out, meta, "bfloat16", 500 * 10**6)
print(peak())
"""
)


def _run(code: str, *args: str) -> tuple[int, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return int(proc.stdout.strip().splitlines()[-1]), round(time.perf_counter() - t, 1)


def _size(folder: Path, pattern: str = "*.safetensors") -> tuple[int, int]:
    sizes = [f.stat().st_size for f in folder.glob(pattern)]
    return sum(sizes), max(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    gib = 2**30
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        base, adapter = root / "base", root / "adapter"
        params, build_s = _run(BUILD.replace("**SHAPE", f"**{SHAPE!r}"), str(base), str(adapter), str(args.layers))
        disk, shard = _size(base)
        imports, _ = _run(IMPORTS)
        fp32, fp32_s = _run(FLOAT32, str(base), str(adapter), str(root / "out32"))
        out32, _ = _size(root / "out32")
        bf16, bf16_s = _run(SHARDWISE, str(base), str(adapter), str(root / "out16"))
        out16, out16_shard = _size(root / "out16")
        print(
            json.dumps(
                {
                    "benchmark": "merge_memory",
                    "base_params": params,
                    "layers": args.layers,
                    "base_on_disk_gib": round(disk / gib, 3),
                    "largest_base_shard_gib": round(shard / gib, 3),
                    "adapter_gib": round((adapter / "adapter_model.safetensors").stat().st_size / gib, 3),
                    "imports_only_peak_rss_gib": round(imports / gib, 3),
                    "float32_merge_peak_rss_gib": round(fp32 / gib, 3),
                    "float32_merge_s": fp32_s,
                    "float32_output_gib": round(out32 / gib, 3),
                    "shardwise_bf16_peak_rss_gib": round(bf16 / gib, 3),
                    "shardwise_bf16_s": bf16_s,
                    "shardwise_output_gib": round(out16 / gib, 3),
                    "shardwise_largest_output_shard_gib": round(out16_shard / gib, 3),
                    "build_s": build_s,
                }
            )
        )


if __name__ == "__main__":
    main()
