"""Data-parallel training on torch's own engines: DDP, or FSDP2 (`fully_shard`), in processes started by torchrun.

`training.processes > 1` runs the loop (tasks/training/loop.py) once per process under torchrun;
`training.strategy` picks how the model is spread over them (the planner resolves it into plan.strategy):

- `ddp`: every process holds the whole model, gradients are averaged (torch.nn.parallel.DistributedDataParallel);
- `fsdp`: weights, gradients and optimizer state are sharded over the processes (torch.distributed.fsdp's
  FSDP2 `fully_shard`, each transformer block its own unit, as transformers' `_no_split_modules` names them), so a
  model that does not fit one device can be trained on several.

Everything the loop needs from the engine goes through this module: start and stop the process group, wrap the
model, skip the gradient sync on all but the last micro-batch, sum a number over processes, and move weights and
optimizer state between the (possibly sharded) model and the checkpoint files, which always hold full tensors, so
a checkpoint is read the same way whatever strategy wrote it. The batches stay ours (tasks/training/batching.py):
each process takes its share of every global batch, so the sequence of updates does not depend on the number of
processes (tests/test_train_parallel.py: 1 process, DDP and FSDP give the same loss curve).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Engine:
    """This process's place in the run: rank, world size, device, strategy ("single" with one process)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    strategy: str = "single"

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world > 1

    @property
    def load_device(self) -> str:
        """Where checkpoint tensors are read to: FSDP scatters full CPU tensors into its shards."""
        return "cpu" if self.sharded else self.device

    # ---- process group -------------------------------------------------------------------------------------
    @classmethod
    def start(cls, device: str, strategy: str) -> Engine:
        """Join the process group torchrun set up (WORLD_SIZE, RANK, LOCAL_RANK); a single process joins none."""
        import torch

        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                local = int(os.environ.get("LOCAL_RANK", "0"))
                device = f"cuda:{local}"
                torch.cuda.set_device(local)
        return cls(rank, world, device, strategy if world > 1 else "single")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()

    def sum(self, value):
        """`value` (a tensor) summed over processes, in place."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        return value

    # ---- the model ---------------------------------------------------------------------------------------------
    def wrap(self, model) -> Any:
        """The model the training steps call. DDP returns a wrapper; FSDP shards `model` in place and returns it.
        Call before the optimizer is built: FSDP replaces the parameters by their shards."""
        if self.world == 1:
            return model
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for module in shard_units(model):
                fully_shard(module)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistributedDataParallel(model, device_ids=[local] if self.device.startswith("cuda") else None)

    def no_sync(self, model, sync: bool):
        """Accumulate gradients locally (no all-reduce) unless `sync`: the last micro-batch of a step syncs."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(model)
        return model.no_sync()

    # ---- weights and optimizer state as full tensors ----------------------------------------------------------------
    def trainable_state(self, model) -> dict:
        """{name: full CPU tensor} of the trainable parameters (tied weights once). Under FSDP every process must
        call it (it gathers the shards); only rank 0 gets the tensors."""
        if not self.sharded:
            return _local_trainable_state(model)
        full = self.full_state(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {n: full[n].contiguous() for n in names if n in full}

    def full_state(self, model) -> dict:
        """The whole state dict as full CPU tensors (FSDP: collective; rank 0 holds the result, others get {})."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_trainable(self, model, weights: dict) -> list[str]:
        """Put full tensors (from a checkpoint) into the model; returns the names the model does not have."""
        if not self.sharded:
            return list(model.load_state_dict(weights, strict=False).unexpected_keys)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        unexpected = sorted(set(weights) - set(model.state_dict()))
        known = {k: v for k, v in weights.items() if k not in unexpected}
        set_model_state_dict(model, known, options=StateDictOptions(full_state_dict=True, strict=False))
        return unexpected

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer's state to save (FSDP: gathered, keyed by parameter name; collective)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shard_units(model) -> list:
    """The modules FSDP shards one by one: instances of the classes transformers lists as `_no_split_modules`
    (a transformer block: BertLayer, LlamaDecoderLayer, ...); the root shards what is left (embeddings, head)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def _local_trainable_state(model) -> dict:
    """Trainable parameters by name (one copy per storage: tied weights are saved once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ptr = p.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = p.detach().contiguous().cpu()
    return out
