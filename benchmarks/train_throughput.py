"""Training throughput and peak memory: this project's loop (full, LoRA, QLoRA) against `transformers.Trainer`
configured three ways: its defaults (random batches padded to their longest), with length grouping
(`train_sampling_strategy="group_by_length"`, what a user who cares about speed sets), and grouped with `bf16=True`
where the CPU has native bf16 (avx512_bf16 / AMX; elsewhere bf16 is emulated and slower, so that peer is skipped and
the output says why). Same model (bundled all-MiniLM-L6-v2), same tokenized SMS-spam training rows, same epochs,
batch size and max_length; the LoRA peer is the Trainer over a peft model with our targets, rank and head. Each run
is its own child process; its wall time and peak RSS are measured from outside with os.wait4. Prints ONE JSON line;
the headline ratios are against the best-configured Trainer (the highest median samples/s of the variants).

    .venv/bin/python benchmarks/train_throughput.py [--rows 800] [--epochs 1] [--max-length 128] [--repeats 3]

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
    """A Trainer peer (spec: variant default | grouped | grouped_bf16, method full | lora); prints a JSON line."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from tasks.model.base import load_tokenizer

    torch.manual_seed(spec["seed"])
    train = datasets.load_from_disk(spec["train"])
    tok = load_tokenizer(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=spec["num_labels"])
    lr = 2e-5
    if spec["method"] == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=spec["targets"]
        )
        model, lr = get_peft_model(model, lora), 2e-4
    variant = spec["variant"]
    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        num_train_epochs=spec["epochs"],
        learning_rate=lr,
        weight_decay=0.01,
        warmup_steps=0.1,
        seed=spec["seed"],
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
        train_sampling_strategy="group_by_length" if variant != "default" else "random",
        bf16=variant == "grouped_bf16",
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


def _native_bf16() -> bool:
    from tasks.model.base import hardware_signature

    hw = hardware_signature()
    return bool(hw["avx512_bf16"] or hw["amx_bf16"])


def _targets(config, meta_model, head_module_names, resolve_targets) -> list[str]:
    """Our LoRA targets for the base (method.target_modules=auto), for the Trainer's LoRA peer."""
    meta = meta_model(config)
    return resolve_targets(meta, head_module_names(meta), "auto")


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows", type=int, default=800, help="approximate training rows (SMS spam train, seeded subsample)"
    )
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 runs: auto = native CPUs only")
    ap.add_argument("--child-trainer", help=argparse.SUPPRESS)
    return ap.parse_args()


def _runs(methods: list[str], bf16: bool) -> list[tuple[str, str, str]]:
    """(key, kind, method or variant) of every run of one repeat: Trainer peers for full and LoRA, then ours."""
    out = []
    for m in (m for m in methods if m in ("full", "lora")):
        for variant in ("default", "grouped") + (("grouped_bf16",) if bf16 else ()):
            out.append((f"trainer_{m}_{variant}", "trainer", f"{m}:{variant}"))
    for m in methods:
        out.append((f"ours_{m}", "ours", f"{m}:fp32"))
        if bf16 and m in ("full", "lora"):
            out.append((f"ours_{m}_bf16", "ours", f"{m}:bf16"))
    return out


def _run_trainer(spec: dict, what: str, env: dict, log: Path) -> dict:
    method, variant = what.split(":")
    spec = dict(spec, method=method, variant=variant)
    m = _spawn([sys.executable, str(Path(__file__).resolve()), "--child-trainer", json.dumps(spec)], env, log)
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("RESULT "))
    return m | json.loads(line[7:])


def _run_ours(base: list[str], what: str, prepared, tokenized, env: dict, log: Path) -> dict:
    from tasks.config_loading import load_config
    from tasks.files import read_json
    from tasks.training.launch import prepare_run
    from tasks.training.planner import plan_run
    from tasks.workspace import Workspace

    method, precision = what.split(":")
    cfg = load_config(None, base + [f"method.kind={method}", f"training.precision={precision}"])
    run = prepare_run(plan_run(cfg, prepared.path, tokenized.path), Workspace.at(cfg.workspace))
    for stale in ("model", "checkpoints"):
        shutil.rmtree(run / stale, ignore_errors=True)
    for stale in ("training_summary.json", "metrics.jsonl"):
        (run / stale).unlink(missing_ok=True)
    m = _spawn([sys.executable, "-m", "tasks.training.worker", str(run)], env, log)
    s = read_json(run / "training_summary.json")
    val = next(json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln)
    return m | {
        "samples_per_second": s["samples_per_second"],
        "train_seconds": s["train_seconds_this_attempt"],
        "learning_rate": s["learning_rate"],
        "val": {k: round(v, 4) for k, v in val.items() if k in ("val_loss", "accuracy", "f1_macro")},
    }


