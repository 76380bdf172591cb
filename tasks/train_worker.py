"""The training child process: `python -m tasks.train_worker RUN_DIR` (or under torchrun for DDP).

Reads everything from the run folder (resolved_config.json, run_info.json, the prepared and tokenized
datasets it names), trains with a small explicit loop, and writes checkpoints, metrics.jsonl, the best
model and training_summary.json back into it. Shared by every method (DESIGN.md rule 5).

Batches are planned per optimizer step (tasks/batching.py): each epoch is a seeded list of *global* batches of
effective_batch_size samples (grouped by length when configured), each split over processes and then
into micro-batches. The loss is a per-sample sum divided by the global batch size, so the update does
not depend on the micro-batch size: an OOM back-off (halve micro, double accumulation) or a resume
continues the same run. Test hooks (environment): FINETUNE_SIMULATE_OOM_ABOVE=N raises an out-of-memory
error when the micro-batch is larger than N; FINETUNE_TEST_STEP_DELAY_S=x sleeps x s after each step;
FINETUNE_TEST_NAN_ABOVE_LR=x makes the loss NaN when the learning rate is above x (a diverging trial).

Learning-rate trials (resolved_training "trial": true, "max_steps": N; tasks/lr_search.py) stop after N
steps or at the first non-finite loss, score validation once and save no model or checkpoint. A trial
warms up over warmup_ratio of its N steps and then trains at its full rate to the end, no decay: the real
run spends most of its epochs near its peak rate, and that is what a trial must show. A schedule that
decays to zero within the trial anneals the weights just before they are scored, which flatters high
rates (measured on GoEmotions: LoRA 5e-3 won such 56-step trials, then its validation micro-F1 never rose
in the real run); the real run's own schedule is no better, since with a one-epoch warmup a trial of up to
an epoch never reaches the peak (QLoRA 5e-3 won those one-epoch trials, 0.334 vs 0.310, and then failed
the same way). At the full rate QLoRA 5e-3 scored 0.242 against 0.345 for 2e-3 after one epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tasks.batching import Rows, micro_batches, plan_epoch
from tasks.files import atomic_dir, read_json, write_json
from tasks.losses import class_weight_vector, is_better, make_loss, validation_metrics
from tasks.train_checkpoints import (latest_valid_checkpoint, load_checkpoint, prune_checkpoints, restore_trainable,
                                     save_checkpoint, verify_checkpoint)

EXIT_OOM = 75
OOM_MARKER = "worker_oom.json"


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"[train_worker] {msg}", flush=True)


def _linear_schedule(optimizer, warmup: int, total: int | None):
    """Linear warmup over `warmup` steps, then linear decay to zero at `total` (None: no decay)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


def _optimizer(model, lr: float, weight_decay: float):
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop torch picks on CPU
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def evaluate(model, rows: Rows, loss_fn, batch_size: int, device: str, autocast) -> dict:
    """Validation loss (same objective as training) and task metrics."""
    import torch

    order = np.argsort(-rows.lengths, kind="stable").tolist()
    total, outs, ys = 0.0, [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            batch, labels = rows.collate(idx, device)
            with autocast():
                logits = model(**batch).logits.float()
            total += float(loss_fn(logits, labels))
            outs.append(logits.cpu().numpy())
            ys.append(labels.cpu().numpy())
    model.train(was_training)
    out = {"val_loss": total / max(1, len(rows))}
    out.update(validation_metrics(rows.task, np.concatenate(ys), np.concatenate(outs)))
    return out


def _autocast_factory(precision: str, device: str):
    import torch

    if device.startswith("cuda") and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """After a resume, drop metric lines written after the checkpoint (they are trained again)."""
    import json

    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _last_eval(path: Path) -> dict | None:
    import json

    if not path.exists():
        return None
    evals = [json.loads(ln) for ln in path.read_text().splitlines() if '"eval"' in ln]
    return evals[-1] if evals else None


def _append(path: Path, obj: dict) -> None:
    import json

    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj) + "\n")


