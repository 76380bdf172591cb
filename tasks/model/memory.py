"""The memory planner: training memory per method, the largest micro-batch that fits, and the `auto` method choice.

`plan_memory(config, ...)` counts parameters on the meta device (nothing is loaded, so 7B/70B configs plan on a
laptop) and adds, per method (tasks/model/methods.py): weights by dtype (NF4 with double quantization for QLoRA),
gradients, optimizer state by optimizer kind (tasks/optimizers.py), activations with or without gradient
checkpointing for a micro-batch x max_length, and a runtime constant. It then searches the largest micro-batch
(powers of two up to the configured one) that fits the device and fills the effective batch with accumulation.
`estimate_memory(base, ...)` does the same from a model folder or name (only config.json is read).

Paged optimizers (paged_adamw_8bit/32bit) keep their state in CUDA unified memory, allocated by bitsandbytes
outside torch's allocator; the driver evicts it to CPU RAM under pressure. Their state is shown in its own `paged`
part and is not counted against the device (nor in the device total): it needs that much CPU RAM at worst.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tasks.model.build import head_module_names, is_linear, meta_model, resolve_targets
from tasks.model.methods import AUTO_PREFERENCE, METHODS, ParameterCounts
from tasks.optimizers import PAGED, STATE_BYTES, resolve_optimizer

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces and allocator slack on a GPU (not seen by torch.cuda.max_memory_allocated);
# allocator slack on CPU (the libraries themselves are already loaded when a step's memory is measured).
RUNTIME_BYTES = {"cuda": 0.75 * GIB, "cpu": 0.1 * GIB}
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
_UNITS |= {"KIB": 1024, "MIB": 1024**2, "GIB": GIB, "TIB": 1024**4}


def parse_memory(text: str | int | float) -> int:
    """'24GB' (decimal), '24GiB', '24G', '512MB' or a number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; fix: write it like 24GB, 24GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[unit])


def device_memory_known(device: str) -> bool:
    """Whether this machine can tell the device's free memory (CPU always; CUDA where a GPU is present)."""
    if not device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


def available_memory_bytes(device: str) -> int:
    """Free accelerator memory on CUDA; MemAvailable from /proc/meminfo on CPU."""
    if device.startswith("cuda"):
        if not device_memory_known(device):
            raise ValueError(f"cannot read the memory of {device}: no GPU here; fix: give it (--device-memory 24GB)")
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
    return round(x / GIB, 3)


def _output_layer(meta) -> set[str]:
    out = meta.get_output_embeddings() if hasattr(meta, "get_output_embeddings") else None
    return {n for n, m in meta.named_modules() if out is not None and m is out}


def backbone_linears(meta, heads: list[str]):
    """(name, module) of the backbone's linear layers: never the head nor a language model's output layer."""
    skip = _output_layer(meta)
    for name, m in meta.named_modules():
        if is_linear(m) and name not in skip and not any(name == h or name.startswith(h + ".") for h in heads):
            yield name, m


def count_parameters(meta, heads: list[str], targets: list[str], rank: int) -> ParameterCounts:
    """Parameter counts; `linear` is what bitsandbytes quantizes: the backbone's linear layers, never the head nor
    a language model's output layer (transformers' bnb integration keeps lm_head out of 4-bit)."""
    total = sum(p.numel() for p in meta.parameters())
    head = sum(p.numel() for n, p in meta.named_parameters() if any(n.startswith(h + ".") for h in heads))
    linear = lora = dora = biggest = 0
    for name, m in backbone_linears(meta, heads):
        linear += m.weight.numel()
        if name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = m.weight.shape[0], m.weight.shape[1]
            lora += rank * (in_f + out_f)
            dora += out_f
            biggest = max(biggest, m.weight.numel())
    return ParameterCounts(total, head, linear, lora, dora, biggest)


def shape_of(config) -> dict[str, int]:
    """The numbers the activation formula needs, from a transformers config (Llama, BERT, GPT-2 names)."""
    g = lambda *names, default=0: next((int(getattr(config, n)) for n in names if getattr(config, n, None)), default)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model", default=768)
    heads = g("num_attention_heads", "n_head", default=12)
    kv = g("num_key_value_heads", default=heads)
    act = str(getattr(config, "hidden_act", getattr(config, "activation_function", "gelu")))
    return {
        "hidden": hidden,
        "layers": g("num_hidden_layers", "n_layer", default=12),
        "intermediate": g("intermediate_size", "n_inner", default=4 * hidden),
        "kv_hidden": hidden * kv // max(1, heads),
        "vocab": g("vocab_size", default=0),
        "gated": int(act in ("silu", "swish", "swiglu") or "llama" in str(getattr(config, "model_type", ""))),
    }


