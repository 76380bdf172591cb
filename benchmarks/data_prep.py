"""Time `prepare_dataset` on the 60k-row SST-2 train file (goal: under 30 s). Prints one JSON line.

.venv/bin/python benchmarks/data_prep.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.config_loading import load_config  # noqa: E402
from tasks.data.prepare import prepare_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.csv"))
    args = ap.parse_args()
    if not Path(args.source).exists():
        print(json.dumps({"benchmark": "data_prep", "skipped": f"{args.source} is absent"}))
        return
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as ws:
            cfg = load_config(None, [f"workspace={ws}", f"data.source={args.source}"])
            t0 = time.perf_counter()
            r = prepare_dataset(cfg)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert prepare_dataset(cfg).reused
            warm.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "benchmark": "data_prep",
                "source": args.source,
                "rows": sum(r.rows.values()),
                "median_s": round(statistics.median(cold), 3),
                "median_reuse_s": round(statistics.median(warm), 3),
                "repeats": args.repeats,
                "goal_s": 30,
            }
        )
    )


if __name__ == "__main__":
    main()
