"""Training throughput and peak memory: this project's loop (full, LoRA, QLoRA) against a plain
`transformers.Trainer` with its default collator (pad to the longest in a random batch, no length
grouping), same model (bundled all-MiniLM-L6-v2), same tokenized SMS-spam training rows, same epochs,
batch size and max_length. Each run is its own child process; its wall time and peak RSS are measured
from outside with os.wait4. Prints ONE JSON line.

    .venv/bin/python benchmarks/train_throughput.py [--rows 800] [--epochs 1] [--max-length 128] [--repeats 1]

samples/s = training samples / seconds of the training loop (ours: loop incl. checkpoint writes, without
the validation pass; Trainer: its own train_runtime). Other engineers' jobs on a shared machine move
the absolute numbers; the runs are interleaved so they share the conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "sms_spam" / "train.csv"


def _child_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        XDG_CACHE_HOME=str(tmp / "cache"),
    )
    return env


def _spawn(cmd: list[str], env: dict, log: Path) -> dict:
    """Run a child; wall seconds and its own peak RSS (os.wait4 rusage of that child only)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def trainer_child(spec: dict) -> None:
    """The baseline: plain Trainer, default collator, no length grouping; prints a JSON line."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from tasks.model.base import load_tokenizer

    torch.manual_seed(spec["seed"])
    train = datasets.load_from_disk(spec["train"])
    tok = load_tokenizer(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=spec["num_labels"])
    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        num_train_epochs=spec["epochs"],
        learning_rate=2e-5,
        weight_decay=0.01,
        warmup_steps=0.1,
        seed=spec["seed"],
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok)
    out = trainer.train()
    print(
        "RESULT "
        + json.dumps(
            {
                "samples_per_second": round(len(train) * spec["epochs"] / out.metrics["train_runtime"], 3),
                "train_seconds": round(out.metrics["train_runtime"], 3),
                "train_loss": round(out.training_loss, 4),
            }
        )
    )


def _pad_share(lengths, batches) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return round(1 - real / padded, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows", type=int, default=800, help="approximate training rows (SMS spam train, seeded subsample)"
    )
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--child-trainer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_trainer:
        trainer_child(json.loads(a.child_trainer))
        return
    if not DATA.exists():
        print(json.dumps({"benchmark": "train_throughput", "skipped": f"{DATA} is absent"}))
        return

    import numpy as np

    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.files import read_json
    from tasks.model.base import resolve_model
    from tasks.training.batching import plan_epoch
    from tasks.training.launch import prepare_run
    from tasks.training.planner import plan_run
    from tasks.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    env = _child_env(tmp)
    os.environ.update({k: env[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "XDG_CACHE_HOME")})
    base = [
        f"workspace={tmp / 'ws'}",
        f"data.source={DATA}",
        f"data.max_rows={int(a.rows / 0.8)}",
        f"data.max_length={a.max_length}",
        f"training.epochs={a.epochs}",
        f"training.effective_batch_size={a.batch}",
        "training.learning_rate=default",
    ]
    cfg0 = load_config(None, base)
    prepared = prepare_dataset(cfg0)
    model_dir = resolve_model(cfg0.model, cfg0.workspace)
    tokenized = tokenize_dataset(prepared.path, model_dir, cfg0)
    train_dir = Path(tokenized.path) / "train"
    import datasets

    lengths = np.asarray(datasets.load_from_disk(str(train_dir))["length"])
    n_train = len(lengths)

    results: dict[str, list[dict]] = {}
    for rep in range(a.repeats):
        order = ["trainer"] + a.methods.split(",")
        if rep % 2:
            order.reverse()
        for name in order:
            log = tmp / f"{name}-{rep}.log"
            if name == "trainer":
                spec = {
                    "train": str(train_dir),
                    "model": model_dir,
                    "num_labels": len(prepared.labels),
                    "batch": a.batch,
                    "epochs": a.epochs,
                    "seed": 42,
                    "out": str(tmp / "trainer-out"),
                }
                m = _spawn(
                    [sys.executable, str(Path(__file__).resolve()), "--child-trainer", json.dumps(spec)], env, log
                )
                line = next(ln for ln in log.read_text().splitlines() if ln.startswith("RESULT "))
                m.update(json.loads(line[7:]))
                key = "trainer_full"
            else:
                cfg = load_config(None, base + [f"method.kind={name}"])
                run = prepare_run(plan_run(cfg, prepared.path, tokenized.path), Workspace.at(cfg.workspace))
                for stale in ("model", "checkpoints"):
                    shutil.rmtree(run / stale, ignore_errors=True)
                for stale in ("training_summary.json", "metrics.jsonl"):
                    (run / stale).unlink(missing_ok=True)
                m = _spawn([sys.executable, "-m", "tasks.training.worker", str(run)], env, log)
                s = read_json(run / "training_summary.json")
                m.update(
                    samples_per_second=s["samples_per_second"],
                    train_seconds=s["train_seconds_this_attempt"],
                    learning_rate=s["learning_rate"],
                    val=next(
                        json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln
                    ),
                )
                m["val"] = {k: round(v, 4) for k, v in m["val"].items() if k in ("val_loss", "accuracy", "f1_macro")}
                key = f"ours_{name}"
            results.setdefault(key, []).append(m)

    def median(key: str, field: str) -> float:
        return float(np.median([r[field] for r in results[key]]))

    summary = {
        k: {f: (median(k, f) if isinstance(v[0][f], (int, float)) else v[0][f]) for f in v[0]}
        for k, v in results.items()
    }
    for k, v in results.items():  # medians above; every repeat's figures here
        summary[k]["samples_per_second_runs"] = [r["samples_per_second"] for r in v]
        summary[k]["peak_rss_mb_runs"] = [r["peak_rss_mb"] for r in v]
    rng = np.random.default_rng(42)
    random_batches = [b for b in np.array_split(rng.permutation(n_train), max(1, -(-n_train // a.batch)))]
    grouped = plan_epoch(lengths, a.batch, 1, 42, 0, True)
    out = {
        "benchmark": "train_throughput",
        "model": "all-MiniLM-L6-v2 (bundled)",
        "data": "sms_spam train.csv",
        "train_rows": n_train,
        "epochs": a.epochs,
        "max_length": a.max_length,
        "batch_size": a.batch,
        "repeats": a.repeats,
        "device": "cpu",
        "torch_threads": _threads(),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "pad_share": {
            "trainer_random_batches": _pad_share(lengths, random_batches),
            "ours_grouped": _pad_share(lengths, grouped),
        },
        "results": summary,
    }
    if "ours_full" in summary:
        out["speedup_full_vs_trainer"] = round(
            summary["ours_full"]["samples_per_second"] / summary["trainer_full"]["samples_per_second"], 3
        )
        out["rss_ratio_full_vs_trainer"] = round(
            summary["ours_full"]["peak_rss_mb"] / summary["trainer_full"]["peak_rss_mb"], 3
        )
        out["meets_target"] = out["speedup_full_vs_trainer"] >= 1.3 and out["rss_ratio_full_vs_trainer"] <= 1.1
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
