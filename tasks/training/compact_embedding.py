"""Full fine-tuning without optimizer work on the word-embedding rows the training data never uses.

A BERT-size encoder's word embeddings are half its parameters (MiniLM: 11.7 M of 22.7 M), yet a training set
uses a few thousand of its 30,522 tokens. Dense AdamW still zero-fills a gradient for every row each step, takes
its norm for clipping, scales it and updates every row: on SMS spam about a fifth of a full fine-tuning step on CPU.

A row no training input contains gets an exactly zero gradient at every step, so AdamW's moments for it stay zero
and its update is the decoupled weight decay alone: w <- w * (1 - lr * weight_decay). So training here looks up
and updates a compact parameter holding only the used rows, and the unused rows get the product of the steps'
decay factors (kept in float64) applied whenever the full matrix is read: before evaluation, checkpoints and the
saved model. The model's own parameter, its name and every file written keep the full matrix; the optimizer state holds
the compact rows (same across a resume: the used rows come from the same training split). Same results as dense
AdamW up to float rounding (a test compares the two).

Used only where that argument holds: full fine-tuning of a classifier in one process with torch's AdamW, input
embeddings a plain `nn.Embedding` (no max_norm, no scale_grad_by_freq, not sparse) not tied to an output layer,
and a training split using under half the vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_USED_SHARE = 0.5  # above this the saving is small; dense AdamW then


class CompactEmbedding:
    """The used rows of one embedding as their own parameter, in training; the full matrix everywhere else."""

    def __init__(self, embedding: nn.Embedding, used_ids: np.ndarray):
        """`used_ids`: the used rows, sorted and unique."""
        self.module, self.weight = embedding, embedding.weight
        self.ids = ids = torch.as_tensor(used_ids, dtype=torch.long, device=self.weight.device)
        self.remap = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        self.remap[ids] = torch.arange(len(ids), device=ids.device)
        pad = embedding.padding_idx
        self.padding_idx = int(self.remap[pad]) if pad is not None and int(self.remap[pad]) >= 0 else None
        self.rows = nn.Parameter(self.weight.detach()[ids].clone())
        self.decay = 1.0  # product of the decay factors the unused rows have not received yet (float64)
        self.stale = False  # the compact rows moved since the full matrix was last written
        self._hook = None
        embedding.forward = self._forward  # instance attribute: the module's class and state dict are unchanged

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (self.module.training and torch.is_grad_enabled()):
            self.sync()
            return nn.Embedding.forward(self.module, input_ids)
        compact = self.remap[input_ids]
        if bool((compact < 0).any()):
            raise RuntimeError("a training batch holds a token id outside the rows collected from the training split")
        return F.embedding(compact, self.rows, self.padding_idx)

    def attach(self, optimizer) -> None:
        """Record each step's decay factor (the compact rows' group: lr and weight_decay as that step used them;
        looked up at every step: loading an optimizer state replaces the group dicts)."""

        def after_step(opt, _args, _kwargs) -> None:
            group = next(g for g in opt.param_groups if any(p is self.rows for p in g["params"]))
            self.decay *= 1.0 - float(group["lr"]) * float(group["weight_decay"])
            self.stale = True

        self._hook = optimizer.register_step_post_hook(after_step)

    @torch.no_grad()
    def sync(self) -> None:
        """Write the full matrix: the unused rows decayed, the used rows from the compact parameter."""
        if not self.stale:
            return
        if self.decay != 1.0:
            self.weight.mul_(self.decay)
        self.weight[self.ids] = self.rows
        self.decay, self.stale = 1.0, False

    @torch.no_grad()
    def refresh(self, optimizer) -> None:
        """After a checkpoint was loaded: the compact rows from the full matrix; moments saved for the full matrix
        (a checkpoint of dense training) cut to the used rows, exact since the unused rows' moments are zero."""
        self.rows.copy_(self.weight[self.ids])
        for name, value in optimizer.state.get(self.rows, {}).items():
            if torch.is_tensor(value) and value.shape == self.weight.shape:
                optimizer.state[self.rows][name] = value[self.ids].clone()
        self.decay, self.stale = 1.0, False

    def detach(self) -> None:
        """Back to a plain embedding (full matrix written, the optimizer hook removed)."""
        self.sync()
        if self._hook is not None:
            self._hook.remove()
        self.module.__dict__.pop("forward", None)


def compact_embedding(model, train_ids: list[list[int]], extra_ids: list[int], single_process: bool, optimizer: str):
    """A CompactEmbedding for the model's input embeddings where the module docstring's conditions hold, else None."""
    if not single_process or optimizer != "adamw":
        return None
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if type(emb) is not nn.Embedding or not emb.weight.requires_grad:
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None and getattr(out, "weight", None) is not None and out.weight.data_ptr() == emb.weight.data_ptr():
        return None  # tied to the output layer: every row gets a gradient there
    flat = np.fromiter((t for r in train_ids for t in r), dtype=np.int64, count=sum(map(len, train_ids)))
    used = np.unique(np.concatenate([flat, np.asarray(extra_ids, dtype=np.int64)]))
    if len(used) == 0 or used.min() < 0 or used.max() >= emb.num_embeddings:
        return None
    if len(used) > MAX_USED_SHARE * emb.num_embeddings:
        return None
    return CompactEmbedding(emb, used)
