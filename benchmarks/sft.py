"""Instruction tuning of a real decoder (SmolLM2-135M-Instruct, bundled) on CPU, through the whole flow.

1. AG News as instructions ("Which topic is this article about? Answer with one of: World, Sports, Business,
   Sci/Tech"), --ag-rows training rows, LoRA on all linear layers: exact match on a seeded test sample of the base
   model (zero-shot) and of the fine-tuned model, beside the encoder classifier (bundled MiniLM, the classification
   flow with its defaults) trained on the same rows and scored on the same test rows.
2. ../shared/data/alpaca_demo (10 % held out as test): response perplexity on the test split of the base and of the
   fine-tuned model, and the forgetting check (perplexity on data/reference/general_text.txt before and after).

Prints one JSON line (the figures, CPU seconds per epoch, tokens/s) and writes nothing into the repository: the
framed data and the workspace live in a temporary folder (or --workspace). A fixed learning rate keeps the run
within about an hour on 2 cores (stated in the output); `auto` would add a search.

    .venv/bin/python benchmarks/sft.py [--ag-rows 1000] [--ag-test 200] [--alpaca-rows 400] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QUESTION = "Which topic is this article about? Answer with one of: World, Sports, Business, Sci/Tech"


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def frame_ag_news(out: Path, train_rows: int, test_rows: int, seed: int = 42) -> dict[str, Path]:
    """Seeded samples of AG News as prompt/response JSONL (for SmolLM2) and as text/label CSV (for MiniLM)."""
    rng = random.Random(seed)
    train, test = _rows(DATA / "ag_news" / "train.csv"), _rows(DATA / "ag_news" / "test.csv")
    train, test = rng.sample(train, train_rows), rng.sample(test, test_rows)
    files = {}
    for name, rows in (("train", train), ("test", test)):
        files[f"sft_{name}"] = out / f"ag_{name}.jsonl"
        with open(files[f"sft_{name}"], "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"prompt": f"{QUESTION}\n\n{r['text']}", "response": r["label"]}) + "\n")
        files[f"clf_{name}"] = out / f"ag_{name}.csv"
        with open(files[f"clf_{name}"], "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return files


def run_flow(config: str, sets: list[str], summary: Path) -> dict:
    cmd = [sys.executable, "-m", "tasks.cli", "run", config, "--summary-json", str(summary)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    out = json.loads(summary.read_text()) if summary.exists() else {}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    if res.returncode != 0:
        out["error"] = (res.stderr or res.stdout)[-800:]
    return out


def training_facts(summary: dict) -> dict:
    """CPU seconds per epoch and tokens/s of the training run (from its folder's facts)."""
    folders = summary.get("folders") or {}
    run = Path(folders.get("run", ""))
    if not (run / "training_summary.json").exists():
        return {}
    ts = json.loads((run / "training_summary.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    tokens = json.loads((Path(plan["tokenized_path"]) / "tokenized.json").read_text()).get("tokens", {})
    per_epoch = ts["seconds"] / max(1, ts["epochs_run"])
    train_tokens = tokens.get("train", {}).get("tokens", 0)
    return {
        "epochs_run": ts["epochs_run"],
        "seconds_per_epoch": round(per_epoch, 1),
        "tokens_per_epoch": train_tokens,
        "tokens_per_second": round(train_tokens / max(per_epoch, 1e-9), 1),
        "learning_rate": ts.get("learning_rate"),
    }


def sft_figures(summary: dict) -> dict:
    m, base = summary.get("metrics") or {}, (summary.get("baselines") or {}).get("base") or {}
    keys = ("exact_match", "rouge_l", "response_loss", "perplexity", "reference_perplexity")
    return {
        "fine_tuned": {k: m.get(k) for k in keys if k in m},
        "base": {k: base.get(k) for k in keys if k in base},
        "forgetting_ratio": m.get("forgetting_ratio"),
        "promoted": summary.get("promoted"),
        "training": training_facts(summary),
        "wall_s": summary.get("wall_s"),
        "error": summary.get("error"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ag-rows", type=int, default=1000)
    ap.add_argument("--ag-test", type=int, default=200)
    ap.add_argument("--alpaca-rows", type=int, default=400, help="rows of alpaca_demo used (10 %% held out as test)")
    ap.add_argument("--rate", type=float, default=1e-3, help="fixed LoRA learning rate (no search: time budget)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workspace", default=None)
    a = ap.parse_args()
    if not (DATA / "ag_news").exists() or not (DATA / "alpaca_demo").exists():
        print(json.dumps({"benchmark": "sft", "skipped": f"{DATA} lacks ag_news or alpaca_demo"}))
        return
    tmp = Path(a.workspace) if a.workspace else Path(tempfile.mkdtemp(prefix="bench-sft-"))
    tmp.mkdir(parents=True, exist_ok=True)
    files = frame_ag_news(tmp, a.ag_rows, a.ag_test)
    ws = f"workspace={tmp / 'ws'}"
    common = [
        ws,
        "model.name_or_path=bundled:smollm2-135m-instruct",
        "data.task=sft",
        "method.kind=lora",
        "method.target_modules=all-linear",
        "method.lora_r=16",
        "method.lora_alpha=32",
        f"training.learning_rate={a.rate}",
        f"training.epochs={a.epochs}",
        "training.effective_batch_size=8",
    ]
    ag = run_flow(
        "configs/sft-demo.yaml",
        common
        + [
            f"data.source.train={files['sft_train']}",
            f"data.source.test={files['sft_test']}",
            "data.max_rows=null",
            "data.max_length=320",  # at 192, 6 of the 1,200 sampled rows left no room for the answer (an error)
            f"evaluation.generation_samples={a.ag_test}",
            "evaluation.max_new_tokens=8",
            "evaluation.primary_metric=exact_match",
            "registry.name=bench-sft-ag",
        ],
        tmp / "ag.json",
    )
    encoder = run_flow(
        "configs/demo.yaml",
        [
            ws,
            f"data.source.train={files['clf_train']}",
            f"data.source.test={files['clf_test']}",
            "registry.name=bench-clf-ag",
        ],
        tmp / "encoder.json",
    )
    alpaca_rows = [json.loads(ln) for ln in (DATA / "alpaca_demo" / "train.jsonl").read_text().splitlines()]
    alpaca = tmp / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in random.Random(42).sample(alpaca_rows, a.alpaca_rows)))
    alp = run_flow(
        "configs/sft-demo.yaml",
        common
        + [
            f"data.source={alpaca}",
            "data.max_rows=null",
            "data.max_length=384",
            "data.split.test=0.1",
            "data.split.validation=0.1",
            "evaluation.generation_samples=0",
            "evaluation.primary_metric=response_loss",
            "registry.name=bench-sft-alpaca",
        ],
        tmp / "alpaca.json",
    )
    print(
        json.dumps(
            {
                "benchmark": "sft",
                "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized)",
                "device": "cpu",
                "method": "lora all-linear r16",
                "learning_rate": a.rate,
                "epochs": a.epochs,
                "ag_news": {
                    "train_rows": a.ag_rows,
                    "test_rows": a.ag_test,
                    **sft_figures(ag),
                    "encoder_minilm": {
                        "accuracy": (encoder.get("metrics") or {}).get("accuracy"),
                        "f1_macro": (encoder.get("metrics") or {}).get("f1_macro"),
                        "wall_s": encoder.get("wall_s"),
                        "error": encoder.get("error"),
                    },
                },
                "alpaca_demo": {"rows": a.alpaca_rows, **sft_figures(alp)},
                "workspace": str(tmp),
            }
        )
    )


if __name__ == "__main__":
    main()
