"""Dropout with a cheaper random mask, for training on CPU.

On CPU, torch's dropout draws its mask with `bernoulli_` on a float tensor: one 32-bit draw and a float compare
per element. It was 13 % of a MiniLM training step ([2-5] profile), more than the attention. Here the mask comes
from 15-bit uniform integers, two per 32-bit draw: the same Bernoulli(1 - p) keep mask (p rounded to 1/32768:
0.1 -> 0.10000610) and the same 1 / (1 - p) scaling, a bool mask kept for backward as torch keeps it, in a third
of the time. Only the random stream differs: a run is as reproducible under its seed as before, not
bit-identical to one with torch's dropout.

`use_fast_dropout(model)` swaps every `nn.Dropout` module (hidden states, classifier heads, LoRA's input dropout)
and, for models on transformers' "sdpa" attention with attention dropout, registers an attention function that
does SDPA's own math path (the one torch takes when dropout is on) with this mask. Without dropout (evaluation,
decoders with attention_dropout 0) that function is transformers' SDPA itself. Training on CUDA keeps torch's
dropout: there the fused kernels with their own dropout are faster.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ATTENTION = "finetune_cpu_dropout"  # the name this module's attention function is registered under
_LOW_15 = 0x7FFF


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask, True with probability 1 - p (p in (0, 1), rounded to 1/32768), from the default generator."""
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()  # uniform on [0, 2**31)
    halves = words.view(torch.int16)[:n].bitwise_and_(_LOW_15)  # each half: 15 uniform bits, either byte order
    return halves.ge(round(p * 32768)).view(shape)


class _Dropped(torch.autograd.Function):
    """x * keep / (1 - p), and the same for the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout` with the cheaper mask (torch's own for p outside (0, 1))."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return nn.functional.dropout(x, p, training)
    return _Dropped.apply(x, float(p))


class FastDropout(nn.Dropout):
    """An `nn.Dropout` (same `p`, same train/eval behaviour) drawing its mask with `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention; with dropout, SDPA's math path (softmax(q k^T * scaling + mask) v, the
    probabilities dropped out) with the cheaper mask. Cases that path does not cover here (a causal model without
    a materialized mask, position bias, softcap, attention weights asked for) go to SDPA unchanged."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    plain = not any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks"))
    if dropout <= 0.0 or dropout >= 1.0 or (causal and attention_mask is None) or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = _Dropped.apply(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), float(dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_fast_dropout(model: nn.Module) -> dict[str, int]:
    """Swap the model's dropout for the cheaper mask (CPU training); returns what was swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:  # exactly nn.Dropout: subclasses may do more than drop
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    attention_models = 0
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for sub in model.modules():
        config = getattr(sub, "config", None)
        if isinstance(sub, PreTrainedModel) and getattr(config, "_attn_implementation", None) == "sdpa":
            AttentionInterface.register(ATTENTION, attention)
            AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # without it transformers builds no mask at all
            sub.set_attn_implementation(ATTENTION)
            attention_models += 1
    return {"dropout_modules": swapped, "attention_models": attention_models}
