"""Merging a LoRA adapter into its base one tensor at a time, straight from the safetensors files.

W' = W + scale * B @ A for every LoRA-targeted linear weight (scale = lora_alpha / r, or lora_alpha / sqrt(r) with
rslora), computed in float32 and cast to the export dtype; the layers trained in full (heads: peft's
modules_to_save) are copied from the adapter. Each output tensor is read, merged, cast and written before the next
is read, each output shard is complete on disk before the next is started, so the process holds the adapter plus
one tensor (tasks/release/safetensors_io.py reads without mapping whole files). benchmarks/merge_memory.py measures
it against the in-memory float32 merge.

The output's names and layout are the model's own (the model is built on the meta device from its config: names,
shapes, tied weights, no memory); a base saved without the task model's prefix (a BertModel under a
BertForSequenceClassification) is found by adding or removing `base_model_prefix`. Tied weights (lm_head tied to the
embeddings) are written once, as transformers does.

What this path does not do raises ShardMergeUnsupported, and the merge runs in memory through peft as before
(tasks/release/merge.py): DoRA (its magnitude vector renormalises each column: peft's merge is the reference),
LoRA on embeddings or on Conv1D (fan_in_fan_out), lora_bias, alpha_pattern, a tied weight that the adapter changes,
a base that is not a local folder of safetensors files. A quantized method never comes here: its adapter was
trained against the dequantized 4-bit weights, which only the in-memory path rebuilds.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tasks.release.errors import MergeError, ShardMergeUnsupported
from tasks.release.safetensors_io import CODES, Entry, Planned, folder_entries, read_tensor, write_folder

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterParts:
    """An adapter file split by role: LoRA pairs by target weight name, full tensors by model key."""

    lora: dict[str, tuple] = field(default_factory=dict)  # "<module>.weight" -> (A, B, scale)
    full: dict = field(default_factory=dict)  # "<module>.<param>" -> tensor (heads trained in full)


def _scale(config: dict, r: int) -> float:
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_config(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ShardMergeUnsupported(f"peft_type {config.get('peft_type')}")
    for key, why in (
        ("use_dora", "DoRA"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D)"),
        ("alpha_pattern", "alpha_pattern"),
        ("lora_bias", "lora_bias"),
    ):
        if config.get(key):
            raise ShardMergeUnsupported(why)


def read_adapter(adapter_dir: str | Path) -> AdapterParts:
    """The adapter's tensors by role; a key that is not peft's layout is a MergeError naming it."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    _check_config(config)
    tensors = load_file(str(folder / ADAPTER_FILE))
    pairs: dict[str, dict] = {}
    parts = AdapterParts()
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise MergeError(
                f"{folder / ADAPTER_FILE}: tensor {key!r} does not start with {PEFT_PREFIX!r}, so it is not a "
                "tensor peft saved; the adapter file is damaged; fix: restore it or retrain the run"
            )
        name = key[len(PEFT_PREFIX) :]
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise ShardMergeUnsupported(f"{name} (LoRA on embeddings or DoRA)")
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name[: -len(f".{part}.weight")] + ".weight", {})[part] = t
                break
        else:
            parts.full[name] = t
    for target, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise MergeError(
                f"{folder / ADAPTER_FILE}: {target} has {', '.join(sorted(ab))} but not both lora_A and lora_B; "
                "the adapter file is damaged; fix: restore it or retrain the run"
            )
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MergeError(f"{folder / ADAPTER_FILE}: {target} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}")
        parts.lora[target] = (a, b, _scale(config, a.shape[0]))
    return parts


def model_layout(meta_model) -> tuple[dict[str, tuple], set[str]]:
    """({key: (dtype, shape)} of what the model saves, tied keys): from a model on the meta device."""
    state = meta_model.state_dict()
    first: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in meta_model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.update({name, first[id(p)]})
        else:
            first[id(p)] = name
    keep = set(first.values())
    buffers = {n for n, _ in meta_model.named_buffers()}
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in state.items() if k in keep or k in buffers}
    return layout, tied


