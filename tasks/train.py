"""Training stage: resolve the settings, key the run folder, launch the training child process, back off on
out-of-memory, resume after a crash, and hand back a small record (never the model).

`train_model(cfg, prepared_dir, tokenized_dir) -> TrainResult`. The run folder
`<workspace>/runs/<key>/` is keyed by everything that changes the trained weights: dataset
fingerprint, tokenized key, base-model fingerprint, the model/method/training sections (minus
timeout_s and save_every_steps, which do not change the result), data.max_length and the resolved
method. The loop itself lives in tasks/train_worker.py and runs in a child (DESIGN.md rule 6).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.base_model import model_fingerprint, resolve_model
from tasks.config import RunConfig, resolve_training
from tasks.files import read_json, sha256_json, write_json
from tasks.losses import check_early_stopping_metric, resolve_loss

TRAIN_VERSION = "2"
KEY_EXCLUDED_TRAINING = ("timeout_s", "save_every_steps")
REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("finetune.train")


class TrainingError(RuntimeError):
    """The training child failed (the message carries the tail of its log)."""


class TrainingTimeout(TrainingError):
    pass


@dataclass
class TrainResult:
    path: str
    key: str
    method: str
    model_dir: str
    best_epoch: int | None
    best_metric: float | None
    epochs_run: int
    global_step: int
    resumed_from_step: int
    seconds: float
    reused: bool = False
    best_metric_name: str = "val_loss"
    oom_backoffs: list[dict] = field(default_factory=list)


def resolve_method(cfg: RunConfig, base: str, max_length: int, micro: int) -> tuple[str, dict | None]:
    """The method to train with; `auto` asks the memory estimate (tasks.memory.estimate_memory)."""
    if cfg.method.kind != "auto":
        return cfg.method.kind, None
    from tasks.memory import estimate_memory

    est = estimate_memory(base, cfg.method.model_dump(mode="json"), micro_batch_size=micro, max_length=max_length,
                          trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    if est["choice"] is None:
        from tasks.config import ConfigError

        raise ConfigError([("method.kind", f"auto: {est['reason']}")])
    log.info("method auto -> %s (%s)", est["choice"], est["reason"])
    return est["choice"], est


def resolve_settings(cfg: RunConfig, task: str, method: str, device: str) -> dict:
    """resolve_training plus what depends on task and device: loss, precision, checkpointing, early stopping."""
    t = resolve_training(cfg, method)
    t["loss"] = resolve_loss(task, cfg.training.loss)
    t["early_stopping_key"] = check_early_stopping_metric(task, early_stopping_metric(cfg, task))
    on_gpu = device.startswith("cuda")
    precision = cfg.training.precision
    if not on_gpu:
        t["precision"] = "fp32"
        if precision not in ("auto", "fp32"):
            t["precision_note"] = f"{precision} requested but training runs on CPU: fp32"
    elif precision == "auto":
        import torch

        t["precision"] = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    gc = cfg.training.gradient_checkpointing
    t["gradient_checkpointing"] = bool(gc) if gc is not None else (method == "qlora" and on_gpu)
    t["device"] = device
    # adapters keep the frozen base in 16-bit on a GPU (bf16 when mixed precision is bf16), fp32 on CPU
    t["base_dtype"] = "bfloat16" if (on_gpu and method in ("lora", "dora") and t["precision"] == "bf16") else "float32"
    return t


def early_stopping_metric(cfg: RunConfig, task: str) -> str:
    """training.early_stopping.metric, with auto = the evaluation's primary metric (f1_macro / f1_micro / r2)."""
    from tasks.losses import METRICS_FOR_TASK

    metric = cfg.training.early_stopping.metric
    if metric != "auto":
        return metric
    primary = cfg.evaluation.primary_metric
    if primary in METRICS_FOR_TASK[task]:
        return primary
    return {"single_label": "f1_macro", "multi_label": "f1_micro", "regression": "r2"}[task]


