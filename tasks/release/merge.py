"""Merging a trained adapter into its base, verified before anything is written.

The merge is its own idempotent step that checks before acting (litgpt merge_lora, peft _check_merge_allowed):
it refuses non-finite adapter weights, a base model that changed since training, and a merged model whose outputs
drift from the adapter model's.

Tolerance (export.merge_tolerance, default 1e-3 absolute on logits): merging replaces W x + s B (A x) by
(W + s B A) x, the same sums in another order. In float32 that reassociation costs ~1e-7 relative per matmul,
~1e-6 relative after a dozen layers (measured here: 1.5e-8..2e-6 absolute, at most 4e-7 relative, on tiny
BERT/Llama and MiniLM logits of size ~0.1..10), so 1e-3 leaves about three orders of margin, while a wrong merge
(a dropped adapter, a missed scaling factor, a wrong head) moves logits by the size of the adapter's effect
(measured 0.09..5.5 here). A quantized method (QLoRA) trained its adapter against the 4-bit weights, so it is
merged into those weights dequantized to float32 (merging into the original float32 weights instead shifts every
logit by the quantization error: on GoEmotions only 63 % of rows kept their 28 predicted labels). The exactness
check is made against the unmerged adapter on that dequantized base, and agreement with the 4-bit model itself
(which may compute in bf16) is reported and held to export.qlora_min_agreement.

Two paths: merge_shardwise (LoRA, export.shard_merge: tasks/release/shard_merge.py merges one safetensors tensor at a
time into export.dtype files, then the written folder is verified) and merge_adapter (peft merge_and_unload in
memory: QLoRA, DoRA, and whatever the shard-wise path refuses). Both verify against the unmerged adapter model; a
16-bit export is checked upcast to float32 with the allowance REL_TOLERANCE gives its rounding.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import ModelConfig, RunConfig
from tasks.model.methods import get_method
from tasks.plan import RunPlan
from tasks.release.errors import ExportError, MergeError
from tasks.workspace import Workspace

__all__ = ["ExportError", "MergeError", "check_base", "check_finite", "merge_adapter", "tolerance_for"]

# Relative allowance per export dtype, on top of export.merge_tolerance, times the largest |reference logit|: the
# merged weights are rounded to the dtype (bf16 keeps 8 mantissa bits: 2^-9 = 0.2 % per weight, fp16 11 bits:
# 2^-12 = 0.02 %), and the verification runs that rounded model upcast to float32, so only the rounding shows.
# Measured on tiny random Llama decoders with random all-linear adapters (3 seeds, /tmp script in the [2-4] report):
# bf16 1.5-1.8 %, fp16 0.13-0.49 % of the largest logit; the allowances leave 2-3x margin. A wrong merge moves
# logits by the adapter's effect (0.09..5.5 absolute measured here), which figures report beside the allowance.
REL_TOLERANCE = {"float32": 0.0, "bfloat16": 5e-2, "float16": 1e-2}


def tolerance_for(cfg: RunConfig, reference: np.ndarray, sft: bool = False) -> float:
    """The merge check's |logit difference| allowance for the export dtype (float32: export.merge_tolerance)."""
    ref = reference[:, :3] if sft else reference  # the lm probe's 4th column is a token id
    scale = float(np.abs(ref).max()) if ref.size and np.isfinite(ref).all() else 0.0
    return cfg.export.merge_tolerance + REL_TOLERANCE[cfg.export.dtype] * scale


