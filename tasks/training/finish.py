"""The end of a training attempt: restore the best epoch's weights, save the model and its summary, or score a
learning-rate trial once."""

from __future__ import annotations

import math
import os
import resource
import shutil

from tasks.files import atomic_dir, write_json
from tasks.training.checkpoints import restore_trainable, verify_checkpoint
from tasks.training.optimization import evaluate
from tasks.training.session import Session, append, last_eval


def validate(s: Session) -> dict:
    """Validation loss and metrics of the model as it stands. Instruction tuning validates at the training
    micro-batch: a decoder's logits (rows x tokens x vocabulary) are its largest tensors, and a validation batch of
    32 rows raised the peak far above training's (SmolLM2, micro-batch 4 x 256 tokens: 6.95 GiB RSS; 5.05 GiB with
    validation at the micro-batch and the loss without its logits copy; benchmarks/RESULTS.md)."""
    batch = s.plan.micro_batch_size if s.plan.task == "sft" else max(2 * s.plan.micro_batch_size, 32)
    return evaluate(s.core, s.val, s.loss_fn, batch, s.device, s.autocast)


def restore_best(s: Session) -> str | None:
    """Load the best epoch's weights; when its checkpoint is unusable keep the final ones and say so."""
    best = s.state["best_step"]
    if best is None or best == s.state["global_step"]:
        return None
    best_dir = s.checkpoints / f"step-{best}"
    problem = verify_checkpoint(best_dir) if best_dir.is_dir() else "it is missing"
    if problem is None:
        restore_trainable(s.core, best_dir, s.engine)
        s.log(f"restored the best checkpoint (step {best}, epoch {s.state['best_epoch']})")
        return None
    last = last_eval(s.metrics_path)
    note = (
        f"best checkpoint step-{best} was unusable ({problem}); kept the final weights of step {s.state['global_step']}"
    )
    if s.rank == 0 and best_dir.is_dir():  # moved aside so that no later attempt trips over it again
        aside = best_dir.with_name(f"corrupt-step-{best}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(best_dir, aside)
        note += f" (moved aside to {aside.name})"
    s.log(f"WARNING: {note}")
    s.state.update(
        best_step=s.state["global_step"],
        best_epoch=s.state["epochs_run"],
        best_value=last.get(s.plan.early_stopping_metric) if last else None,
    )
    return note


def _common_summary(s: Session) -> dict:
    return {
        "best_metric_name": s.plan.early_stopping_metric,
        "epochs_run": s.state["epochs_run"],
        "global_step": s.state["global_step"],
        "seconds": round(s.state["seconds"], 3),
        "train_seconds_this_attempt": round(s.train_seconds, 3),
        "samples_this_attempt": s.samples,
        "learning_rate": float(s.plan.learning_rate),
        "resumed_from_step": s.resumed_from,
    }


def save_model(s: Session, note: str | None) -> dict | None:
    """The best model (adapter or full weights) + tokenizer into model/, then training_summary.json, last."""
    full = s.engine.full_state(s.core) if s.engine.sharded else None  # every process: FSDP gathers the shards
    if s.rank != 0:
        return None
    import torch

    final = s.run / "model"
    shutil.rmtree(final, ignore_errors=True)
    with atomic_dir(final) as tmp:
        s.core.save_pretrained(str(tmp), **({"state_dict": full} if full is not None else {}))
        s.tokenizer.save_pretrained(str(tmp))
    summary = _common_summary(s) | {
        "best_epoch": s.state["best_epoch"],
        "best_step": s.state["best_step"],
        "best_metric": s.state["best_value"],
        "stopped_early": s.state["stopped_early"],
        "steps_per_epoch": s.steps_per_epoch,
        "samples_per_second": round(s.samples / s.train_seconds, 3) if s.train_seconds > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "effective_batch_size": s.plan.effective_batch_size,
        "micro_batch_size": s.plan.micro_batch_size,
        "gradient_accumulation_steps": s.plan.gradient_accumulation_steps,
        "processes": s.world,
        "strategy": s.engine.strategy,
        "method": s.plan.method,
        "trainable_parameters": s.built.trainable_parameters,
    }
    if s.device.startswith("cuda"):
        summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(s.device) / 2**20, 1)
    if note:
        summary["best_restore_note"] = note
    write_json(s.run / "training_summary.json", summary)
    return summary


def finish_trial(s: Session) -> dict | None:
    """A learning-rate trial ends with one validation score; no model, no checkpoint."""
    ev: dict = {}
    if not s.diverged:
        ev = validate(s)
        s.diverged = not math.isfinite(float(ev.get("val_loss", float("nan"))))
    if s.rank != 0:
        return None
    if ev:
        append(s.metrics_path, {"type": "eval", "step": s.state["global_step"], "epoch": s.state["epochs_run"], **ev})
    s.log(
        f"trial lr {s.plan.learning_rate:g}, {s.state['global_step']} steps: "
        + ("diverged" if s.diverged else ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    )
    summary = _common_summary(s) | {
        "trial": True,
        "diverged": s.diverged,
        "final_eval": ev,
        "best_epoch": None,
        "best_step": s.state["global_step"],
        "best_metric": ev.get(s.plan.early_stopping_metric),
        "stopped_early": False,
        "max_steps": s.plan.trial_max_steps,
        "resumed_from_step": 0,
    }
    write_json(s.run / "training_summary.json", summary)
    return summary
