"""The training loop shared by every method: set up, train epochs, evaluate, save. Runs in the training child
(tasks/training/worker.py), reading everything from the run folder's plan.json (tasks/plan.py).

Batches are planned per optimizer step (tasks/training/batching.py): each epoch is a seeded list of *global*
batches of effective_batch_size samples (grouped by length when configured), each split over processes and then
into micro-batches. The loss is a per-sample sum divided by the global batch size, so the update does not
depend on the micro-batch size: an OOM back-off (halve micro, double accumulation) or a resume continues the same
run. Test hooks (environment): FINETUNE_SIMULATE_OOM_ABOVE=N raises an out-of-memory error when the micro-batch
is larger than N; FINETUNE_TEST_STEP_DELAY_S=x sleeps x s after each step; FINETUNE_TEST_NAN_ABOVE_LR=x makes
the loss NaN when the learning rate is above x (a diverging trial).

Learning-rate trials (plan.trial_max_steps = N; tasks/training/search.py) stop after N steps or at the first
non-finite loss, score validation once and save no model or checkpoint. A trial warms up over warmup_ratio of
its N steps and then trains at its full rate to the end, no decay: the real run spends most of its epochs near
its peak rate, and that is what a trial must show. A schedule that decays to zero within the trial anneals the
weights just before they are scored, which flatters high rates (measured on GoEmotions: LoRA 5e-3 won such
56-step trials, then its validation micro-F1 never rose in the real run); the real run's own schedule is no
better, since with a one-epoch warmup a trial of up to an epoch never reaches the peak (QLoRA 5e-3 won those
one-epoch trials, 0.334 vs 0.310, and then failed the same way). At the full rate QLoRA 5e-3 scored 0.242
against 0.345 for 2e-3 after one epoch.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np

from tasks.files import write_json
from tasks.plan import RunPlan
from tasks.training.batching import load_rows, micro_batches, plan_epoch
from tasks.training.checkpoints import latest_valid_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from tasks.training.finish import finish_trial, restore_best, save_model, validate
from tasks.training.losses import class_weight_vector, is_better, make_loss
from tasks.training.optimization import autocast_factory, evaluate, linear_schedule, make_optimizer
from tasks.training.parallel import Engine
from tasks.training.session import Hooks, Session, append, rewrite_metrics
from tasks.workspace import Workspace

__all__ = ["evaluate", "run", "setup"]


def load_start_adapter(model, adapter: Path) -> int:
    """retrain.start_from=production: start from the production adapter's weights (adapters and head)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(
            f"the production adapter {adapter} does not fit this model ({len(unexpected)} unexpected "
            f"tensors, e.g. {unexpected[0]}); fix: retrain.start_from=base"
        )
    return len(state)


# ---- setup -------------------------------------------------------------------------------------------------


def _engine(plan: RunPlan) -> Engine:
    """This process's rank, world and device (joins torchrun's process group when there is one)."""
    import torch

    engine = Engine.start(plan.device, plan.strategy)
    if os.environ.get("FINETUNE_TORCH_THREADS"):  # parallel search trials split the cores between them
        torch.set_num_threads(max(1, int(os.environ["FINETUNE_TORCH_THREADS"])))
    return engine


def _build(run: Path, plan: RunPlan, rank: int):
    from tasks.model.base import load_tokenizer
    from tasks.model.build import build_model

    tokenizer = load_tokenizer(plan.tokenizer_path, plan.trust_remote_code, plan.revision)
    built = build_model(plan, pad_token_id=tokenizer.pad_token_id)
    facts = built.facts()
    if plan.start_adapter:
        n = load_start_adapter(built.model, Path(plan.start_adapter))
        facts["start_adapter_tensors"] = n
        if rank == 0:
            print(
                f"[train] initialised {n} adapter/head tensors from the production adapter {plan.start_adapter}",
                flush=True,
            )
    if rank == 0:
        write_json(run / "build.json", facts)
    return tokenizer, built


def _resume(s: Session) -> None:
    """Continue from the newest intact checkpoint (never for a trial), or start a clean curve."""
    ckpt = None if s.plan.is_trial else latest_valid_checkpoint(s.checkpoints, log=s.log)
    if ckpt is not None:
        s.state = load_checkpoint(ckpt, s.core, s.optimizer, s.scheduler, s.engine)
        if s.compact:
            s.compact.refresh(s.optimizer)  # the full matrix came from the checkpoint
        s.resumed_from = s.state["global_step"]
        s.log(f"resuming from {ckpt.name} (epoch {s.state['epoch']}, step {s.resumed_from})")
        if s.rank == 0:
            rewrite_metrics(s.metrics_path, s.resumed_from)
            append(
                s.run / "events.jsonl",
                {"type": "resume", "step": s.resumed_from, "checkpoint": ckpt.name, "time": time.time()},
            )
    elif s.rank == 0 and s.metrics_path.exists():
        s.metrics_path.unlink()  # a clean start: no stale curve from an attempt that never checkpointed
    s.base_seconds = float(s.state.get("seconds") or 0.0)


