"""Launching training: the run folder, the training child process, the out-of-memory back-off, resume.

`train(plan, ws)` trains (or reuses, or resumes) the run of a resolved RunPlan and returns a small record, never
the model. The run folder `<workspace>/runs/<plan.run_key()>/` (a learning-rate trial: `lr-trials/<key>/`) holds
plan.json; the loop runs in a child process (`python -m tasks.training.worker RUN_DIR`, torchrun when
processes > 1) so that a crash, an OOM or a timeout kills the child, not the flow (DESIGN.md rule 6). An
out-of-memory exit halves the micro-batch and doubles accumulation (same effective batch) and the plan.json in
the run folder records what was actually trained.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.files import write_json
from tasks.plan import RunPlan
from tasks.records import TrainResult
from tasks.training import worker  # imported (not only named) so that the loop's code is part of this stage's code
from tasks.workspace import Workspace, read_facts

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = worker.__name__
OOM_MARKER = worker.OOM_MARKER
log = logging.getLogger("finetune.train")


class TrainingError(RuntimeError):
    """The training child failed (the message carries the tail of its log)."""


class TrainingTimeout(TrainingError):
    pass


def run_dir(plan: RunPlan, ws: Workspace) -> Path:
    if plan.is_trial:
        return ws.trial(plan.trial_key(plan.learning_rate, plan.trial_max_steps))
    return ws.run(plan.run_key())


def worker_command(run: Path, processes: int) -> list[str]:
    """The child's command. Under torchrun the child is the worker module's launcher mode, which locks the run
    folder, arranges to die with this process and then becomes (exec) the torchrun launcher; the workers torchrun
    starts die with it in turn (tasks/training/worker.py)."""
    if processes > 1:
        return [
            sys.executable,
            "-m",
            WORKER_MODULE,
            worker.LAUNCH_FLAG,
            str(run),
            "--",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            WORKER_MODULE,
            str(run),
        ]
    return [sys.executable, "-m", WORKER_MODULE, str(run)]


def launch_worker(run: Path, processes: int, timeout_s: float, attempt: int, threads: int | None = None) -> int:
    """Run the child in its own process group; kill the whole group past timeout_s. Returns the exit code.

    The child dies with this process (worker.die_with_parent: a `kill -9` of the flow leaves no orphan training on)
    and holds the run folder's lock (worker.CHILD_LOCK) for its whole life."""
    logs = run / "logs"
    logs.mkdir(exist_ok=True)
    log_file = logs / f"attempt-{attempt}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.get("FINETUNE_QUIET") and env.get("TRANSFORMERS_VERBOSITY") == "error":
        env.pop("TRANSFORMERS_VERBOSITY")  # the terminal is quiet; the child's log file keeps library warnings
    env[worker.PARENT_ENV] = str(os.getpid())  # the child checks it is still ours once it can no longer be orphaned
    if threads:  # parallel search trials share the CPU cores instead of oversubscribing them
        env["FINETUNE_TORCH_THREADS"] = str(threads)
    with open(log_file, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            worker_command(run, processes),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
        write_json(run / "worker.json", {"pid": proc.pid, "attempt": attempt, "started": time.time()})
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TrainingTimeout(
                f"training ran past training.timeout_s ({timeout_s:g} s left for this attempt) and was "
                f"killed; the next attempt resumes from the last checkpoint (log: {log_file})"
            ) from None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def finished(run: Path) -> bool:
    """A finished run or trial; a damaged training_summary.json is a WorkspaceError naming it and the fix."""
    if not (run / "training_summary.json").exists():
        return False
    return (run / "model").is_dir() or Workspace.read_summary(run).trial


def result_of(run: Path, reused: bool) -> TrainResult:
    s = Workspace.read_summary(run)
    plan = RunPlan.read(run)
    return TrainResult(
        path=str(run),
        key=run.name,
        method=plan.method,
        model_dir=str(run / "model"),
        best_epoch=s.best_epoch,
        best_metric=s.best_metric,
        epochs_run=s.epochs_run,
        global_step=s.global_step,
        resumed_from_step=s.resumed_from_step,
        seconds=s.seconds,
        reused=reused,
        best_metric_name=s.best_metric_name,
        oom_backoffs=list(s.oom_backoffs),
    )


def _write_plan(run: Path, plan: RunPlan) -> None:
    """plan.json in the run folder; an earlier attempt's (with its out-of-memory back-off) is kept."""
    if (run / "plan.json").exists():
        try:
            old = RunPlan.read(run)
            if old.identity() == plan.identity():
                return
        except ValueError:
            pass  # damaged: written anew below
    plan.write(run)


def _back_off(run: Path, plan: RunPlan, backoffs: list[dict], log_file: Path) -> RunPlan:
    micro, accum = plan.micro_batch_size, plan.gradient_accumulation_steps
    if micro <= 1:
        raise TrainingError(
            f"out of memory at micro-batch 1; nothing left to halve. Lower data.max_length, "
            f"use method lora/qlora or fewer processes.\n{tail(log_file)}"
        )
    smaller = plan.with_micro_batch(micro // 2)
    backoffs.append(
        {
            "from_micro_batch": micro,
            "to_micro_batch": smaller.micro_batch_size,
            "from_accumulation": accum,
            "to_accumulation": smaller.gradient_accumulation_steps,
            "time": time.time(),
        }
    )
    smaller.write(run)
    write_json(run / "oom_backoff.json", {"events": backoffs})
    log.warning(
        "out of memory at micro-batch %d: retrying with micro-batch %d x accumulation %d (same effective batch %d)",
        micro,
        smaller.micro_batch_size,
        smaller.gradient_accumulation_steps,
        plan.effective_batch_size,
    )
    return smaller


def _failure(rc: int, log_file: Path) -> TrainingError:
    if rc == worker.EXIT_BUSY:
        return TrainingError(
            f"another training process holds the run folder {log_file.parent.parent} (its {worker.CHILD_LOCK}); "
            f"this attempt did not start (log: {log_file}):\n{tail(log_file)}"
        )
    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
    if rc == -signal.SIGKILL:
        how += " (SIGKILL: killed from outside, e.g. by the kernel's out-of-memory killer)"
    return TrainingError(
        f"training child {how}; the next attempt resumes from the last checkpoint (log: {log_file}):\n{tail(log_file)}"
    )


def prepare_run(plan: RunPlan, ws: Workspace) -> Path:
    """The run folder of `plan` with its plan.json (an earlier attempt's back-off kept); nothing is launched."""
    run = run_dir(plan, ws)
    run.mkdir(parents=True, exist_ok=True)
    _write_plan(run, plan)
    return run


def train(
    plan: RunPlan, ws: Workspace, *, search_summary: dict | None = None, threads: int | None = None
) -> TrainResult:
    """Train (or reuse, or resume) the run of `plan`; returns paths and a few numbers.

    The learning rate must be resolved (a number in the config, the method default, or the search's winner)."""
    from filelock import FileLock

    if plan.learning_rate is None:
        raise ValueError(
            "the plan's learning rate is not resolved: run the learning-rate search first "
            "(tasks/training/search.py) and train plan.with_rate(...)"
        )
    run = run_dir(plan, ws)
    if search_summary and not (run / "lr_search.json").exists() and finished(run):
        write_json(run / "lr_search.json", search_summary)  # the same rate was trained before: record how it was found
    if finished(run):
        return result_of(run, reused=True)
    run.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run / ".train.lock")):
        if finished(run):
            return result_of(run, reused=True)
        _write_plan(run, plan)
        if search_summary:
            write_json(run / "lr_search.json", search_summary)
        backoffs: list[dict] = (
            list(read_facts(run / "oom_backoff.json", "training run").get("events") or [])
            if (run / "oom_backoff.json").exists()
            else []
        )
        attempt = len(list((run / "logs").glob("attempt-*.log"))) + 1 if (run / "logs").is_dir() else 1
        deadline = time.monotonic() + plan.timeout_s
        current = RunPlan.read(run)
        while True:
            (run / OOM_MARKER).unlink(missing_ok=True)
            rc = launch_worker(run, plan.processes, max(1.0, deadline - time.monotonic()), attempt, threads)
            log_file = run / "logs" / f"attempt-{attempt}.log"
            attempt += 1
            if rc == 0:
                break
            if not (run / OOM_MARKER).exists():
                raise _failure(rc, log_file)
            current = _back_off(run, current, backoffs, log_file)
        summary = read_facts(run / "training_summary.json", "training run")
        summary["oom_backoffs"] = backoffs
        write_json(run / "training_summary.json", summary)
    return result_of(run, reused=False)