def activation_bytes(
    shape: dict[str, int],
    micro_batch: int,
    max_length: int,
    *,
    act_bytes: float,
    checkpointing: bool,
    lm_logits: bool,
    loss_chunks: int = 1,
    dropout_inputs: float = 0.0,
) -> float:
    """Activations kept for backward. Per token and layer (fused attention: no seq x seq scores): the attention
    block keeps its norm input, the q/k/v input and outputs, the attention output and the o_proj input; the MLP its
    norm input, input and 4 (gated: gate, up, act, product) or 3 intermediate-sized tensors. With checkpointing only
    each layer's input is kept, plus one layer's full activations during its recompute. A language model adds its
    logits (vocab per token) and the loss's fp32 copy of them (in `loss_chunks` pieces when the loss is chunked).
    `dropout_inputs`: features per token and layer that go through LoRA dropout (the in_features of every adapted
    linear layer, when lora_dropout > 0): each is kept twice for backward, dropped-out copy and mask (measured:
    SmolLM2-135M, LoRA on all linear layers, 4 x 192 tokens on CPU: 3.49 GiB per step with lora_dropout 0.1, 2.06 GiB
    without; 8 bytes per element of a float32 input in isolation)."""
    h, inter, kv = shape["hidden"], shape["intermediate"], shape["kv_hidden"]
    tokens = micro_batch * max_length
    per_layer = tokens * act_bytes * (6 * h + 2 * kv + (4 if shape["gated"] else 3) * inter + 2 * dropout_inputs)
    if checkpointing:
        layers = shape["layers"] * tokens * act_bytes * h + per_layer
    else:
        layers = shape["layers"] * per_layer
    logits = tokens * shape["vocab"] * (act_bytes + 4.0 / max(1, loss_chunks)) if lm_logits else 0.0
    return layers + logits


# `auto` trains LoRA on a 16-bit base only when that base takes at most this share of the memory budget, leaving the
# rest for batches and peaks; above it QLoRA's 4-bit base is chosen. Llama-3.1-8B's bf16 base (15 GiB) would fit a
# 24 GB GPU for LoRA at micro-batch 2 with checkpointing, with ~5 % to spare: QLoRA runs there at micro-batch 16.
AUTO_LORA_WEIGHT_SHARE = 0.5


def _choose(total: int, rows: dict[str, dict], budget: float) -> tuple[str | None, str]:
    """Full for models under 1B parameters when it fits; then LoRA/DoRA when they fit with their 16-bit base at
    most AUTO_LORA_WEIGHT_SHARE of the budget; then QLoRA."""
    for kind in AUTO_PREFERENCE:
        method, row = METHODS[kind], rows.get(kind)
        if row is None or not row["fits"]:
            continue
        if not method.adapter:
            if total >= 1e9:
                continue
            return kind, f"{total / 1e6:.0f}M parameters (< 1B) and full fine-tuning fits in memory"
        if method.quantized:
            return kind, "memory is tight: the 4-bit base (QLoRA) leaves room for the batch"
        if row["bytes"]["weights"] > AUTO_LORA_WEIGHT_SHARE * budget:
            continue
        return kind, ("1B+ parameters: LoRA" if total >= 1e9 else "full fine-tuning does not fit; LoRA does")
    return None, (
        "no method fits the available memory, even at micro-batch 1; lower data.max_length or train on a device "
        "with more memory"
    )


def micro_batch_candidates(configured: int, per_process: int) -> list[int]:
    """The configured micro-batch, then the powers of two below it that divide the per-process batch."""
    out = [configured] + [2**k for k in range(configured.bit_length(), -1, -1) if 2**k < configured]
    return [m for i, m in enumerate(out) if i == 0 or per_process % m == 0]