def check_finite(path: str | Path) -> None:
    """Refuse weights holding NaN or inf (a diverged run): name the tensors."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():
            t = fh.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise MergeError(
            f"{path} holds NaN/inf values in {', '.join(bad[:5])}{more}; refusing to merge or export a diverged "
            "model; fix: retrain (lower the learning rate, check the data) and export that run"
        )


def check_base(plan: RunPlan, ws: Workspace) -> None:
    """The base model must still be the one the adapter was trained on."""
    from tasks.model.base import model_fingerprint

    found = model_fingerprint(
        ModelConfig(name_or_path=plan.base_model, revision=plan.revision, trust_remote_code=plan.trust_remote_code),
        memo_dir=ws.fingerprints,
    )
    if found != plan.base_model_fingerprint:
        raise MergeError(
            f"base model {plan.base_model_name} has fingerprint {found}, but the adapter was trained on "
            f"{plan.base_model_fingerprint}; merging it into another base gives a different model; fix: restore "
            "that base or retrain"
        )


def _problems(figures: dict, tol: float) -> list[str]:
    exact, problems = figures["merged_vs_adapter"], []
    if not exact["finite"]:
        problems.append("non-finite logits")
    elif exact["max_abs_logit_diff"] > tol:
        problems.append(f"max |logit diff| {exact['max_abs_logit_diff']:.3g} > export.merge_tolerance {tol:g}")
    if exact.get("changed_beyond_ties"):
        problems.append(f"{exact['changed_beyond_ties']} prediction(s) changed that were not near-ties")
    agree = figures.get("merged_vs_quantized")
    if agree is not None and agree["identical_prediction_share"] < figures["min_agreement"]:
        problems.append(
            f"only {agree['identical_prediction_share']:.1%} of test predictions agree with the 4-bit "
            f"model (export.qlora_min_agreement {figures['min_agreement']:.0%})"
        )
    return problems


def _dequantized_adapter_model(run: Path, figures: dict, logits) -> tuple[Any, Any, np.ndarray]:
    """For a quantized method: the 4-bit reference logits, then the adapter on the dequantized 4-bit weights."""
    from tasks.model.loading import dequantized_weights, load_adapter_model, load_trained_model, load_weights

    model, tok = load_trained_model(run)
    q_logits = logits(model, tok)
    base_weights = dequantized_weights(model)
    del model
    gc.collect()
    model, tok = load_adapter_model(run, quantized=False)
    try:
        figures["dequantized_layers"] = load_weights(model, base_weights)
    except ValueError as exc:
        raise MergeError(
            f"{run}: the 4-bit weights do not fit the full-precision base ({exc}); nothing was written"
        ) from exc
    return model, tok, q_logits


@dataclass
class Reference:
    """What the unmerged adapter model gives on the probe: the merged model must reproduce it."""

    logits: np.ndarray
    answers: list[str] | None
    base_logits: np.ndarray


def _reference(model, tok, probe) -> Reference:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise MergeError("the adapter's layers are already merged; refusing to merge twice")
    adapter_logits = probe.logits(model, tok)
    answers = probe.answers(model, tok) if probe.answers else None
    with model.disable_adapter():
        base_logits = probe.logits(model, tok)
    return Reference(adapter_logits, answers, base_logits)


def _verdict(run: Path, plan: RunPlan, probe, ref: Reference, merged, tok, figures: dict, q_logits=None):
    """Score the merged model against the reference; raise MergeError unless it passes; its logits back."""
    tol = figures["tolerance"]
    merged_logits = probe.logits(merged, tok)
    if ref.answers is not None:  # greedy answers to a few prompts: the merged model must say the same
        merged_answers = probe.answers(merged, tok)
        figures["greedy_identical"] = sum(a == b for a, b in zip(ref.answers, merged_answers, strict=True))
        figures["greedy_prompts"] = len(ref.answers)
    figures["merged_vs_adapter"] = probe.compare(ref.logits, merged_logits, tol)
    cols = slice(0, 3) if plan.task == "sft" else slice(None)
    effect = np.abs(ref.logits[:, cols] - ref.base_logits[:, cols])
    figures["adapter_effect_max_logit_diff"] = float(effect.max()) if effect.size else 0.0
    if q_logits is not None:
        figures["merged_vs_quantized"] = probe.compare(q_logits, merged_logits, tol)
    problems = _problems(figures, tol)
    figures["passed"] = not problems
    if problems:
        raise MergeError(
            f"merge verification failed for {run}: {'; '.join(problems)}; nothing was written. Figures: {figures}"
        )
    return merged_logits


def _checked(run: Path, cfg: RunConfig) -> tuple[RunPlan, Any, dict]:
    plan = RunPlan.read(run)
    method = get_method(plan.method)
    check_finite(run / "model" / "adapter_model.safetensors")
    check_base(plan, Workspace.at(cfg.workspace))
    figures = {"method": plan.method, "merged": True, "quantized_reference": method.quantized}
    return plan, method, {**figures, "dtype": cfg.export.dtype}


def merge_adapter(run_dir: str | Path, probe, cfg: RunConfig):
    """Merge the run's adapter into a full-precision base and verify it: (merged model, tokenizer, figures, logits).

    Checks before acting: finite adapter weights, the base the adapter was trained on, no layer merged twice.
    The reference is the model as trained; for a quantized method that is the 4-bit model, which is never merged
    into: the base is reloaded in float32, its 4-bit layers replaced by their dequantized weights, and the adapter
    put on it.
    """
    import torch

    from tasks.model.loading import load_adapter_model

    run = Path(run_dir)
    plan, method, figures = _checked(run, cfg)
    figures.update(rows=probe.rows, path="in-memory (peft merge_and_unload)")
    t0 = time.perf_counter()
    q_logits = None
    if method.quantized:
        model, tok, q_logits = _dequantized_adapter_model(run, figures, probe.logits)
        figures["min_agreement"] = cfg.export.qlora_min_agreement
    else:
        model, tok = load_adapter_model(run)
    ref = _reference(model, tok, probe)
    figures["tolerance"] = tolerance_for(cfg, ref.logits, plan.task == "sft")
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # peft's safe_merge found NaNs in the merged weights
        raise MergeError(f"merging {run / 'model'} produced non-finite weights ({exc}); nothing was written") from exc
    bad = [n for n, p in merged.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise MergeError(f"merged weights {', '.join(bad[:5])} are not finite; nothing was written")
    if cfg.export.dtype != "float32":  # rounded as the export will be, verified in float32 (see REL_TOLERANCE)
        merged = merged.to(getattr(torch, cfg.export.dtype)).float()
    merged_logits = _verdict(run, plan, probe, ref, merged, tok, figures, q_logits)
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    return merged, tok, figures, merged_logits


def shard_merge_blocker(plan: RunPlan, cfg: RunConfig) -> str | None:
    """Why this run cannot merge shard-wise (None: it can): the setting, or a quantized method."""
    if not cfg.export.shard_merge:
        return "export.shard_merge is false"
    if get_method(plan.method).quantized:
        return f"{plan.method} trained against dequantized 4-bit weights, which only the in-memory merge rebuilds"
    return None


def _write_config(plan: RunPlan, tok, out: Path, dtype: str, base: Path, meta) -> None:
    """config.json (labels, problem type, pad, dtype), generation_config.json and the tokenizer beside the weights;
    for a custom class (the mean-pooling head) also its code and auto_map, as the model's save_pretrained writes."""
    import shutil

    from transformers.dynamic_module_utils import custom_object_save

    from tasks.model.build import plan_config

    config = plan_config(plan, tok.pad_token_id)
    config.dtype = dtype
    config.architectures = [type(meta).__name__]  # what the export loads as (save_pretrained writes the same)
    if getattr(meta, "_auto_class", None) is not None:  # loads with trust_remote_code in a fresh process
        custom_object_save(meta, str(out), config=config)
    config.save_pretrained(str(out))
    gen = base / "generation_config.json"
    if plan.task == "sft" and gen.is_file():
        shutil.copy2(gen, out / "generation_config.json")
    tok.save_pretrained(str(out))


