"""The optimizer, the learning-rate schedule, mixed precision and the validation pass of the training loop."""

from __future__ import annotations

import contextlib

import numpy as np

from tasks.optimizers import BNB_OPTIMIZERS
from tasks.training.batching import Rows
from tasks.training.losses import validation_metrics


def linear_schedule(optimizer, warmup: int, total: int | None):
    """Linear warmup over `warmup` steps, then linear decay to zero at `total` (None: no decay)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


def parameter_groups(model, weight_decay: float, stand_ins: dict | None = None) -> list[dict]:
    """Trainable parameters: matrices with weight decay, biases and norms (1-d) without. `stand_ins` maps a
    parameter to the one the optimizer updates in its place (tasks/training/compact_embedding.py)."""
    swap = {id(k): v for k, v in (stand_ins or {}).items()}
    params = [swap.get(id(p), p) for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model, lr: float, weight_decay: float, kind: str = "adamw", stand_ins: dict | None = None):
    """The plan's optimizer (plan.optimizer, resolved by the planner) over the model's trainable parameters."""
    import torch

    groups = parameter_groups(model, weight_decay, stand_ins)
    if kind in BNB_OPTIMIZERS:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_OPTIMIZERS[kind])(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; known: adamw, {', '.join(BNB_OPTIMIZERS)}")
    try:  # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop torch picks on CPU
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def autocast_factory(precision: str, device: str):
    import torch

    if device.startswith("cuda") and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    if precision == "bf16":  # CPU: matmuls in bf16 (native on avx512_bf16/AMX), weights and optimizer stay fp32
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def evaluate(model, rows: Rows, loss_fn, batch_size: int, device: str, autocast) -> dict:
    """Validation loss (same objective as training) and task metrics (instruction tuning: loss per target token
    and its perplexity; the logits of a language model are never collected)."""
    import math

    import torch

    order = np.argsort(-rows.lengths, kind="stable").tolist()
    total, outs, ys = 0.0, [], []
    if rows.task == "sft":
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(order), batch_size):
                batch, labels = rows.collate(order[i : i + batch_size], device)
                with autocast():
                    total += float(loss_fn(model(**batch).logits, labels))
        model.train(was_training)
        loss = total / rows.total_weight
        return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            batch, labels = rows.collate(order[i : i + batch_size], device)
            with autocast():
                logits = model(**batch).logits.float()
            total += float(loss_fn(logits, labels))
            outs.append(logits.cpu().numpy())
            ys.append(labels.cpu().numpy())
    model.train(was_training)
    out = {"val_loss": total / max(1, len(rows))}
    out.update(validation_metrics(rows.task, np.concatenate(ys), np.concatenate(outs)))
    return out
