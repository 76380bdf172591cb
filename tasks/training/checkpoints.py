"""Training checkpoints: `<run>/checkpoints/step-<N>/` written atomically, verified on load.

Each holds the trainable weights (safetensors: all weights for full fine-tuning, adapters + head for
LoRA/QLoRA/DoRA), optimizer.pt, scheduler.pt, rng_state.pt and trainer_state.json (written last, with
a sha256 of every file). A checkpoint whose files do not match their hashes (truncated, corrupt) is
reported, moved aside as `corrupt-step-<N>`, and the previous one is used. torch.load only ever runs
with weights_only=True.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.files import atomic_dir, read_json, sha256_file, write_json
from tasks.training.parallel import Engine

FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt")


def _rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, weights: dict, optimizer_state: dict, scheduler, state: dict) -> Path:
    """Write `root/step-<step>/` atomically (temp folder + rename): the trainable weights and the optimizer state as
    full tensors (tasks/training/parallel.py gathers them from every process under FSDP)."""
    import torch
    from safetensors.torch import save_file

    final = Path(root) / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    with atomic_dir(final) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        write_json(tmp / "trainer_state.json", dict(state, files={f: sha256_file(tmp / f) for f in FILES}))
    return final


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint folder, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p))
    return sorted(out, reverse=True)


def verify_checkpoint(path: Path) -> str | None:
    """None when complete and intact, else the reason."""
    state_file = Path(path) / "trainer_state.json"
    if not state_file.exists():
        return "trainer_state.json is missing"
    try:
        files = read_json(state_file)["files"]
    except (ValueError, KeyError) as exc:
        return f"trainer_state.json is unreadable ({exc})"
    for name, digest in files.items():
        f = Path(path) / name
        if not f.exists():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its recorded sha256 (truncated or corrupt)"
    return None


def latest_valid_checkpoint(root: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint; corrupt ones are reported and moved aside."""
    for step, path in checkpoint_steps(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log(f"WARNING: checkpoint {path.name} is unusable: {problem}; falling back to an earlier one")
        aside = path.with_name(f"corrupt-step-{step}")
        shutil.rmtree(aside, ignore_errors=True)
        try:
            path.rename(aside)
        except OSError:  # another process (DDP rank) moved it already
            pass
    return None


def restore_trainable(model, path: Path, engine: Engine) -> None:
    """Load a checkpoint's trainable weights into the model (every saved tensor must find its place)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "trainable.safetensors"), device=engine.load_device)
    unexpected = engine.load_trainable(model, weights)
    if unexpected:
        raise RuntimeError(f"checkpoint {path} holds weights the model does not have: {unexpected[:5]}")


def load_checkpoint(path: Path, model, optimizer, scheduler, engine: Engine) -> dict:
    """Restore weights, optimizer, scheduler and RNG state; returns the trainer state."""
    import torch

    restore_trainable(model, path, engine)
    state = torch.load(Path(path) / "optimizer.pt", map_location=engine.load_device, weights_only=True)
    engine.load_optimizer_state(model, optimizer, state)
    scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(Path(path) / "rng_state.pt", weights_only=True))
    state = read_json(Path(path) / "trainer_state.json")
    state.pop("files", None)
    return state


def prune_checkpoints(root: Path, keep_last: int = 2, keep_steps: set | None = None) -> None:
    """Keep the newest `keep_last` checkpoints plus the ones in keep_steps (the best)."""
    keep_steps = {s for s in (keep_steps or set()) if s is not None}
    for i, (step, path) in enumerate(checkpoint_steps(root)):
        if i >= keep_last and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