def static_parts(method, counts: ParameterCounts, *, on_gpu: bool, opt: str, options: dict) -> dict[str, float]:
    """Weights, gradients, optimizer state (and `paged` state, kept off the device) for one method."""
    weight_bytes = options.get("weight_bytes")
    trainable_bytes = float(options.get("trainable_bytes", 4.0))
    kw = {"double_quant": options.get("double_quant", True)} if method.quantized else {}
    parts = method.memory(counts, on_gpu, weight_bytes=weight_bytes, trainable_bytes=trainable_bytes, **kw)
    grad_bytes = (weight_bytes or 4.0) if not method.adapter else trainable_bytes
    state = STATE_BYTES.get(opt, 8.0)
    if opt == "adamw" and grad_bytes == 2.0:
        state = 4.0  # torch's AdamW keeps its moments in the parameters' dtype
    parts["optimizer"] *= state / 8.0
    if options.get("optimizer_in_backward"):
        # each parameter is stepped and its gradient freed during backward: one gradient at a time
        parts["gradients"] = grad_bytes * max(options.get("largest_parameter", 0), counts.head)
    parts["dora_extra"] = parts.pop("dora_weight_norm", 0.0)
    if opt in PAGED and on_gpu:
        parts["paged"], parts["optimizer"] = parts["optimizer"], 0.0
    else:
        parts["paged"] = 0.0
    return parts


def plan_method(method, counts, shape, *, settings: dict) -> dict[str, Any]:
    """Search micro-batch x checkpointing for one method: the largest micro-batch that fits, checkpointing only
    when needed (unless the config fixes it); the smallest try is reported when nothing fits."""
    s = settings
    static = static_parts(method, counts, on_gpu=s["on_gpu"], opt=s["opt"], options=s)
    fixed = s.get("gradient_checkpointing")
    if fixed is None and method.checkpointing_default(s["on_gpu"]):
        fixed = True
    modes = [bool(fixed)] if fixed is not None else [False, True]
    tried = None
    for micro in micro_batch_candidates(s["micro_batch_size"], s["per_process"]):
        for ckpt in modes:
            act = activation_bytes(
                shape,
                micro,
                s["max_length"],
                act_bytes=s["act_bytes"],
                checkpointing=ckpt,
                lm_logits=s["lm_logits"],
                loss_chunks=s.get("loss_chunks", 1),
                dropout_inputs=s["dropout_inputs"] if method.adapter else 0.0,
            )
            parts = {k: static[k] for k in ("weights", "gradients", "optimizer")}
            parts |= {"activations": act + static["dora_extra"], "runtime": s["runtime"]}
            if s.get("shards", 1) > 1 and not method.quantized:  # fsdp (4-bit bases run ddp: not sharded)
                parts = _sharded(parts, s["shards"], shape["layers"])
            total = sum(parts.values())
            tried = (micro, ckpt, parts, total)
            if s["opt_ok"] and total <= s["budget"]:
                return _method_row(tried, static["paged"], s, fits=True)
    return _method_row(tried, static["paged"], s, fits=False)


def _sharded(parts: dict, shards: int, layers: int) -> dict:
    """FSDP per process: weights, gradients and optimizer state divided over the processes, plus the full weights of
    the block being computed and of the one prefetched (two of `layers` blocks, gathered and then freed)."""
    out = dict(parts)
    for k in ("weights", "gradients", "optimizer"):
        out[k] = parts[k] / shards
    out["gathered"] = 2 * parts["weights"] / max(1, layers)
    return out


