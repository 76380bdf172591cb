"""Memory estimates before training and the `auto` method choice (full, LoRA or QLoRA: the cheapest that fits).

`estimate_memory(base, method_cfg, ...)` counts parameters on the meta device (nothing is loaded), so
`finetune estimate` and `method.kind: auto` cost a config read. `available_memory_bytes(device)` is what the
choice compares against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.modeling import _is_linear, _meta_model, find_target_modules, head_module_names, resolve_device

def available_memory_bytes(device: str) -> int:
    """Free accelerator memory on CUDA; MemAvailable from /proc/meminfo on CPU."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _gb(x: float) -> float:
    return round(x / 1024**3, 3)


def estimate_memory(base: str, method_cfg: dict, *, micro_batch_size: int, max_length: int, num_labels: int = 2,
                    trust_remote_code: bool = False, revision: str | None = None, device: str | None = None,
                    headroom: float = 0.8) -> dict:
    """Training memory per method (weights, gradients, optimizer state, activations) and the auto choice.

    Rule of thumb: full for models under 1B parameters when it fits, LoRA for bigger ones, QLoRA when
    LoRA does not fit either. `headroom` is the share of available memory a plan may use.
    """
    from transformers import AutoConfig

    device = device or resolve_device()
    on_gpu = device.startswith("cuda")
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, revision=revision)
    config.num_labels = num_labels
    meta = _meta_model(config, trust_remote_code)
    heads = head_module_names(meta)
    wanted = method_cfg.get("target_modules", "auto")
    targets = find_target_modules(meta, heads) if wanted == "auto" else list(wanted)
    r = int(method_cfg.get("lora_r", 8))

    total = sum(p.numel() for p in meta.parameters())
    head_params = sum(p.numel() for n, p in meta.named_parameters() if any(n.startswith(h + ".") for h in heads))
    linear_params, lora_params, dora_extra, biggest = 0, 0, 0, 0
    for name, m in meta.named_modules():
        if not _is_linear(m) or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        linear_params += m.weight.numel()
        if name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = m.weight.shape[0], m.weight.shape[1]
            lora_params += r * (in_f + out_f)
            dora_extra += out_f
            biggest = max(biggest, m.weight.numel())
    hidden = int(getattr(config, "hidden_size", getattr(config, "n_embd", 768)))
    layers = int(getattr(config, "num_hidden_layers", getattr(config, "n_layer", 12)))
    heads_n = int(getattr(config, "num_attention_heads", getattr(config, "n_head", 12)))
    del meta

    # Activations per layer (Korthikanti et al. 2022): s*b*h*(34 + 5*a*s/h) bytes at 16-bit; x2 at fp32.
    s, b = max_length, micro_batch_size
    act16 = layers * s * b * hidden * (34 + 5 * heads_n * s / hidden)
    act_full = act16 * (1 if on_gpu else 2)
    base_bytes = 2 if on_gpu else 4  # adapters keep a 16-bit frozen base on GPU, fp32 on CPU
    trainable_adapter = lora_params + head_params
    other = total - linear_params  # embeddings, norms, head: not quantized (fp32 after kbit prep)
    plans = {
        "full": {"weights": 4 * total, "gradients": 4 * total, "optimizer": 8 * total, "activations": act_full},
        "lora": {"weights": base_bytes * total + 4 * trainable_adapter, "gradients": 4 * trainable_adapter,
                 "optimizer": 8 * trainable_adapter, "activations": act_full},
        "qlora": {"weights": int(linear_params * (0.5 + 0.0161)) + 4 * other + 4 * lora_params,
                  "gradients": 4 * trainable_adapter, "optimizer": 8 * trainable_adapter, "activations": act_full},
        "dora": {"weights": base_bytes * total + 4 * (trainable_adapter + dora_extra),
                 "gradients": 4 * (trainable_adapter + dora_extra), "optimizer": 8 * (trainable_adapter + dora_extra),
                 "activations": act_full + 8 * biggest},
    }
    for parts in plans.values():  # libraries + allocator slack on CPU, the CUDA context on a GPU (measured ~0.5 GB)
        parts["runtime"] = 0.5 * 1024**3
    available = available_memory_bytes(device)
    budget = available * headroom
    out: dict[str, Any] = {
        "base_model": base, "device": device, "parameters": total, "hidden_size": hidden, "layers": layers,
        "target_modules": targets, "head_modules": heads, "lora_parameters": lora_params,
        "micro_batch_size": micro_batch_size, "max_length": max_length,
        "available_gb": _gb(available), "budget_gb": _gb(budget), "methods": {},
    }
    for kind, parts in plans.items():
        tot = sum(parts.values())
        out["methods"][kind] = {k: _gb(v) for k, v in parts.items()} | {
            "total_gb": _gb(tot), "fits": tot <= budget, "bytes": {k: int(v) for k, v in parts.items()} | {"total": int(tot)}}
    fits = {k: v["fits"] for k, v in out["methods"].items()}
    if total < 1e9 and fits["full"]:
        choice, why = "full", f"{total / 1e6:.0f}M parameters (< 1B) and full fine-tuning fits in memory"
    elif fits["lora"]:
        choice, why = "lora", ("1B+ parameters: LoRA" if total >= 1e9 else "full fine-tuning does not fit; LoRA does")
    elif fits["qlora"]:
        choice, why = "qlora", "memory is tight: only the 4-bit base (QLoRA) fits"
    else:
        choice, why = None, "no method fits the available memory; lower data.max_length or training.micro_batch_size"
    out["choice"], out["reason"] = choice, why
    return out


def format_estimate(est: dict) -> str:
    """A small table for `finetune estimate`."""
    lines = [f"base model: {est['base_model']}  ({est['parameters'] / 1e6:.1f}M parameters, device {est['device']})",
             f"micro-batch {est['micro_batch_size']} x {est['max_length']} tokens; available {est['available_gb']} GB, "
             f"budget {est['budget_gb']} GB",
             f"{'method':<7} {'weights':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'runtime':>9} {'total GB':>9}  fits"]
    for kind, m in est["methods"].items():
        lines.append(f"{kind:<7} {m['weights']:>9.3f} {m['gradients']:>9.3f} {m['optimizer']:>9.3f} "
                     f"{m['activations']:>9.3f} {m['runtime']:>9.3f} {m['total_gb']:>9.3f}  {'yes' if m['fits'] else 'no'}")
    lines.append(f"auto choice: {est['choice'] or 'none'} ({est['reason']})")
    return "\n".join(lines)


