"""Tokenized instruction data held in memory for training and evaluation: units (one example, or with packing a row
of several), dynamic padding, and the per-token weights the loss is normalised by."""

from __future__ import annotations

import numpy as np

from tasks.data.sft_tokens import IGNORE, pack, packed_row


class TokenRows:
    """An instruction-tuning split: token ids with labels on the assistant's tokens (tasks/data/sft_tokens.py).

    A unit is one example, or with packing one row of several examples laid end to end (positions restart per
    example, no attention mask: transformers builds a block-diagonal causal mask from the positions). The loss is
    summed over target tokens and divided by the target tokens of the global batch (`weight`), so each token counts
    the same whatever the micro-batch split."""

    task = "sft"

    def __init__(self, path: str, pad_id: int, packing: bool = False, max_length: int = 0):
        import datasets

        d = datasets.load_from_disk(path).to_dict()
        self.input_ids, self.labels, self.pad_id = d["input_ids"], d["labels"], pad_id
        lengths = [len(x) for x in self.input_ids]
        self.units = pack(lengths, max_length) if packing else [[i] for i in range(len(lengths))]
        self.packed = packing
        self.lengths = np.asarray([sum(lengths[i] for i in u) for u in self.units], dtype=np.int64)
        # the first label of each example never counts (it has no previous token to be predicted from)
        self.targets = np.asarray(
            [sum(sum(1 for x in self.labels[i][1:] if x != -100) for i in u) for u in self.units], dtype=np.int64
        )

    def __len__(self) -> int:
        return len(self.units)

    def weight(self, idx: list[int]) -> int:
        return max(1, int(self.targets[idx].sum()))

    @property
    def total_weight(self) -> int:
        return max(1, int(self.targets.sum()))

    def collate(self, idx: list[int], device: str):
        import torch

        rows = [packed_row([(self.input_ids[i], self.labels[i]) for i in self.units[u]]) for u in idx]
        width = max(len(r[0]) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        pos = np.zeros((len(rows), width), dtype=np.int64)
        for r, (row_ids, row_labels, row_pos) in enumerate(rows):
            k = len(row_ids)
            ids[r, :k], labels[r, :k], mask[r, :k], pos[r, :k] = row_ids, row_labels, 1, row_pos
            pos[r, k:] = np.arange(width - k)  # padding is one more "example" of its own, never a target
        batch = {"input_ids": torch.from_numpy(ids).to(device), "use_cache": False}  # no cache: packed masks need it
        if self.packed:
            batch["position_ids"] = torch.from_numpy(pos).to(device)
        else:
            batch["attention_mask"] = torch.from_numpy(mask).to(device)
        return batch, torch.from_numpy(labels).to(device)


def causal_lm_loss(logits, labels):
    """Next-token cross-entropy summed over the target (answer) tokens; labels are IGNORE (-100) elsewhere.

    The labels are shifted (position t is scored against token t+1, the last position against nothing), not the
    logits: slicing logits[:, :-1] and flattening it copied the whole batch x length x vocabulary tensor, the largest
    one a decoder's step holds (49,152 entries per token for SmolLM2)."""
    import torch
    import torch.nn.functional as F

    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
