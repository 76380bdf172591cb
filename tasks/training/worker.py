"""The training child process: `python -m tasks.training.worker RUN_DIR` (or under torchrun for DDP).

Runs the shared loop (tasks/training/loop.py) on the run folder's plan.json. An out-of-memory error writes
`worker_oom.json` and exits with EXIT_OOM, so the parent (tasks/training/launch.py) can halve the micro-batch.

The child dies with its parent (`die_with_parent`: a `kill -9` of `finetune run` must not leave a child training
on while a rerun starts a second one in the same folder), and it holds an exclusive lock on the run folder
(`<run>/.child.lock`, flock: the kernel drops it when the process dies) for its whole life: a second child for the
same folder waits up to FINETUNE_CHILD_LOCK_WAIT_S seconds, then exits with EXIT_BUSY and says who holds it.
Under torchrun the launcher mode (`worker --launch RUN_DIR -- torchrun ...`) does both, then becomes the torchrun
launcher (exec keeps the lock and the parent-death signal); each worker it starts dies with it in turn.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tasks.files import write_json
from tasks.plan import RunPlan

EXIT_OOM = 75
EXIT_BUSY = 76  # another live process trains in this run folder
EXIT_ORPHANED = 77  # the parent died before this child could arrange to die with it
OOM_MARKER = "worker_oom.json"
CHILD_LOCK = ".child.lock"
PARENT_ENV = "FINETUNE_PARENT_PID"  # the pid this child must die with (set by the parent)
LAUNCH_FLAG = "--launch"
LOCK_WAIT_ENV = "FINETUNE_CHILD_LOCK_WAIT_S"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies (prctl PR_SET_PDEATHSIG; it survives
    exec). Elsewhere a watchdog thread exits when the parent changes. A parent that died before this ran is caught
    by comparing getppid() with the pid the parent wrote to the environment."""
    expected = int(os.environ.get(PARENT_ENV) or os.getppid())
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):  # not Linux: poll instead
        threading.Thread(target=_watch_parent, args=(expected,), daemon=True, name="parent-watchdog").start()
    if os.getppid() != expected:
        print(f"[train] the parent process {expected} is gone; not training", file=sys.stderr, flush=True)
        os._exit(EXIT_ORPHANED)


def _watch_parent(expected: int, every_s: float = 0.5) -> None:
    while os.getppid() == expected:
        time.sleep(every_s)
    os._exit(EXIT_ORPHANED)


def lock_run_folder(run: Path, wait_s: float | None = None) -> int:
    """Hold an exclusive lock on `<run>/.child.lock` for this process's life (returns its descriptor, kept open).
    Held by another process for longer than `wait_s`: print who holds it and exit with EXIT_BUSY."""
    wait_s = float(os.environ.get(LOCK_WAIT_ENV) or 60) if wait_s is None else wait_s
    path = run / CHILD_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "?"
            if time.monotonic() >= deadline:
                print(
                    f"[train] another training process (pid {holder}) is training in {run} and holds {path}; "
                    f"not starting a second one there (waited {wait_s:g} s)",
                    file=sys.stderr,
                    flush=True,
                )
                sys.exit(EXIT_BUSY)
            if not told:
                print(f"[train] waiting for training process {holder} to leave {run}", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the message above (informational only)
    return fd


def launch(argv: list[str]) -> int:
    """`--launch RUN_DIR -- COMMAND...`: lock the run folder, die with the parent, then become COMMAND (torchrun),
    keeping the lock (an inherited descriptor) and the parent-death signal across exec."""
    if len(argv) < 4 or argv[0] != LAUNCH_FLAG or argv[2] != "--":
        print(f"usage: python -m tasks.training.worker {LAUNCH_FLAG} RUN_DIR -- COMMAND...", file=sys.stderr)
        return 2
    die_with_parent()
    fd = lock_run_folder(Path(argv[1]))
    os.set_inheritable(fd, True)
    os.environ[PARENT_ENV] = str(os.getpid())  # exec keeps this pid: the workers' parent
    os.execv(argv[3], argv[3:])
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == LAUNCH_FLAG:
        return launch(argv)
    if len(argv) != 1:
        print("usage: python -m tasks.training.worker RUN_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    if "LOCAL_RANK" not in os.environ:  # under torchrun the launcher holds the folder's lock
        lock_run_folder(Path(argv[0]))
    import torch

    from tasks.training.loop import run  # here, not at the top: the flow imports this module's names only

    try:
        run(argv[0])
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        micro = RunPlan.read(argv[0]).micro_batch_size
        write_json(
            Path(argv[0]) / OOM_MARKER,
            {"micro_batch_size": micro, "error": str(exc)[:500], "rank": int(os.environ.get("RANK", "0"))},
        )
        print(f"[train] out of memory at micro-batch {micro}: {exc}", file=sys.stderr, flush=True)
        return EXIT_OOM
    return 0


if __name__ == "__main__":
    sys.exit(main())