def _source(key: str, base: dict[str, Entry], prefix: str) -> Entry | None:
    if key in base:
        return base[key]
    if prefix and key.startswith(prefix + "."):
        return base.get(key[len(prefix) + 1 :])
    return base.get(f"{prefix}.{key}") if prefix else None


def _sources(layout: dict, tied: set[str], base: dict[str, Entry], parts: AdapterParts, prefix: str) -> dict:
    """{output key: Entry in the base or "adapter"}, after checking every adapter key lands on a model key."""
    for name in list(parts.lora) + list(parts.full):
        if name not in layout:
            raise MergeError(
                f"the adapter names {name!r}, which the base model does not have (is the adapter from another "
                "model, or its file damaged?); fix: restore the adapter or retrain the run"
            )
        if name in tied:
            raise ShardMergeUnsupported(f"the adapter changes {name}, a weight tied to another")
    for name, (a, b, _) in parts.lora.items():
        shape = layout[name][1]
        if (b.shape[0], a.shape[1]) != shape:
            raise MergeError(
                f"the adapter's {name} update is {b.shape[0]}x{a.shape[1]} but the base weight is "
                f"{'x'.join(map(str, shape))}; the adapter belongs to another base; fix: export it with its own base"
            )
    out: dict = {}
    for key in layout:
        src = "adapter" if key in parts.full else _source(key, base, prefix)
        if src is None:
            raise ShardMergeUnsupported(f"{key} is in neither the base weights nor the adapter")
        out[key] = src
    return out


def base_folder(base: str, revision: str | None) -> Path:
    """The local folder of the base's weights: the path itself, or the Hub cache's snapshot (no download)."""
    p = Path(base)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means: no local copy, use the in-memory path
        raise ShardMergeUnsupported(f"{base} is not a local folder ({type(exc).__name__})") from None


def shard_merge(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, meta_model, dtype: str, max_shard_bytes: int
) -> dict:
    """Write the merged weights of `meta_model`'s layout into `out_dir` as safetensors shards; figures back."""
    import torch

    base = folder_entries(base_dir)
    if base is None:
        raise ShardMergeUnsupported(f"{base_dir} holds no safetensors weights")
    parts = read_adapter(adapter_dir)
    layout, tied = model_layout(meta_model)
    sources = _sources(layout, tied, base, parts, getattr(meta_model, "base_model_prefix", ""))
    files = list(dict.fromkeys(e.file for e in base.values()))
    order = sorted(
        layout,
        key=lambda k: (1, 0, 0) if sources[k] == "adapter" else (0, files.index(sources[k].file), sources[k].start),
    )
    target = getattr(torch, dtype)
    planned = [
        Planned(
            k,
            CODES[dtype] if layout[k][0].is_floating_point else CODES[str(layout[k][0]).removeprefix("torch.")],
            layout[k][1],
        )
        for k in order
    ]
    with ExitStack() as stack:
        handles = {f: stack.enter_context(open(f, "rb")) for f in files}

        def produce(key: str):
            src = sources[key]
            t = parts.full[key] if src == "adapter" else read_tensor(handles[src.file], src)
            if key in parts.lora:
                a, b, scale = parts.lora[key]
                t = t.float().addmm(b.float(), a.float(), alpha=scale)
                if not bool(torch.isfinite(t).all()):
                    raise MergeError(f"merging the adapter into {key} gave non-finite weights; nothing was written")
            return t.to(target) if t.is_floating_point() else t.to(layout[key][0])

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        names = write_folder(Path(out_dir), planned, produce, max_shard_bytes)
    return {
        "path": "shard-wise",
        "dtype": dtype,
        "lora_merged": len(parts.lora),
        "copied_from_adapter": sorted(parts.full),
        "tied_written_once": sorted(tied - set(layout)),
        "files": names,
        "bytes": sum(p.nbytes for p in planned),
    }
