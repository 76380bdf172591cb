"""Quality on real data: the flow with the bundled MiniLM on the datasets in ../shared/data, on CPU.

For each dataset and method (full, lora, qlora) one `finetune run` with the shipped defaults, side by side
with the majority and TF-IDF baselines scored on the same test file; SMS spam also with class weighting
off. Prints one JSON line per run and writes benchmarks/RESULTS.md (table, command, date).

    .venv/bin/python benchmarks/quality.py [--max-rows 2000] [--datasets sms_spam,sst2,ag_news,goemotions]
                                           [--methods full,lora,qlora] [--results benchmarks/RESULTS.md]

Budget: train is subsampled to --max-rows rows (seeded, stratified, data.max_rows); the test file is used
whole. Every figure in the table comes from the run it names.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

DATASETS = {
    "sms_spam": {
        "train": "sms_spam/train.csv",
        "test": "sms_spam/test.csv",
        "sets": ["data.task=single_label"],
        "report": ["f1:spam", "f1_macro"],
    },
    "sst2": {
        "train": "sst2/train.csv",
        "test": "sst2/validation.csv",
        "sets": ["data.task=single_label"],
        "report": ["accuracy", "f1_macro"],
    },
    "ag_news": {
        "train": "ag_news/train.csv",
        "test": "ag_news/test.csv",
        "sets": ["data.task=single_label"],
        "report": ["accuracy", "f1_macro"],
    },
    "goemotions": {
        "train": "goemotions/train.jsonl",
        "test": "goemotions/validation.jsonl",
        "sets": ["data.task=multi_label", "data.label_column=labels"],
        "report": ["f1_micro", "f1_macro"],
    },
}


def _value(metrics: dict, per_class: dict, name: str):
    if name.startswith("f1:"):
        return (per_class.get(name[3:]) or {}).get("f1")
    return metrics.get(name)


def run_one(dataset: str, method: str, weighting: str | None, max_rows: int, ws: Path, extra: list[str]) -> dict:
    spec = DATASETS[dataset]
    summary = ws / f"{dataset}-{method}-{weighting or 'default'}.json"
    sets = [
        f"workspace={ws}",
        f"data.source.train={DATA / spec['train']}",
        f"data.source.test={DATA / spec['test']}",
        f"data.max_rows={max_rows}",
        f"method.kind={method}",
        f"registry.name=q-{dataset}-{method}",
        *spec["sets"],
        *extra,
    ]
    if weighting:
        sets.append(f"data.class_weighting={weighting}")
    cmd = [sys.executable, "-m", "tasks.cli", "run", "configs/demo.yaml", "--summary-json", str(summary)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - t0
    row = {
        "benchmark": "quality",
        "dataset": dataset,
        "method": method,
        "class_weighting": weighting or "balanced",
        "max_rows": max_rows,
        "wall_s": round(wall, 1),
        "ok": res.returncode == 0,
    }
    if res.returncode != 0 or not summary.exists():
        row["error"] = (res.stderr or res.stdout)[-600:]
        return row
    s = json.loads(summary.read_text())
    ev = json.loads((Path(s["folders"]["evaluation"]) / "metrics.json").read_text())
    per_class = ev.get("per_class") or {}
    run = Path(s["folders"]["run"])
    ts = json.loads((run / "training_summary.json").read_text())
    rc = json.loads((run / "plan.json").read_text())
    row.update(
        {
            "learning_rate": rc.get("learning_rate"),
            "learning_rate_source": rc.get("learning_rate_source"),
            "epochs_run": ts.get("epochs_run"),
            "best_epoch": ts.get("best_epoch"),
            "train_s": ts.get("seconds"),
            "primary_metric": s.get("primary_metric"),
            "search_s": (s["tasks"].get("lr-search") or {}).get("seconds"),
            "train_task_s": (s["tasks"].get("train") or {}).get("seconds"),
        }
    )
    # a finished run folder with the same content key (e.g. from benchmarks/recipes.py) is reused, not retrained
    row["reused_training"] = bool(row["train_s"] and (row["train_task_s"] or 0) < 0.5 * row["train_s"])
    for name in spec["report"]:
        row[name] = _value(s["metrics"], per_class, name)
        for b, vals in (ev.get("baselines") or {}).items():
            row[f"{b}:{name}"] = _value(vals.get("metrics") or {}, vals.get("per_class") or {}, name)
    row["beats_tfidf"] = s.get("beats_tfidf")
    return row


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


def write_results(rows: list[dict], path: Path, command: str) -> None:
    lines = [
        f"## Quality on real data ({dt.date.today().isoformat()})",
        "",
        f"Command: `{command}`",
        "",
        "CPU only (2 cores), bundled all-MiniLM-L6-v2, the shipped defaults; train subsampled to `max_rows` "
        "(seeded, stratified), the dataset's own test file used whole (SST-2: its validation file).",
        "",
        "| dataset | method | weighting | metric | model | TF-IDF | majority | beats TF-IDF (primary) | lr | epochs | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(
                f"| {r['dataset']} | {r['method']} | {r['class_weighting']} | failed: {r.get('error', '')[:120]!r} ||||||||"
            )
            continue
        for name in DATASETS[r["dataset"]]["report"]:
            lines.append(
                f"| {r['dataset']} | {r['method']} | {r['class_weighting']} | {name} | {_fmt(r.get(name))} | "
                f"{_fmt(r.get('tfidf:' + name))} | {_fmt(r.get('majority:' + name))} | "
                f"{'yes' if r.get('beats_tfidf') else '**no**'} ({r.get('primary_metric')}) | {r.get('learning_rate'):g} | "
                f"{r.get('epochs_run')} | {_fmt(r.get('train_s'))}{' (reused)' if r.get('reused_training') else ''} | "
                f"{r['wall_s']} |"
            )
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    marker = "## Quality on real data"
    if marker in text:
        text = text[: text.index(marker)].rstrip() + "\n"
    path.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-rows", type=int, default=2000)
    ap.add_argument("--datasets", default="sms_spam,sst2,ag_news,goemotions")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument(
        "--workspace",
        default=None,
        help="Run in this workspace (kept) instead of a temporary one. Sharing the one benchmarks/recipes.py "
        "used reuses its finished stages (same content keys), e.g. its auto full/LoRA runs.",
    )
    args = ap.parse_args()
    if not DATA.exists():
        print(json.dumps({"benchmark": "quality", "skipped": f"{DATA} is absent"}))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        ws = Path(args.workspace).resolve() if args.workspace else Path(tmp)
        for dataset in args.datasets.split(","):
            for method in args.methods.split(","):
                variants = [None, "none"] if dataset == "sms_spam" and method == "full" else [None]
                for weighting in variants:
                    row = run_one(dataset, method, weighting, args.max_rows, ws, args.sets)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    write_results(rows, Path(args.results), "python benchmarks/quality.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
