"""Batches for the training loop (tasks/train_worker.py): a tokenized split held in memory with dynamic
padding per micro-batch, and the seeded plan of each epoch's global batches.

A global batch holds effective_batch_size samples and is what one optimizer step sees; it is split over
processes (DDP) and then into micro-batches, so the plan does not depend on the micro-batch size (an OOM
back-off or a resume continues the same sequence of updates).
"""

from __future__ import annotations

import numpy as np


class Rows:
    """One tokenized split held as Python lists, with dynamic padding per micro-batch."""

    def __init__(self, path: str, task: str, pad_id: int):
        import datasets

        d = datasets.load_from_disk(path).to_dict()
        self.input_ids = d["input_ids"]
        self.token_type_ids = d.get("token_type_ids")
        self.labels = d["labels"]
        self.lengths = np.asarray(d["length"], dtype=np.int64)
        self.task, self.pad_id = task, pad_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def weight(self, idx: list[int]) -> int:
        """What a loss summed over these rows is divided by: one per sample."""
        return len(idx)

    @property
    def total_weight(self) -> int:
        return len(self)

    def collate(self, idx: list[int], device: str):
        import torch

        n, width = len(idx), int(self.lengths[idx].max())
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        tt = np.zeros((n, width), dtype=np.int64) if self.token_type_ids is not None else None
        for r, i in enumerate(idx):
            k = len(self.input_ids[i])
            ids[r, :k], mask[r, :k] = self.input_ids[i], 1
            if tt is not None:
                tt[r, :k] = self.token_type_ids[i]
        batch = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
        if tt is not None:
            batch["token_type_ids"] = torch.from_numpy(tt).to(device)
        lab = [self.labels[i] for i in idx]
        dtype = torch.long if self.task == "single_label" else torch.float32
        return batch, torch.tensor(lab, dtype=dtype, device=device)


def load_rows(path: str, task: str, pad_id: int, packing: bool = False, max_length: int = 0):
    """The split's rows for the training loop: classification rows or instruction-tuning token rows."""
    if task == "sft":
        from tasks.data.sft_rows import TokenRows

        return TokenRows(path, pad_id, packing, max_length)
    return Rows(path, task, pad_id)


def plan_epoch(
    lengths: np.ndarray, global_batch: int, world: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The epoch's global batches (sample indices), seeded by (seed, epoch); independent of micro-batching.

    Grouping by length: shuffle, cut into mega-chunks of 50 global batches, sort each by length, cut
    into global batches and shuffle their order (like transformers' LengthGroupedSampler). A final batch
    with fewer samples than processes is dropped (every process needs one).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = global_batch * 50
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + global_batch].tolist() for i in range(0, len(order), global_batch)]
    if batches and len(batches[-1]) < world:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def micro_batches(global_batch: list[int], rank: int, world: int, micro: int, lengths: np.ndarray) -> list[list[int]]:
    """This process's share of a global batch, sorted by length and cut into micro-batches."""
    mine = np.asarray(global_batch[rank::world])
    mine = mine[np.argsort(-lengths[mine], kind="stable")].tolist()
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]
