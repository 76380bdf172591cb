"""The training child process: `python -m tasks.training.worker RUN_DIR` (or under torchrun for DDP).

Runs the shared loop (tasks/training/loop.py) on the run folder's plan.json. An out-of-memory error writes
`worker_oom.json` and exits with EXIT_OOM, so the parent (tasks/training/launch.py) can halve the micro-batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.files import write_json
from tasks.plan import RunPlan
from tasks.training.loop import run

EXIT_OOM = 75
OOM_MARKER = "worker_oom.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tasks.training.worker RUN_DIR", file=sys.stderr)
        return 2
    import torch

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