def _method_row(tried, paged: float, s: dict, fits: bool) -> dict[str, Any]:
    micro, ckpt, parts, total = tried
    accum = max(1, -(-s["per_process"] // micro))
    return {k: _gb(v) for k, v in parts.items()} | {
        "paged": _gb(paged),
        "total_gb": _gb(total),
        "allocated_gb": _gb(total - parts["runtime"]),
        "optimizer_kind": s["opt"] if s["opt_ok"] else None,
        "fits": fits,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "gradient_checkpointing": ckpt,
        "bytes": {k: int(v) for k, v in parts.items()} | {"paged": int(paged), "total": int(total)},
    }


def _dropout_inputs(meta, targets: list[str], heads: list[str], layers: int, method_settings: dict) -> float:
    """Features per token and layer that pass through LoRA dropout: the inputs of the adapted linear layers."""
    if float(method_settings.get("lora_dropout", 0.0) or 0.0) <= 0:
        return 0.0
    adapted = [
        getattr(m, "in_features", None) or m.weight.shape[0]  # GPT-2's Conv1D keeps (in, out) weights
        for n, m in backbone_linears(meta, heads)
        if n.rsplit(".", 1)[-1] in targets
    ]
    return sum(adapted) / max(1, layers)


def _recipe(on_gpu: bool, method_settings: dict, largest: int, options: dict) -> dict:
    """This project's training recipe on the device, with `options` (another recipe's, for comparisons) on top."""
    recipe = {
        "weight_bytes": None,
        "act_bytes": 2.0 if on_gpu else 4.0,
        "runtime": RUNTIME_BYTES["cuda" if on_gpu else "cpu"],
        "double_quant": method_settings.get("double_quant", True),
        "largest_parameter": largest,
    } | options
    recipe["runtime"] = options.get("runtime_bytes", recipe["runtime"])
    return recipe


def plan_memory(
    config,
    method_settings: dict,
    *,
    micro_batch_size: int,
    max_length: int,
    effective_batch_size: int | None = None,
    processes: int = 1,
    strategy: str = "ddp",
    task: str = "single_label",
    device: str = "cpu",
    device_memory: int | str | None = None,
    headroom: float = 0.8,
    optimizer: str = "auto",
    gradient_checkpointing: bool | None = None,
    trust_remote_code: bool = False,
    **options: Any,
) -> dict:
    """Training memory per method for a transformers config and the `auto` choice (see the module docstring).

    `device_memory`: the device's memory (bytes or '24GB'); None detects what is free. `headroom` is the share of it
    a plan may use. `strategy` fsdp shards weights, gradients and optimizer state over `processes` (figures are per
    process). `optimizer` is training.optimizer, resolved per method; a method the optimizer cannot run with on
    this device (a paged optimizer off CUDA) does not fit. `options` describe other training recipes than this
    project's (for comparisons with published figures): weight_bytes (2: bf16 weights), trainable_bytes (2: bf16
    adapters), act_bytes, loss_chunks, optimizer_in_backward, runtime_bytes."""
    on_gpu = device.startswith("cuda")
    meta = meta_model(config, trust_remote_code, task)
    heads = head_module_names(meta, task)
    targets = resolve_targets(meta, heads, method_settings.get("target_modules", "auto"))
    counts = count_parameters(meta, heads, targets, int(method_settings.get("lora_r", 8)))
    largest = max((p.numel() for p in meta.parameters()), default=0)
    shape = shape_of(config)
    dropout_inputs = _dropout_inputs(meta, targets, heads, shape["layers"], method_settings)
    del meta
    available = parse_memory(device_memory) if device_memory is not None else available_memory_bytes(device)
    budget = available * headroom
    effective = effective_batch_size or micro_batch_size * processes
    out: dict[str, Any] = {
        "device": device,
        "parameters": counts.total,
        "hidden_size": shape["hidden"],
        "layers": shape["layers"],
        "target_modules": targets,
        "head_modules": heads,
        "lora_parameters": counts.lora,
        "micro_batch_size": micro_batch_size,
        "effective_batch_size": effective,
        "max_length": max_length,
        "processes": processes,
        "strategy": strategy if processes > 1 else "single",
        "available_gb": _gb(available),
        "budget_gb": _gb(budget),
        "methods": {},
    }
    refused = None
    for kind, method in METHODS.items():
        try:
            opt, ok = resolve_optimizer(optimizer, method.quantized, device), True
        except ValueError as exc:
            opt, ok, refused = optimizer, False, f"training.optimizer: {exc}"
        settings = _recipe(on_gpu, method_settings, largest, options) | {
            "on_gpu": on_gpu,
            "opt": opt,
            "opt_ok": ok,
            "gradient_checkpointing": gradient_checkpointing,
            "micro_batch_size": micro_batch_size,
            "per_process": max(1, effective // max(1, processes)),
            "shards": processes if strategy == "fsdp" else 1,
            "max_length": max_length,
            "lm_logits": task == "sft",
            "dropout_inputs": dropout_inputs,
            "budget": budget,
        }
        out["methods"][kind] = plan_method(method, counts, shape, settings=settings)
    out["choice"], out["reason"] = _choose(counts.total, out["methods"], budget)
    if all(m["optimizer_kind"] is None for m in out["methods"].values()):
        out["reason"] = refused
    return out


def estimate_memory(
    base: str,
    method_settings: dict,
    *,
    micro_batch_size: int,
    max_length: int,
    num_labels: int = 2,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kw: Any,
) -> dict:
    """plan_memory for a model folder or hub name: only its config.json is read (no weights, no tokenizer)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, revision=revision)
    if kw.get("task", "single_label") != "sft":
        config.num_labels = num_labels
    est = plan_memory(
        config,
        method_settings,
        micro_batch_size=micro_batch_size,
        max_length=max_length,
        trust_remote_code=trust_remote_code,
        **kw,
    )
    return {"base_model": base} | est
