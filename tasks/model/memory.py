"""Memory estimates before training and the `auto` method choice (full, LoRA or QLoRA: the cheapest that fits).

`estimate_memory(base, method_settings, ...)` counts parameters on the meta device (nothing is loaded), so
`finetune estimate` and `method.kind: auto` cost a config read; each method's weights, gradients and optimizer
state come from its method object (tasks/model/methods.py). `available_memory_bytes(device)` is what the choice
compares against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.model.build import head_module_names, is_linear, meta_model, resolve_targets
from tasks.model.methods import AUTO_PREFERENCE, METHODS, ParameterCounts
from tasks.optimizers import STATE_BYTES, resolve_optimizer


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


def count_parameters(meta, heads: list[str], targets: list[str], rank: int) -> ParameterCounts:
    total = sum(p.numel() for p in meta.parameters())
    head = sum(p.numel() for n, p in meta.named_parameters() if any(n.startswith(h + ".") for h in heads))
    linear = lora = dora = biggest = 0
    for name, m in meta.named_modules():
        if not is_linear(m) or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        linear += m.weight.numel()
        if name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = m.weight.shape[0], m.weight.shape[1]
            lora += rank * (in_f + out_f)
            dora += out_f
            biggest = max(biggest, m.weight.numel())
    return ParameterCounts(total, head, linear, lora, dora, biggest)


def activation_bytes(config, micro_batch: int, max_length: int, on_gpu: bool) -> float:
    """Activations (Korthikanti et al. 2022): s*b*h*(34 + 5*a*s/h) bytes per layer at 16-bit; x2 at fp32."""
    hidden = int(getattr(config, "hidden_size", getattr(config, "n_embd", 768)))
    layers = int(getattr(config, "num_hidden_layers", getattr(config, "n_layer", 12)))
    heads = int(getattr(config, "num_attention_heads", getattr(config, "n_head", 12)))
    s, b = max_length, micro_batch
    act16 = layers * s * b * hidden * (34 + 5 * heads * s / hidden)
    return act16 * (1 if on_gpu else 2)


def _choose(total: int, fits: dict[str, bool]) -> tuple[str | None, str]:
    """Full for models under 1B parameters when it fits, then the cheapest adapter method that fits."""
    for kind in AUTO_PREFERENCE:
        if not fits.get(kind):
            continue
        if METHODS[kind].adapter is False and total >= 1e9:
            continue
        if not METHODS[kind].adapter:
            return kind, f"{total / 1e6:.0f}M parameters (< 1B) and full fine-tuning fits in memory"
        if METHODS[kind].quantized:
            return kind, "memory is tight: only the 4-bit base (QLoRA) fits"
        return kind, ("1B+ parameters: LoRA" if total >= 1e9 else "full fine-tuning does not fit; LoRA does")
    return None, "no method fits the available memory; lower data.max_length or training.micro_batch_size"


def estimate_memory(
    base: str,
    method_settings: dict,
    *,
    micro_batch_size: int,
    max_length: int,
    num_labels: int = 2,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device: str = "cpu",
    headroom: float = 0.8,
    optimizer: str = "auto",
) -> dict:
    """Training memory per method (weights, gradients, optimizer state, activations) and the auto choice.

    `headroom` is the share of available memory a plan may use; `optimizer` is training.optimizer, resolved per
    method (8-bit state is a quarter of AdamW's two fp32 moments). A method the optimizer cannot run with on this
    device (a paged optimizer off CUDA) does not fit."""
    from transformers import AutoConfig

    on_gpu = device.startswith("cuda")
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, revision=revision)
    config.num_labels = num_labels
    meta = meta_model(config, trust_remote_code)
    heads = head_module_names(meta)
    targets = resolve_targets(meta, heads, method_settings.get("target_modules", "auto"))
    counts = count_parameters(meta, heads, targets, int(method_settings.get("lora_r", 8)))
    del meta
    act = activation_bytes(config, micro_batch_size, max_length, on_gpu)
    available = available_memory_bytes(device)
    budget = available * headroom
    out: dict[str, Any] = {
        "base_model": base,
        "device": device,
        "parameters": counts.total,
        "hidden_size": int(getattr(config, "hidden_size", getattr(config, "n_embd", 768))),
        "layers": int(getattr(config, "num_hidden_layers", getattr(config, "n_layer", 12))),
        "target_modules": targets,
        "head_modules": heads,
        "lora_parameters": counts.lora,
        "micro_batch_size": micro_batch_size,
        "max_length": max_length,
        "available_gb": _gb(available),
        "budget_gb": _gb(budget),
        "methods": {},
    }
    for kind, method in METHODS.items():
        parts = method.memory(counts, on_gpu)
        try:
            opt = resolve_optimizer(optimizer, method.quantized, device)
        except ValueError as exc:
            opt, refused = None, f"training.optimizer: {exc}"
        parts["optimizer"] *= STATE_BYTES.get(opt or "adamw", 8.0) / 8.0
        extra = parts.pop("dora_weight_norm", 0.0)
        # libraries + allocator slack on CPU, the CUDA context on a GPU (measured ~0.5 GB)
        parts.update(activations=act + extra, runtime=0.5 * 1024**3)
        tot = sum(parts.values())
        out["methods"][kind] = {k: _gb(v) for k, v in parts.items()} | {
            "total_gb": _gb(tot),
            "optimizer_kind": opt,
            "fits": opt is not None and tot <= budget,
            "bytes": {k: int(v) for k, v in parts.items()} | {"total": int(tot)},
        }
    out["choice"], out["reason"] = _choose(counts.total, {k: v["fits"] for k, v in out["methods"].items()})
    if all(m["optimizer_kind"] is None for m in out["methods"].values()):
        out["reason"] = refused
    return out


def format_estimate(est: dict) -> str:
    """A small table for `finetune estimate`."""
    lines = [
        f"base model: {est['base_model']}  ({est['parameters'] / 1e6:.1f}M parameters, device {est['device']})",
        f"micro-batch {est['micro_batch_size']} x {est['max_length']} tokens; available {est['available_gb']} GB, "
        f"budget {est['budget_gb']} GB",
        f"{'method':<7} {'weights':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'runtime':>9} {'total GB':>9}  fits",
    ]
    for kind, m in est["methods"].items():
        lines.append(
            f"{kind:<7} {m['weights']:>9.3f} {m['gradients']:>9.3f} {m['optimizer']:>9.3f} "
            f"{m['activations']:>9.3f} {m['runtime']:>9.3f} {m['total_gb']:>9.3f}  {'yes' if m['fits'] else 'no'}"
        )
    lines.append(f"auto choice: {est['choice'] or 'none'} ({est['reason']})")
    return "\n".join(lines)