def _compact(plan: RunPlan, model, train, tokenizer, world: int):
    """Full fine-tuning of a classifier: the word embeddings' unused rows leave the optimizer (exact, see the module)."""
    if plan.method != "full" or plan.task == "sft":
        return None
    from tasks.training.compact_embedding import compact_embedding

    extra = [i for i in (tokenizer.pad_token_id,) if i is not None]
    return compact_embedding(model, train.input_ids, extra, world == 1, plan.optimizer)


def setup(run_dir: str | Path) -> Session:
    """Read the plan, build the model and data, restore a checkpoint: ready for the first step."""
    import torch

    run = Path(run_dir)
    plan = RunPlan.read(run)
    engine = _engine(plan)
    rank, world, device = engine.rank, engine.world, engine.device
    dataset = Workspace.read_dataset(plan.prepared_path)
    random.seed(plan.seed), np.random.seed(plan.seed), torch.manual_seed(plan.seed)
    tokenizer, built = _build(run, plan, rank)
    torch.manual_seed(plan.seed + rank)  # dropout streams differ per process
    if device == "cpu":  # a third of torch's dropout time on CPU; GPUs keep their fused kernels
        from tasks.training.fast_dropout import use_fast_dropout

        use_fast_dropout(built.model)
    tok_dir = Path(plan.tokenized_path)
    train = load_rows(str(tok_dir / "train"), plan.task, tokenizer.pad_token_id, plan.packing, plan.max_length)
    val = load_rows(str(tok_dir / "validation"), plan.task, tokenizer.pad_token_id, plan.packing, plan.max_length)
    loss_fn = make_loss(plan.task, class_weight_vector(plan.task, plan.labels, dataset.class_weights), device)
    steps_per_epoch = len(
        plan_epoch(train.lengths, plan.effective_batch_size, world, plan.seed, 0, plan.group_by_length)
    )
    epochs, total, warmup = (
        plan.epochs,
        steps_per_epoch * plan.epochs,
        int(round(plan.warmup_ratio * steps_per_epoch * plan.epochs)),
    )
    if plan.is_trial:  # warm up over the trial's own budget, then its full rate to the end (module docstring)
        epochs = min(epochs, math.ceil(plan.trial_max_steps / max(1, steps_per_epoch)))
        warmup, total = int(round(plan.warmup_ratio * plan.trial_max_steps)), None
    compact = _compact(plan, built.model, train, tokenizer, world)
    model = engine.wrap(built.model)  # before the optimizer: FSDP swaps the parameters for their shards
    optimizer = make_optimizer(
        built.model,
        float(plan.learning_rate),
        plan.weight_decay,
        plan.optimizer,
        {compact.weight: compact.rows} if compact else None,
    )
    if compact:
        compact.attach(optimizer)
    scaler = torch.amp.GradScaler("cuda") if (device.startswith("cuda") and plan.precision == "fp16") else None
    s = Session(
        run,
        plan,
        engine,
        model,
        built.model,
        tokenizer,
        built,
        train,
        val,
        loss_fn,
        optimizer,
        linear_schedule(optimizer, warmup, total),
        autocast_factory(plan.precision, device),
        scaler,
        epochs,
        steps_per_epoch,
        Hooks.from_env(),
        state={
            "global_step": 0,
            "epoch": 0,
            "step_in_epoch": 0,
            "best_value": None,
            "best_step": None,
            "best_epoch": None,
            "bad_evals": 0,
            "stopped_early": False,
            "seconds": 0.0,
            "epochs_run": 0,
        },
        compact=compact,
    )
    _resume(s)
    s.log(
        f"run {run.name}: method {plan.method}, task {plan.task}, device {device}, processes {world} "
        f"({engine.strategy}), micro-batch "
        f"{plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} (effective {plan.effective_batch_size})"
    )
    return s


# ---- steps and epochs --------------------------------------------------------------------------------------


def optimizer_step(s: Session, global_batch: list[int]) -> float:
    """Forward/backward over this process's micro-batches of one global batch, then one optimizer step."""
    import torch

    micro = s.plan.micro_batch_size
    micros = micro_batches(global_batch, s.rank, s.world, micro, s.train.lengths)
    step_loss = torch.zeros((), device=s.device)
    for j, mb in enumerate(micros):
        if s.hooks.oom_above is not None and micro > s.hooks.oom_above:
            raise torch.OutOfMemoryError(
                f"simulated out of memory at micro-batch {micro} (FINETUNE_SIMULATE_OOM_ABOVE={s.hooks.oom_above})"
            )
        with s.engine.no_sync(s.model, sync=j == len(micros) - 1):
            batch, y = s.train.collate(mb, s.device)
            with s.autocast():
                logits = s.model(**batch).logits
            loss = s.loss_fn(logits, y) / s.train.weight(global_batch)  # samples, or answer tokens for sft
            if s.hooks.nan_above is not None and float(s.plan.learning_rate) > s.hooks.nan_above:
                loss = loss * float("nan")
            (s.scaler.scale(loss * s.world) if s.scaler else loss * s.world).backward()
        step_loss += loss.detach()
    s.engine.sum(step_loss)
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    stepped = [p for g in s.optimizer.param_groups for p in g["params"]]  # the model's, or their stand-ins
    torch.nn.utils.clip_grad_norm_(stepped, s.plan.max_grad_norm)
    if s.scaler:
        s.scaler.step(s.optimizer), s.scaler.update()
    else:
        s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return float(step_loss)


