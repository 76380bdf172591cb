"""Recipes that work out of the box: the default config (learning_rate auto = a short successive-halving
search, epochs up to the cap with early stopping on validation macro-F1, the model-aware head) against the
old fixed-rate defaults (2e-5 full / 2e-4 LoRA, 3 epochs, early stopping on val loss, the architecture's
pooler head) and TF-IDF + logistic regression trained on the same rows, scored on each dataset's test file
in macro-F1. Prints one JSON line per run, then a table.

    .venv/bin/python benchmarks/recipes.py [--datasets sst2,ag_news,sms_spam] [--methods full,lora]
        [--max-rows 4000] [--recipes auto,fixed] [--workspace DIR] [--jsonl FILE] [--table-from FILE]

Data (read in place from ../shared/data, never copied): SST-2 train.csv with its validation.csv as the test
file; AG News and SMS spam train.csv/test.csv. data.max_rows subsamples the train pool (seed 42); the
validation split comes out of those rows. search_s / search_cpu_s: wall and CPU seconds (children
included) that the learning-rate search adds before the real training.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
SOURCES = {
    "sst2": {"train": "sst2/train.csv", "test": "sst2/validation.csv"},
    "ag_news": {"train": "ag_news/train.csv", "test": "ag_news/test.csv"},
    "sms_spam": {"train": "sms_spam/train.csv", "test": "sms_spam/test.csv"},
}
FIXED = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "dora": 2e-4}


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


def config(workspace: Path, dataset: str, method: str, recipe: str, max_rows: int, extra: dict | None = None):
    from tasks.config import RunConfig

    raw = {
        "workspace": str(workspace),
        "data": {
            "source": {k: str(DATA / v) for k, v in SOURCES[dataset].items()},
            "task": "single_label",
            "max_rows": max_rows,
            "max_length": 128,
        },
        "method": {"kind": method},
        "registry": {"name": f"recipes-{dataset}"},
    }
    if recipe == "fixed":  # the old defaults: textbook rate, 3 epochs, early stopping on val loss, pooler head
        raw["training"] = {"learning_rate": FIXED[method], "epochs": 3, "early_stopping": {"metric": "loss"}}
        raw["model"] = {"head": "pooler"}
    for section, values in (extra or {}).items():
        raw.setdefault(section, {}).update(values)
    return RunConfig.model_validate(raw)


def run_one(workspace: Path, dataset: str, method: str, recipe: str, max_rows: int) -> dict:
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.evaluation.evaluate import evaluate_run
    from tasks.files import read_json
    from tasks.model.base import resolve_model
    from tasks.training.launch import train
    from tasks.training.planner import plan_run
    from tasks.training.search import search_learning_rate
    from tasks.workspace import Workspace

    cfg = config(workspace, dataset, method, recipe, max_rows)
    t0 = time.perf_counter()
    prepared = prepare_dataset(cfg)
    tokenized = tokenize_dataset(prepared.path, resolve_model(cfg.model, cfg.workspace), cfg)
    ws = Workspace.at(cfg.workspace)
    plan = plan_run(cfg, prepared.path, tokenized.path, ws)
    search, search_s, search_cpu = None, 0.0, 0.0
    if plan.learning_rate is None:
        c0, s0 = _cpu_children(), time.perf_counter()
        result = search_learning_rate(plan, ws)
        search_s, search_cpu = time.perf_counter() - s0, _cpu_children() - c0
        search = result.summary()
        plan = plan.with_rate(result.best_rate, "search")
    c0, s0 = _cpu_children(), time.perf_counter()
    trained = train(plan, ws, search_summary=search)
    train_s, train_cpu = time.perf_counter() - s0, _cpu_children() - c0
    ev = evaluate_run(cfg, trained.path)
    summary = read_json(Path(trained.path) / "training_summary.json")
    info = read_json(Path(trained.path) / "plan.json")
    manifest = read_json(Path(prepared.path) / "manifest.json")
    tfidf = (ev.baselines.get("tfidf") or {}).get("f1_macro")
    return {
        "bench": "recipes",
        "dataset": dataset,
        "method": method,
        "recipe": recipe,
        "max_rows": max_rows,
        "train_rows": manifest["splits"]["train"]["rows"],
        "validation_rows": manifest["splits"]["validation"]["rows"],
        "test_rows": manifest["splits"]["test"]["rows"],
        "head": info.get("head"),
        "learning_rate": summary["learning_rate"],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "stopped_early": summary["stopped_early"],
        "test_f1_macro": ev.metrics.get("f1_macro"),
        "test_accuracy": ev.metrics.get("accuracy"),
        "tfidf_f1_macro": tfidf,
        "beats_tfidf": (ev.metrics.get("f1_macro") or 0) > (tfidf or 0),
        "search_s": round(search_s, 1),
        "search_cpu_s": round(search_cpu, 1),
        "search_trials": [(t["rate"], t["steps"], t["score"]) for t in (search or {}).get("trials", [])],
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "reused": trained.reused,
    }


def table(rows: list[dict]) -> str:
    head = [
        "dataset",
        "method",
        "recipe",
        "head",
        "lr",
        "epochs run (best)",
        "test macro-F1",
        "TF-IDF macro-F1",
        "beats TF-IDF",
        "search s (CPU s)",
        "train s",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        search = f"{r['search_s']} ({r['search_cpu_s']})" if r["recipe"] == "auto" else "–"
        out.append(
            "| "
            + " | ".join(
                str(x)
                for x in [
                    r["dataset"],
                    r["method"],
                    r["recipe"],
                    r["head"],
                    f"{r['learning_rate']:g}",
                    f"{r['epochs_run']} ({r['best_epoch']})",
                    f"{r['test_f1_macro']:.4f}",
                    f"{r['tfidf_f1_macro']:.4f}",
                    "yes" if r["beats_tfidf"] else "**no**",
                    search,
                    r["train_s"],
                ]
            )
            + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="sst2,ag_news,sms_spam")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--recipes", default="auto,fixed")
    ap.add_argument("--max-rows", type=int, default=4000)
    ap.add_argument("--workspace", default=None, help="Reuse a workspace (prepared data, trials, runs are cached).")
    ap.add_argument("--jsonl", default=None, help="Also append each JSON line to this file.")
    ap.add_argument("--table-from", default=None, help="Only print the table of the JSON lines in this file.")
    args = ap.parse_args(argv)
    if args.table_from:
        print(table([json.loads(line) for line in Path(args.table_from).read_text().splitlines() if line.strip()]))
        return 0
    missing = [d for d in args.datasets.split(",") if not (DATA / SOURCES[d]["train"]).exists()]
    if missing:
        print(f"missing data under {DATA}: {missing}", file=sys.stderr)
        return 2
    workspace = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="recipes-"))
    rows = []
    for dataset in args.datasets.split(","):
        for method in args.methods.split(","):
            for recipe in args.recipes.split(","):
                row = run_one(workspace, dataset, method, recipe, args.max_rows)
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a", encoding="utf-8") as fh:
                        fh.write(line + "\n")
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