def _summarise(results: dict[str, list[dict]]) -> dict:
    import numpy as np

    summary = {}
    for k, v in results.items():  # medians; every repeat's figures beside them
        summary[k] = {
            f: (float(np.median([r[f] for r in v])) if isinstance(v[0][f], (int, float)) else v[0][f]) for f in v[0]
        }
        summary[k]["samples_per_second_runs"] = [r["samples_per_second"] for r in v]
        summary[k]["peak_rss_mb_runs"] = [r["peak_rss_mb"] for r in v]
    return summary


def _headlines(summary: dict) -> dict:
    """Per method: ours (fp32, and bf16 where run) against the best-configured Trainer and the default one."""
    out = {}
    for m in ("full", "lora"):
        peers = {k: v for k, v in summary.items() if k.startswith(f"trainer_{m}_")}
        ours = {k: v for k, v in summary.items() if k in (f"ours_{m}", f"ours_{m}_bf16")}
        if not peers or not ours:
            continue
        best = max(peers, key=lambda k: peers[k]["samples_per_second"])
        mine = max(ours, key=lambda k: ours[k]["samples_per_second"])
        speed = summary[mine]["samples_per_second"] / peers[best]["samples_per_second"]
        rss = summary[mine]["peak_rss_mb"] / peers[best]["peak_rss_mb"]
        out[m] = {
            "ours": mine,
            "best_trainer": best,
            "speedup_vs_best_trainer": round(speed, 3),
            "rss_ratio_vs_best_trainer": round(rss, 3),
            "speedup_vs_default_trainer": round(
                summary[mine]["samples_per_second"] / peers[f"trainer_{m}_default"]["samples_per_second"], 3
            ),
            "meets_target": speed >= 1.3 and rss <= 1.1,
        }
    return out


def main() -> None:
    a = _args()
    if a.child_trainer:
        trainer_child(json.loads(a.child_trainer))
        return
    if not DATA.exists():
        print(json.dumps({"benchmark": "train_throughput", "skipped": f"{DATA} is absent"}))
        return

    import datasets
    import numpy as np
    from transformers import AutoConfig

    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.model.base import resolve_model
    from tasks.model.build import head_module_names, meta_model, resolve_targets
    from tasks.training.batching import plan_epoch

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
    lengths = np.asarray(datasets.load_from_disk(str(train_dir))["length"])
    n_train = len(lengths)
    native = _native_bf16()
    bf16 = a.bf16 == "on" or (a.bf16 == "auto" and native)
    spec = {
        "train": str(train_dir),
        "model": model_dir,
        "num_labels": len(prepared.labels),
        "batch": a.batch,
        "epochs": a.epochs,
        "seed": 42,
        "out": str(tmp / "trainer-out"),
        "targets": _targets(AutoConfig.from_pretrained(model_dir), meta_model, head_module_names, resolve_targets),
    }

    results: dict[str, list[dict]] = {}
    runs = _runs(a.methods.split(","), bf16)
    for rep in range(a.repeats):
        for key, kind, what in reversed(runs) if rep % 2 else runs:
            log = tmp / f"{key}-{rep}.log"
            if kind == "trainer":
                m = _run_trainer(spec, what, env, log)
            else:
                m = _run_ours(base, what, prepared, tokenized, env, log)
            results.setdefault(key, []).append(m)

    summary = _summarise(results)
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
        "cpu_native_bf16": native,
        "bf16_runs": bf16 or "skipped: this CPU has no avx512_bf16/amx_bf16 (bf16 would be emulated, slower than fp32)",
        "torch_threads": _threads(),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "pad_share": {
            "trainer_random_batches": _pad_share(lengths, random_batches),
            "ours_grouped": _pad_share(lengths, grouped),
        },
        "headline": _headlines(summary),
        "results": summary,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