def _load_start_adapter(model, adapter: Path, rank: int) -> None:
    """retrain.start_from=production: start from the production adapter's weights (adapters and head)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"the production adapter {adapter} does not fit this model ({len(unexpected)} unexpected "
                         f"tensors, e.g. {unexpected[0]}); fix: retrain.start_from=base")
    _log(f"initialised {len(state)} adapter/head tensors from the production adapter {adapter}", rank)


def run(run_dir: str, return_model: bool = False):
    """Train the run described by `run_dir`; returns the summary dict (and the model if asked)."""
    import torch
    import torch.distributed as dist

    from tasks.modeling import build_model
    from tasks.tokenize import load_tokenizer

    run = Path(run_dir)
    rc = read_json(run / "resolved_config.json")
    info = read_json(run / "run_info.json")
    t = rc["resolved_training"]
    manifest = read_json(Path(info["prepared_path"]) / "manifest.json")
    task, labels = info["task"], info["labels"]

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = t["device"]
    if world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
    seed = int(t["seed"])
    micro, accum, eff = int(t["micro_batch_size"]), int(t["gradient_accumulation_steps"]), int(t["effective_batch_size"])
    oom_above = os.environ.get("FINETUNE_SIMULATE_OOM_ABOVE")
    step_delay = float(os.environ.get("FINETUNE_TEST_STEP_DELAY_S", "0") or 0)
    nan_above = os.environ.get("FINETUNE_TEST_NAN_ABOVE_LR")  # test hook: rates above this diverge (NaN loss)
    _log(f"run {run.name}: method {info['method']}, task {task}, device {device}, processes {world}, "
         f"micro-batch {micro} x accumulation {accum} (effective {eff})", rank)

    if os.environ.get("FINETUNE_TORCH_THREADS"):  # parallel search trials split the cores between them
        torch.set_num_threads(max(1, int(os.environ["FINETUNE_TORCH_THREADS"])))
    trial = bool(t.get("trial"))
    max_steps = int(t["max_steps"]) if t.get("max_steps") else None
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    tokenizer = load_tokenizer(info["tokenizer_path"], info.get("trust_remote_code", False), info.get("revision"))
    built = build_model(info["base_model"], task=task, labels=labels, method=info["method"], method_cfg=rc["method"],
                        pad_token_id=tokenizer.pad_token_id, trust_remote_code=info.get("trust_remote_code", False),
                        revision=info.get("revision"), device=device, gradient_checkpointing=t["gradient_checkpointing"],
                        base_dtype=t.get("base_dtype", "float32"), seed=seed, target_name=info.get("target_name", "target"),
                        head=info.get("head", "pooler"))
    model = built.model
    if info.get("start_adapter"):
        _load_start_adapter(model, Path(info["start_adapter"]), rank)
    if rank == 0:
        info.update(head_modules=built.head_modules, target_modules=built.target_modules,
                    trainable_parameters=built.trainable_parameters, total_parameters=built.total_parameters,
                    build_notes=built.notes)
        write_json(run / "run_info.json", info)
    torch.manual_seed(seed + rank)  # dropout streams differ per process

    tok_dir = Path(info["tokenized_path"])
    train, val = Rows(str(tok_dir / "train"), task, tokenizer.pad_token_id), Rows(str(tok_dir / "validation"), task, tokenizer.pad_token_id)
    weights = class_weight_vector(task, labels, manifest.get("class_weights", {}))
    loss_fn = make_loss(task, weights, device)
    steps_per_epoch = len(plan_epoch(train.lengths, eff, world, seed, 0, t["group_by_length"]))
    epochs = int(t["epochs"])
    total_steps = steps_per_epoch * epochs
    warmup = int(round(t["warmup_ratio"] * total_steps))
    if max_steps:  # a learning-rate trial: warm up over its own budget, then its full rate to the end (docstring)
        epochs = min(epochs, math.ceil(max_steps / max(1, steps_per_epoch)))
        warmup, total_steps = int(round(t["warmup_ratio"] * max_steps)), None
    optimizer = _optimizer(model, float(t["learning_rate"]), float(t["weight_decay"]))
    scheduler = _linear_schedule(optimizer, warmup, total_steps)
    autocast = _autocast_factory(t["precision"], device)
    scaler = torch.amp.GradScaler("cuda") if (device.startswith("cuda") and t["precision"] == "fp16") else None

    ckpt_root = run / "checkpoints"
    metrics_path = run / "metrics.jsonl"
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_value": None, "best_step": None, "best_epoch": None,
             "bad_evals": 0, "stopped_early": False, "seconds": 0.0, "epochs_run": 0}
    resumed_from = 0
    diverged = False
    ckpt = None if trial else latest_valid_checkpoint(ckpt_root, log=lambda m: _log(m, rank))
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, device)
        resumed_from = state["global_step"]
        _log(f"resuming from {ckpt.name} (epoch {state['epoch']}, step {resumed_from})", rank)
        if rank == 0:
            _rewrite_metrics(metrics_path, resumed_from)
            _append(run / "events.jsonl", {"type": "resume", "step": resumed_from, "checkpoint": ckpt.name, "time": time.time()})
    elif rank == 0 and metrics_path.exists():
        metrics_path.unlink()  # a clean start: no stale curve from an attempt that never checkpointed
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    core = model.module if world > 1 else model
    es_key, es = t["early_stopping_key"], t["early_stopping"]

    def checkpoint() -> None:
        state["seconds"] = base_seconds + time.perf_counter() - attempt_t0
        if rank == 0:
            save_checkpoint(ckpt_root, state["global_step"], core, optimizer, scheduler, state)
            prune_checkpoints(ckpt_root, keep_last=2, keep_steps={state["best_step"]})
        if world > 1:
            dist.barrier()

    attempt_t0, base_seconds, train_seconds, samples = time.perf_counter(), float(state["seconds"]), 0.0, 0
    model.train()
    for epoch in range(state["epoch"], epochs):
        if state["stopped_early"]:
            break
        plan = plan_epoch(train.lengths, eff, world, seed, epoch, t["group_by_length"])
        t_epoch = time.perf_counter()
        for k in range(state["step_in_epoch"], len(plan)):
            gb = plan[k]
            micros = micro_batches(gb, rank, world, micro, train.lengths)
            step_loss = torch.zeros((), device=device)
            for j, mb in enumerate(micros):
                if oom_above and micro > int(oom_above):
                    raise torch.OutOfMemoryError(f"simulated out of memory at micro-batch {micro} (FINETUNE_SIMULATE_OOM_ABOVE={oom_above})")
                sync = j == len(micros) - 1 or world == 1
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    batch, y = train.collate(mb, device)
                    with autocast():
                        logits = model(**batch).logits
                    loss = loss_fn(logits, y) / len(gb)
                    if nan_above and float(t["learning_rate"]) > float(nan_above):
                        loss = loss * float("nan")
                    (scaler.scale(loss * world) if scaler else loss * world).backward()
                step_loss += loss.detach()
            if world > 1:
                dist.all_reduce(step_loss)
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(t["max_grad_norm"]))
            if scaler:
                scaler.step(optimizer), scaler.update()
            else:
                optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_epoch"] = k + 1
            samples += len(gb)
            if rank == 0:
                _append(metrics_path, {"type": "step", "step": state["global_step"], "epoch": round(epoch + (k + 1) / len(plan), 4),
                                       "loss": float(step_loss), "learning_rate": lr})
            if step_delay:
                time.sleep(step_delay)
            if trial and not math.isfinite(float(step_loss)):
                diverged = True
                _log(f"trial diverged: loss {float(step_loss)} at step {state['global_step']}", rank)
                break
            if max_steps and state["global_step"] >= max_steps:
                break
            every = t.get("save_every_steps")
            if every and state["global_step"] % every == 0 and k + 1 < len(plan):
                train_seconds += time.perf_counter() - t_epoch
                checkpoint()
                t_epoch = time.perf_counter()
        train_seconds += time.perf_counter() - t_epoch
        if trial:  # no epoch-end evaluation or checkpoint: one validation score at the end of the budget
            state.update(epochs_run=epoch + 1)
            if diverged or (max_steps and state["global_step"] >= max_steps):
                break
            continue
        state.update(epoch=epoch + 1, step_in_epoch=0, epochs_run=epoch + 1)
        if (epoch + 1) % int(t["eval_every_epochs"]) == 0 or epoch + 1 == epochs:
            ev = evaluate(core, val, loss_fn, max(2 * micro, 32), device, autocast)
            if rank == 0:
                _append(metrics_path, {"type": "eval", "step": state["global_step"], "epoch": epoch + 1, **ev})
            _log(f"epoch {epoch + 1}: " + ", ".join(f"{k2} {v:.4f}" for k2, v in ev.items()), rank)
            if is_better(es_key, ev[es_key], state["best_value"], float(es["min_delta"])):
                state.update(best_value=ev[es_key], best_step=state["global_step"], best_epoch=epoch + 1, bad_evals=0)
            else:
                state["bad_evals"] += 1
                if state["bad_evals"] >= int(es["patience"]) and epoch + 1 < epochs:
                    state["stopped_early"] = True
                    _log(f"early stopping: no {es_key} improvement in {state['bad_evals']} evaluations", rank)
        checkpoint()

    state["seconds"] = base_seconds + time.perf_counter() - attempt_t0
    if trial:
        return _finish_trial(run, core, val, loss_fn, micro, device, autocast, es_key, state, diverged, t, rank,
                             world, train_seconds, samples)
    note = None
    if state["best_step"] is not None and state["best_step"] != state["global_step"]:
        best_dir = ckpt_root / f"step-{state['best_step']}"
        problem = verify_checkpoint(best_dir) if best_dir.is_dir() else "it is missing"
        if problem is None:
            restore_trainable(core, best_dir, device)
            _log(f"restored the best checkpoint (step {state['best_step']}, epoch {state['best_epoch']})", rank)
        else:  # keep the final weights, and say so: the summary describes the model actually saved
            last = _last_eval(metrics_path)
            note = (f"best checkpoint step-{state['best_step']} was unusable ({problem}); "
                    f"kept the final weights of step {state['global_step']}")
            if rank == 0 and best_dir.is_dir():  # moved aside so that no later attempt trips over it again
                aside = best_dir.with_name(f"corrupt-step-{state['best_step']}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(best_dir, aside)
                note += f" (moved aside to {aside.name})"
            _log(f"WARNING: {note}", rank)
            state.update(best_step=state["global_step"], best_epoch=state["epochs_run"],
                         best_value=last.get(es_key) if last else None)
    summary = None
    if rank == 0:
        final = run / "model"
        shutil.rmtree(final, ignore_errors=True)
        with atomic_dir(final) as tmp:
            core.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        summary = {
            "best_epoch": state["best_epoch"], "best_step": state["best_step"], "best_metric_name": es_key,
            "best_metric": state["best_value"], "epochs_run": state["epochs_run"], "stopped_early": state["stopped_early"],
            "global_step": state["global_step"], "steps_per_epoch": steps_per_epoch, "seconds": round(state["seconds"], 3),
            "train_seconds_this_attempt": round(train_seconds, 3), "samples_this_attempt": samples,
            "samples_per_second": round(samples / train_seconds, 3) if train_seconds > 0 else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "learning_rate": float(t["learning_rate"]), "effective_batch_size": eff, "micro_batch_size": micro,
            "gradient_accumulation_steps": accum, "processes": world, "resumed_from_step": resumed_from,
            "method": info["method"], "trainable_parameters": built.trainable_parameters,
        }
        if device.startswith("cuda"):
            summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if note:
            summary["best_restore_note"] = note
        write_json(run / "training_summary.json", summary)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return (summary, core) if return_model else summary


def _finish_trial(run: Path, core, val: "Rows", loss_fn, micro: int, device: str, autocast, es_key: str, state: dict,
                  diverged: bool, t: dict, rank: int, world: int, train_seconds: float, samples: int) -> dict | None:
    """A learning-rate trial ends with one validation score; no model, no checkpoint."""
    ev: dict = {}
    if not diverged:
        ev = evaluate(core, val, loss_fn, max(2 * micro, 32), device, autocast)
        diverged = not math.isfinite(float(ev.get("val_loss", float("nan"))))
    summary = None
    if rank == 0:
        if ev:
            _append(run / "metrics.jsonl", {"type": "eval", "step": state["global_step"], "epoch": state["epochs_run"], **ev})
        _log(f"trial lr {t['learning_rate']:g}, {state['global_step']} steps: "
             + ("diverged" if diverged else ", ".join(f"{k} {v:.4f}" for k, v in ev.items())), rank)
        summary = {"trial": True, "diverged": diverged, "final_eval": ev, "best_epoch": None,
                   "best_step": state["global_step"], "best_metric_name": es_key, "best_metric": ev.get(es_key),
                   "epochs_run": state["epochs_run"], "stopped_early": False, "global_step": state["global_step"],
                   "seconds": round(base_seconds_of(state), 3), "train_seconds_this_attempt": round(train_seconds, 3),
                   "samples_this_attempt": samples, "learning_rate": float(t["learning_rate"]),
                   "max_steps": t.get("max_steps"), "resumed_from_step": 0}
        write_json(run / "training_summary.json", summary)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def base_seconds_of(state: dict) -> float:
    return float(state.get("seconds") or 0.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tasks.train_worker RUN_DIR", file=sys.stderr)
        return 2
    import torch

    try:
        run(argv[0])
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        t = read_json(Path(argv[0]) / "resolved_config.json")["resolved_training"]
        write_json(Path(argv[0]) / OOM_MARKER, {"micro_batch_size": t["micro_batch_size"], "error": str(exc)[:500],
                                                "rank": int(os.environ.get("RANK", "0"))})
        print(f"[train_worker] out of memory at micro-batch {t['micro_batch_size']}: {exc}", file=sys.stderr, flush=True)
        return EXIT_OOM
    return 0


if __name__ == "__main__":
    sys.exit(main())
