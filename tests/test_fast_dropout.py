"""The cheaper CPU dropout (tasks/training/fast_dropout.py): the same Bernoulli keep rate and scaling as torch's,
the same gradient rule, reproducible under a seed; the attention function is SDPA's math with that mask and still
masks the padding; evaluation is untouched."""

from __future__ import annotations

import pytest
import torch

from tasks.training.fast_dropout import FastDropout, attention, dropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_keep_rate_scaling_and_gradient_follow_torchs_dropout(p):
    torch.manual_seed(0)
    x = torch.randn(400, 1001, requires_grad=True)  # odd element count: the last 32-bit draw is half used
    y = dropout(x, p)
    kept = y != 0
    share = kept.float().mean().item()
    assert abs(share - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-6  # within 5 standard errors
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / (1 - p))
    # both halves of every 32-bit draw are used and uniform: no stripes of kept or dropped positions
    flat = kept.flatten().float()
    assert abs(flat[0::2].mean().item() - flat[1::2].mean().item()) < 0.01


def test_reproducible_under_a_seed_and_off_in_eval():
    torch.manual_seed(3)
    a = keep_mask((64, 33), 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((64, 33), 0.2))
    layer = FastDropout(0.4).eval()
    x = torch.randn(8, 8)
    assert torch.equal(layer(x), x) and torch.equal(dropout(x, 0.4, training=False), x)


class _Heads(torch.nn.Module):
    num_key_value_groups = 1
    is_causal = False


def test_attention_is_sdpa_math_with_the_mask_applied():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # the second row's last two tokens are padding
    torch.manual_seed(7)
    out, _ = attention(_Heads(), q, k, v, mask, dropout=0.3, scaling=0.5)
    torch.manual_seed(7)
    keep = keep_mask((2, 3, 5, 5), 0.3)
    probs = torch.softmax((q @ k.transpose(2, 3) * 0.5).masked_fill(~mask, torch.finfo(q.dtype).min), dim=-1)
    want = ((probs * keep / 0.7) @ v).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-6)
    # without dropout it is transformers' SDPA itself
    plain, _ = attention(_Heads(), q, k, v, mask, dropout=0.0, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5).transpose(1, 2)
    assert torch.allclose(plain, ref, atol=1e-6)


def test_a_model_in_training_still_masks_its_padding(tiny_bert):
    """transformers builds the padding mask only for attention functions it has a mask function for: the swapped
    model must still ignore what sits at padded positions."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    swapped = use_fast_dropout(model)
    assert swapped["attention_models"] == 1 and swapped["dropout_modules"] >= 4
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model.train()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    mask = (ids != 0).long()
    other = ids.clone()
    other[1, 3:] = 20  # different tokens at the padded positions
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    b = model(input_ids=other, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-6)
    torch.manual_seed(6)
    assert not torch.allclose(a, model(input_ids=ids, attention_mask=mask).logits)  # dropout is on