def merge_shardwise(run_dir: str | Path, probe, cfg: RunConfig, out: Path):
    """Merge tensor by tensor into `out` (tasks/release/shard_merge.py), then verify the written folder: (model read
    from `out`, in float32; tokenizer; figures; its logits), or a string saying why the shard-wise path does not
    apply (nothing written: the caller merges in memory). The reference adapter model is loaded and freed before the
    merged one is read, so the two never share memory."""
    from tasks.model.build import meta_model, plan_config
    from tasks.model.heads import register
    from tasks.model.loading import load_adapter_model, load_exported_model, model_dir_of, run_tokenizer
    from tasks.release.errors import ShardMergeUnsupported
    from tasks.release.safetensors_io import parse_size
    from tasks.release.shard_merge import base_folder, shard_merge

    run = Path(run_dir)
    plan, _, figures = _checked(run, cfg)
    blocker = shard_merge_blocker(plan, cfg)
    if blocker:
        return blocker
    t0 = time.perf_counter()
    register()
    tok = run_tokenizer(run, plan)
    meta = meta_model(plan_config(plan, tok.pad_token_id), plan.trust_remote_code, plan.task)
    try:
        folder = base_folder(plan.base_model, plan.revision)
        size = parse_size(cfg.export.max_shard_size)
        written = shard_merge(folder, model_dir_of(run), out, meta, cfg.export.dtype, size)
    except ShardMergeUnsupported as exc:
        return str(exc)
    figures.update(shard_merge=written, shard_merge_seconds=round(time.perf_counter() - t0, 3), rows=probe.rows)
    figures["path"] = f"shard-wise ({cfg.export.dtype})"
    _write_config(plan, tok, out, cfg.export.dtype, folder, meta)
    model, tok = load_adapter_model(run)
    ref = _reference(model, tok, probe)
    del model
    gc.collect()
    figures["tolerance"] = tolerance_for(cfg, ref.logits, plan.task == "sft")
    merged, mtok = load_exported_model(out, plan.trust_remote_code)
    merged.float()  # verified in float32: what the check measures is the merge and the dtype's rounding
    merged_logits = _verdict(run, plan, probe, ref, merged, mtok, figures)
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    return merged, mtok, figures, merged_logits
