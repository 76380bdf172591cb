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
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import ModelConfig, RunConfig
from tasks.model.methods import get_method
from tasks.plan import RunPlan
from tasks.workspace import Workspace


class ExportError(ValueError):
    """The run or evaluation folder cannot be exported as it is; the message says why and the fix."""


class MergeError(ExportError):
    """The merge was refused or failed its verification; nothing was written."""


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


def merge_adapter(run_dir: str | Path, probe, cfg: RunConfig):
    """Merge the run's adapter into a full-precision base and verify it: (merged model, tokenizer, figures, logits).

    Checks before acting: finite adapter weights, the base the adapter was trained on, no layer merged twice.
    The reference is the model as trained; for a quantized method that is the 4-bit model, which is never merged
    into: the base is reloaded in float32, its 4-bit layers replaced by their dequantized weights, and the adapter
    put on it.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks.model.loading import load_adapter_model

    run, plan = Path(run_dir), RunPlan.read(run_dir)
    method = get_method(plan.method)
    tol = cfg.export.merge_tolerance
    check_finite(run / "model" / "adapter_model.safetensors")
    check_base(plan, Workspace.at(cfg.workspace))
    logits = probe.logits
    figures: dict[str, Any] = {
        "method": plan.method,
        "merged": True,
        "tolerance": tol,
        "rows": probe.rows,
        "quantized_reference": method.quantized,
    }
    t0 = time.perf_counter()
    q_logits = None
    if method.quantized:
        model, tok, q_logits = _dequantized_adapter_model(run, figures, logits)
    else:
        model, tok = load_adapter_model(run)
    if any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise MergeError(f"{run}: adapter layers are already merged; refusing to merge twice")
    adapter_logits = logits(model, tok)
    adapter_answers = probe.answers(model, tok) if probe.answers else None
    with model.disable_adapter():
        base_logits = logits(model, tok)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # peft's safe_merge found NaNs in the merged weights
        raise MergeError(f"merging {run / 'model'} produced non-finite weights ({exc}); nothing was written") from exc
    bad = [n for n, p in merged.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise MergeError(f"merged weights {', '.join(bad[:5])} are not finite; nothing was written")
    merged_logits = logits(merged, tok)
    if adapter_answers is not None:  # greedy answers to a few prompts: the merged model must say the same
        merged_answers = probe.answers(merged, tok)
        figures["greedy_identical"] = sum(a == b for a, b in zip(adapter_answers, merged_answers, strict=True))
        figures["greedy_prompts"] = len(adapter_answers)
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    figures["merged_vs_adapter"] = probe.compare(adapter_logits, merged_logits, tol)
    effect = (
        np.abs(adapter_logits[:, :3] - base_logits[:, :3])
        if plan.task == "sft"
        else np.abs(adapter_logits - base_logits)
    )
    figures["adapter_effect_max_logit_diff"] = float(effect.max()) if effect.size else 0.0
    if q_logits is not None:
        figures["merged_vs_quantized"] = probe.compare(q_logits, merged_logits, tol)
        figures["min_agreement"] = cfg.export.qlora_min_agreement
    problems = _problems(figures, tol)
    figures["passed"] = not problems
    if problems:
        raise MergeError(
            f"merge verification failed for {run}: {'; '.join(problems)}; nothing was written. Figures: {figures}"
        )
    return merged, tok, figures, merged_logits