def checkpoint(s: Session) -> None:
    s.state["seconds"] = s.seconds()
    if s.compact:
        s.compact.sync()
    weights = s.engine.trainable_state(s.core)  # every process: FSDP gathers the shards
    optimizer_state = s.engine.optimizer_state(s.core, s.optimizer)
    if s.rank == 0:
        save_checkpoint(s.checkpoints, s.state["global_step"], weights, optimizer_state, s.scheduler, s.state)
        prune_checkpoints(s.checkpoints, keep_last=2, keep_steps={s.state["best_step"]})
    s.engine.barrier()


def train_epoch(s: Session, epoch: int) -> bool:
    """One epoch from where the state stands; True when a trial must stop (budget spent or diverged)."""
    plan = plan_epoch(s.train.lengths, s.plan.effective_batch_size, s.world, s.plan.seed, epoch, s.plan.group_by_length)
    t_epoch, every = time.perf_counter(), s.plan.save_every_steps
    for k in range(s.state["step_in_epoch"], len(plan)):
        lr = s.scheduler.get_last_lr()[0]
        loss = optimizer_step(s, plan[k])
        s.state["global_step"] += 1
        s.state["step_in_epoch"] = k + 1
        s.samples += len(plan[k])
        if s.rank == 0:
            append(
                s.metrics_path,
                {
                    "type": "step",
                    "step": s.state["global_step"],
                    "epoch": round(epoch + (k + 1) / len(plan), 4),
                    "loss": loss,
                    "learning_rate": lr,
                },
            )
        if s.hooks.step_delay:
            time.sleep(s.hooks.step_delay)
        if s.plan.is_trial and not math.isfinite(loss):
            s.diverged = True
            s.log(f"trial diverged: loss {loss} at step {s.state['global_step']}")
            break
        if s.plan.is_trial and s.state["global_step"] >= s.plan.trial_max_steps:
            break
        if every and s.state["global_step"] % every == 0 and k + 1 < len(plan):
            s.train_seconds += time.perf_counter() - t_epoch
            checkpoint(s)
            t_epoch = time.perf_counter()
    s.train_seconds += time.perf_counter() - t_epoch
    return s.plan.is_trial and (s.diverged or s.state["global_step"] >= s.plan.trial_max_steps)


def end_of_epoch(s: Session, epoch: int) -> None:
    """Evaluate (every eval_every_epochs and at the end), track the best epoch, stop early, checkpoint."""
    s.state.update(epoch=epoch + 1, step_in_epoch=0, epochs_run=epoch + 1)
    if (epoch + 1) % s.plan.eval_every_epochs == 0 or epoch + 1 == s.epochs:
        ev = validate(s)
        if s.rank == 0:
            append(s.metrics_path, {"type": "eval", "step": s.state["global_step"], "epoch": epoch + 1, **ev})
        s.log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        key = s.plan.early_stopping_metric
        if is_better(key, ev[key], s.state["best_value"], s.plan.min_delta):
            s.state.update(best_value=ev[key], best_step=s.state["global_step"], best_epoch=epoch + 1, bad_evals=0)
        else:
            s.state["bad_evals"] += 1
            if s.state["bad_evals"] >= s.plan.patience and epoch + 1 < s.epochs:
                s.state["stopped_early"] = True
                s.log(f"early stopping: no {key} improvement in {s.state['bad_evals']} evaluations")
    checkpoint(s)


def run(run_dir: str | Path, return_model: bool = False):
    """Train the run described by `run_dir/plan.json`; returns the summary dict (and the model if asked)."""
    s = setup(run_dir)
    s.model.train()
    for epoch in range(s.state["epoch"], s.epochs):
        if s.state["stopped_early"]:
            break
        stop = train_epoch(s, epoch)
        if s.plan.is_trial:  # no epoch-end evaluation or checkpoint: one validation score at the end of the budget
            s.state.update(epochs_run=epoch + 1)
            if stop:
                break
            continue
        end_of_epoch(s, epoch)
    s.state["seconds"] = s.seconds()
    if s.compact:
        s.compact.detach()
    summary = finish_trial(s) if s.plan.is_trial else save_model(s, restore_best(s))
    s.engine.stop()
    return (summary, s.core) if return_model else summary
