"""What the Prefect flow costs on top of the work, and what a fully cached rerun costs. Prints one JSON line.

Side by side in one run, each in a fresh process on the same config and data:
  plain      a script calling the stage functions directly (prepare, tokenize, train, evaluate, export, register)
  flow       `finetune run` against a local Prefect server (started here on a free loopback port)
  cached     the same `finetune run` again: every task Cached; records whether torch/transformers were imported
  ephemeral  the cached rerun without a server configured (Prefect starts a temporary one)

    .venv/bin/python benchmarks/pipeline_overhead.py [--repeats 1] [--set key=value ...]

Goals ([2-5]): flow / plain - 1 <= 5 %; cached / flow <= 1 %. On a shared machine the training time moves with the
load, so the time outside training (wall - the training child's own seconds) is reported for both as well.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# a fixed rate: the plain script and the flow then do the same training (the search is measured in recipes.py)
DEFAULT_SETS = ["training.epochs=1", "training.learning_rate=1e-4", "data.max_rows=400", "registry.name=bench"]

PLAIN = """
import sys, time
from tasks.config_loading import load_config
from tasks.model.base import resolve_model
from tasks.data.prepare import prepare_dataset
from tasks.data.tokenize import tokenize_dataset
from tasks.training.recipe import train_from_config as train_model
from tasks.evaluation.evaluate import evaluate_run
from tasks.release.export import export_run
from tasks.release.registry import register_version
cfg = load_config("configs/demo.yaml", sys.argv[1:])
p = prepare_dataset(cfg)
t = tokenize_dataset(p.path, resolve_model(cfg.model, cfg.workspace), cfg)
r = train_model(cfg, p.path, t.path)
e = evaluate_run(cfg, r.path)
x = export_run(cfg, r.path, e.path)
register_version(cfg, x.path, e.path)
print("TRAIN_S", r.seconds)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, api: str | None) -> dict:
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return env


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def _run(ws: Path, sets: list[str], env: dict, summary: Path) -> tuple[float, dict]:
    cmd = [PY, "-m", "tasks.cli", "run", "configs/demo.yaml", "--summary-json", str(summary)]
    for s in [f"workspace={ws}", *sets]:
        cmd += ["--set", s]
    wall, _ = _timed(cmd, env)
    return wall, json.loads(summary.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=None)
    args = ap.parse_args()
    sets = args.sets or DEFAULT_SETS
    out: dict = {"benchmark": "pipeline_overhead", "config": "configs/demo.yaml", "sets": sets}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        tmp = Path(tmp)
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        server_env = _env(tmp / "server-home", None) | {"PREFECT_UI_API_URL": api}
        server = subprocess.Popen(
            [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{api}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise SystemExit("the Prefect server did not start") from None
                    time.sleep(0.5)
            plain, flow, cached, ephemeral, heavy, plain_train, flow_train = [], [], [], [], [], [], []
            for i in range(args.repeats):
                wall, stdout = _timed([PY, "-c", PLAIN, f"workspace={tmp / f'plain{i}'}", *sets], _env(tmp / "h", None))
                plain.append(wall)
                plain_train.append(float(stdout.split("TRAIN_S")[-1].split()[0]))
                wall, first = _run(tmp / f"flow{i}", sets, _env(tmp / "client-home", api), tmp / "s1.json")
                flow.append(wall)
                run_dir = Path(first["folders"]["run"])
                flow_train.append(json.loads((run_dir / "training_summary.json").read_text())["seconds"])
                wall, again = _run(tmp / f"flow{i}", sets, _env(tmp / "client-home", api), tmp / "s2.json")
                cached.append(wall)
                heavy.append(again.get("heavy_modules_imported"))
                states = {v["state"] for v in again["tasks"].values()}
                if states != {"Cached"}:
                    raise SystemExit(f"cached rerun was not all Cached: {again['tasks']}")
                wall, _ = _run(tmp / f"flow{i}", sets, _env(tmp / "eph-home", None), tmp / "s3.json")
                ephemeral.append(wall)
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    med = statistics.median
    out.update(
        {
            "repeats": args.repeats,
            "plain_s": round(med(plain), 2),
            "flow_s": round(med(flow), 2),
            "flow_overhead_pct": round(100 * (med(flow) / med(plain) - 1), 1),
            "plain_train_s": round(med(plain_train), 2),
            "flow_train_s": round(med(flow_train), 2),
            "plain_outside_training_s": round(med(plain) - med(plain_train), 2),
            "flow_outside_training_s": round(med(flow) - med(flow_train), 2),
            "cached_rerun_s": round(med(cached), 2),
            "cached_fraction_pct": round(100 * med(cached) / med(flow), 2),
            "cached_rerun_heavy_imports": heavy[-1],
            "ephemeral_cached_rerun_s": round(med(ephemeral), 2),
            "ephemeral_server_start_adds_s": round(med(ephemeral) - med(cached), 2),
            "goals": {"flow_overhead_pct": "<= 5", "cached_fraction_pct": "<= 1"},
        }
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
