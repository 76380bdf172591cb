"""Training throughput of this project's loop by process layout: 1 process, 2 processes with DDP, 2 with FSDP
(tasks/training/parallel.py), and, with --baseline-tree, the same layouts run by another checkout of the project
(e.g. a `git worktree` of the commit before a change), interleaved in one run. Prints ONE JSON line.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/parallel_throughput.py [--baseline-tree /tmp/before] [--repeats 3] [--rows 800]

Each run trains MiniLM (bundled) on the same SMS-spam rows in its own workspace at a fixed learning rate, through the
tree's own `train_from_config` (plan, child process, torchrun for 2 processes), and reports the training summary's
samples/s (the training loop's own clock: no model loading, no validation). On 2 cores the 2-process runs get one
core each (torchrun sets OMP_NUM_THREADS=1), so they show the engine's cost, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sms_spam" / "train.csv"

DRIVER = """
import json, sys
from tasks.config_loading import load_config
from tasks.data.prepare import prepare_dataset
from tasks.data.tokenize import tokenize_dataset
from tasks.model.base import resolve_model
from tasks.training.recipe import train_from_config
cfg = load_config(None, sys.argv[1:])
p = prepare_dataset(cfg)
t = tokenize_dataset(p.path, resolve_model(cfg.model, cfg.workspace), cfg)
r = train_from_config(cfg, p.path, t.path)
print("RESULT " + open(r.path + "/training_summary.json").read().replace(chr(10), " "))
"""

LAYOUTS = {
    "1proc": [],
    "2proc_ddp": ["training.processes=2"],
    "2proc_fsdp": ["training.processes=2", "training.strategy=fsdp"],
}


def _one(tree: Path, ws: Path, sets: list[str], tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(HF_HOME=str(tmp / "hf"), XDG_CACHE_HOME=str(tmp / "cache"), FINETUNE_QUIET="1")
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, f"workspace={ws}", *sets], cwd=tree, env=env, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"run failed in {tree}: {' '.join(sets)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    s = json.loads(line[7:])
    return {"samples_per_second": s["samples_per_second"], "peak_rss_mb": s["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-tree", type=Path, help="another checkout of the project, run side by side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--method", default="full")
    a = ap.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "parallel_throughput", "skipped": f"{DATA} is absent"}))
        return
    common = [
        f"data.source={DATA}",
        f"data.max_rows={int(a.rows / 0.8)}",
        "data.max_length=128",
        "training.epochs=1",
        "training.effective_batch_size=16",
        "training.learning_rate=default",
        f"method.kind={a.method}",
    ]
    trees = {"current": REPO} | ({"baseline": a.baseline_tree.resolve()} if a.baseline_tree else {})
    runs = [(t, lay) for t in trees for lay in LAYOUTS if not (t == "baseline" and lay == "2proc_fsdp")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        tmp = Path(tmp)
        for rep in range(a.repeats):
            for tree, layout in reversed(runs) if rep % 2 else runs:
                ws = tmp / f"{tree}-{layout}-{rep}"
                m = _one(trees[tree], ws, common + LAYOUTS[layout], tmp)
                results.setdefault(f"{tree}_{layout}", []).append(m)
    med = statistics.median
    summary = {
        k: {
            "samples_per_second": med(r["samples_per_second"] for r in v),
            "samples_per_second_runs": [r["samples_per_second"] for r in v],
            "peak_rss_mb": med(r["peak_rss_mb"] for r in v),
        }
        for k, v in results.items()
    }
    ratios = {}
    if "baseline" in trees:
        for lay in ("1proc", "2proc_ddp"):
            ratios[f"{lay}_current_vs_baseline"] = round(
                summary[f"current_{lay}"]["samples_per_second"] / summary[f"baseline_{lay}"]["samples_per_second"], 3
            )
    ratios["fsdp_vs_ddp_2proc"] = round(
        summary["current_2proc_fsdp"]["samples_per_second"] / summary["current_2proc_ddp"]["samples_per_second"], 3
    )
    print(
        json.dumps(
            {
                "benchmark": "parallel_throughput",
                "method": a.method,
                "rows": a.rows,
                "repeats": a.repeats,
                "trees": {k: str(v) for k, v in trees.items()},
                "ratios": ratios,
                "results": summary,
                "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