def resolved_head(cfg: RunConfig, base: str | None = None) -> tuple[str, str]:
    from tasks.heads import resolve_head

    return resolve_head(cfg.model.head, base or resolve_model(cfg.model), cfg.model.revision)


def start_adapter(cfg: RunConfig, method: str) -> Path | None:
    """retrain.start_from=production with an adapter method: the production version's adapter folder."""
    if method not in ("lora", "qlora", "dora") or cfg.retrain.start_from != "production":
        return None
    from tasks.retrain import production_adapter

    return production_adapter(cfg)


def run_key(cfg: RunConfig, dataset_fp: str, tokenized_key: str, base_fp: str, method: str) -> str:
    training = cfg.training.model_dump(mode="json", exclude=set(KEY_EXCLUDED_TRAINING))
    payload = {
        "dataset": dataset_fp, "tokenized": tokenized_key, "base_model": base_fp,
        "model": {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision,
                  "head": resolved_head(cfg)[0]},
        "method": cfg.method.model_dump(mode="json"), "resolved_method": method, "training": training,
        "max_length": cfg.data.max_length, "version": TRAIN_VERSION,
    }
    start = start_adapter(cfg, method)
    if start is not None:  # continuing from production: its adapter is an input like the base model
        from tasks.files import sha256_tree

        payload["start_adapter"] = sha256_tree(start)
    return sha256_json(payload)[:20]


def prepare_run(cfg: RunConfig, prepared_dir: str, tokenized_dir: str, device: str | None = None,
                trial: dict | None = None, lr_search: dict | None = None) -> Path:
    """Create `<workspace>/runs/<key>/` with resolved_config.json and run_info.json; returns its path.

    trial {"max_steps", "rate"}: a learning-rate trial in `<workspace>/lr-trials/<key>/` (tasks/lr_search.py):
    stops after max_steps, scores validation once, saves no model. lr_search: the search summary, recorded."""
    from tasks.modeling import problem_type_for, resolve_compute_dtype, resolve_device

    manifest = read_json(Path(prepared_dir) / "manifest.json")
    tok_info = read_json(Path(tokenized_dir) / "tokenized.json")
    task, labels = manifest["task"], manifest["labels"]
    base = resolve_model(cfg.model)
    device = resolve_device(device)
    pre = resolve_training(cfg)
    method, estimate = resolve_method(cfg, base, cfg.data.max_length, pre["micro_batch_size"])
    settings = resolve_settings(cfg, task, method, device)
    if trial is not None:
        from tasks.lr_search import trial_key

        key = trial_key(cfg, manifest["fingerprint"], tok_info["key"], model_fingerprint(cfg.model), method,
                        trial["rate"], trial["max_steps"])
        run = cfg.workspace_path() / "lr-trials" / key
        settings.update(max_steps=int(trial["max_steps"]), trial=True, learning_rate_source="search trial",
                        save_every_steps=None)
        if (run / "training_summary.json").exists():
            return run
    else:
        key = run_key(cfg, manifest["fingerprint"], tok_info["key"], model_fingerprint(cfg.model), method)
        run = cfg.workspace_path() / "runs" / key
        if lr_search:
            settings["learning_rate_source"] = f"search ({lr_search.get('metric')} on validation)"
        if (run / "model").is_dir() and (run / "training_summary.json").exists():
            if lr_search and (run / "resolved_config.json").exists():
                rc = read_json(run / "resolved_config.json")
                if "lr_search" not in rc:  # the same rate was trained before: record how it was found now
                    write_json(run / "resolved_config.json", rc | {"lr_search": lr_search})
            return run  # finished: its recorded facts stay as they are
    run.mkdir(parents=True, exist_ok=True)
    backoff = run / "oom_backoff.json"
    if backoff.exists():  # an earlier attempt already halved the micro-batch: keep its setting
        b = read_json(backoff)
        settings["micro_batch_size"], settings["gradient_accumulation_steps"] = b["micro_batch_size"], b["gradient_accumulation_steps"]
    resolved = cfg.model_dump(mode="json") | {"resolved_training": settings}
    if lr_search:
        resolved["lr_search"] = lr_search
    if estimate is not None:
        resolved["resolved_method"] = {"kind": method, "estimate": estimate}
    write_json(run / "resolved_config.json", resolved)
    quant = None
    if method == "qlora":
        quant = {"load_in_4bit": True, "quant_type": cfg.method.quant_type, "double_quant": cfg.method.double_quant,
                 "compute_dtype": resolve_compute_dtype(cfg.method.compute_dtype, device), "skip_modules": None}
    info_path = run / "run_info.json"
    old = read_json(info_path) if info_path.exists() else {}
    head, head_reason = resolved_head(cfg, base)
    start = start_adapter(cfg, method) if trial is None else None
    info = {
        "method": method, "base_model": base, "base_model_fingerprint": model_fingerprint(cfg.model),
        "revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code, "task": task,
        "problem_type": problem_type_for(task), "labels": labels, "num_labels": 1 if task == "regression" else len(labels),
        "target_name": manifest.get("settings", {}).get("label_column", "target"),
        "dataset_fingerprint": manifest["fingerprint"], "tokenized_path": str(Path(tokenized_dir).resolve()),
        "tokenizer_path": tok_info.get("tokenizer", base), "prepared_path": str(Path(prepared_dir).resolve()),
        "quantization": quant, "head_modules": old.get("head_modules", []), "run_key": key,
        "head": head, "head_reason": head_reason,
        "start_adapter": str(start) if start is not None else None,
    }
    if quant is not None:
        quant["skip_modules"] = _head_modules(base, cfg, task, labels, info["target_name"], head)
        info["head_modules"] = quant["skip_modules"]
    for k in ("target_modules", "trainable_parameters", "total_parameters", "build_notes"):
        if k in old:
            info[k] = old[k]
    write_json(info_path, info)
    return run


def _head_modules(base: str, cfg: RunConfig, task: str, labels: list[str], target_name: str,
                  head: str = "pooler") -> list[str]:
    from tasks.modeling import _meta_model, head_module_names, model_config

    config = model_config(base, task, labels, trust_remote_code=cfg.model.trust_remote_code,
                          revision=cfg.model.revision, target_name=target_name, head=head)
    return head_module_names(_meta_model(config, cfg.model.trust_remote_code))


def worker_command(run: Path, processes: int) -> list[str]:
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "tasks.train_worker", str(run)]
    return [sys.executable, "-m", "tasks.train_worker", str(run)]


def launch_worker(run: Path, processes: int, timeout_s: float, attempt: int, threads: int | None = None) -> int:
    """Run the child in its own process group; kill the whole group past timeout_s. Returns the exit code."""
    logs = run / "logs"
    logs.mkdir(exist_ok=True)
    log_file = logs / f"attempt-{attempt}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:  # parallel search trials share the CPU cores instead of oversubscribing them
        env["FINETUNE_TORCH_THREADS"] = str(threads)
    with open(log_file, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(worker_command(run, processes), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(REPO_ROOT), start_new_session=True)
        write_json(run / "worker.json", {"pid": proc.pid, "attempt": attempt, "started": time.time()})
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TrainingTimeout(f"training ran past training.timeout_s ({timeout_s:g} s left for this attempt) and was killed; "
                                  f"the next attempt resumes from the last checkpoint (log: {log_file})") from None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _finished(run: Path) -> bool:
    if not (run / "training_summary.json").exists():
        return False
    return (run / "model").is_dir() or bool(read_json(run / "training_summary.json").get("trial"))


def _result(run: Path, reused: bool) -> TrainResult:
    s = read_json(run / "training_summary.json")
    info = read_json(run / "run_info.json")
    return TrainResult(path=str(run), key=run.name, method=info["method"], model_dir=str(run / "model"),
                       best_epoch=s["best_epoch"], best_metric=s["best_metric"], epochs_run=s["epochs_run"],
                       global_step=s["global_step"], resumed_from_step=s.get("resumed_from_step", 0), seconds=s["seconds"],
                       reused=reused, best_metric_name=s["best_metric_name"], oom_backoffs=s.get("oom_backoffs", []))


def train_model(cfg: RunConfig, prepared_dir: str, tokenized_dir: str, *, trial: dict | None = None,
                lr_search: dict | None = None) -> TrainResult:
    """Train (or reuse, or resume) the run for these inputs; returns paths and a few numbers.

    training.learning_rate auto without a search summary runs the search here, one trial after another
    (the flow runs it as parallel tasks first and passes the winner's config + `lr_search`)."""
    from filelock import FileLock

    if trial is None and lr_search is None and cfg.training.learning_rate == "auto":
        from tasks.lr_search import search_learning_rate

        from tasks.lr_search import with_rate

        result = search_learning_rate(cfg, prepared_dir, tokenized_dir)
        cfg, lr_search = with_rate(cfg, result.best_rate), result.summary()
    run = prepare_run(cfg, prepared_dir, tokenized_dir, trial=trial, lr_search=lr_search)
    if _finished(run):
        return _result(run, reused=True)
    threads = None
    if trial is not None and cfg.training.search.max_parallel > 1:
        threads = max(1, (os.cpu_count() or 1) // cfg.training.search.max_parallel)
    with FileLock(str(run / ".train.lock")):
        if _finished(run):
            return _result(run, reused=True)
        backoffs: list[dict] = read_json(run / "oom_backoff.json")["events"] if (run / "oom_backoff.json").exists() else []
        attempt = len(list((run / "logs").glob("attempt-*.log"))) + 1 if (run / "logs").is_dir() else 1
        deadline = time.monotonic() + cfg.training.timeout_s
        while True:
            marker = run / "worker_oom.json"
            marker.unlink(missing_ok=True)
            resolved = read_json(run / "resolved_config.json")
            t = resolved["resolved_training"]
            rc = launch_worker(run, cfg.training.processes, max(1.0, deadline - time.monotonic()), attempt, threads)
            log_file = run / "logs" / f"attempt-{attempt}.log"
            attempt += 1
            if rc == 0:
                break
            if marker.exists():
                micro, accum = int(t["micro_batch_size"]), int(t["gradient_accumulation_steps"])
                if micro <= 1:
                    raise TrainingError(f"out of memory at micro-batch 1; nothing left to halve. Lower data.max_length, "
                                        f"use method lora/qlora or fewer processes.\n{_tail(log_file)}")
                event = {"from_micro_batch": micro, "to_micro_batch": micro // 2, "from_accumulation": accum,
                         "to_accumulation": accum * 2, "time": time.time()}
                backoffs.append(event)
                t["micro_batch_size"], t["gradient_accumulation_steps"] = micro // 2, accum * 2
                write_json(run / "resolved_config.json", resolved)
                write_json(run / "oom_backoff.json", {"micro_batch_size": micro // 2, "gradient_accumulation_steps": accum * 2,
                                                      "events": backoffs})
                log.warning("out of memory at micro-batch %d: retrying with micro-batch %d x accumulation %d "
                            "(same effective batch %d)", micro, micro // 2, accum * 2, t["effective_batch_size"])
                continue
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            if rc == -signal.SIGKILL:
                how += " (SIGKILL: killed from outside, e.g. by the kernel's out-of-memory killer)"
            raise TrainingError(f"training child {how}; the next attempt resumes from the last checkpoint "
                                f"(log: {log_file}):\n{_tail(log_file)}")
        summary = read_json(run / "training_summary.json")
        summary["oom_backoffs"] = backoffs
        write_json(run / "training_summary.json", summary)
    return _result(run, reused=False)


def train_task():
    """The Prefect task wrapper (created lazily so importing this module stays light)."""
    from prefect import task

    return task(name="train", description="Train the model in a child process (resumes from checkpoints).")(train_model)
