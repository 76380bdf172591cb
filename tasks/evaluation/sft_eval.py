"""Evaluating an instruction-tuned model on the held-out test split, against the base model before fine-tuning,
scored the same way:

- response loss (mean cross-entropy per answer token, the training objective) and its perplexity;
- generation on a seeded, capped sample (evaluation.generation_samples) with greedy decoding: exact match after
  normalisation and ROUGE-L, through the project's `generation` evaluate module (rouge-score);
- the forgetting check: perplexity on a general-text reference (evaluation.forgetting_reference, shipped in data/)
  before and after; flagged when it rises past evaluation.forgetting_max_ratio (the seed's warning that a rate too
  high makes the model forget, as a number on every run).

The base model is the fine-tuned one with its adapter switched off (exactly the weights the adapter was trained on,
4-bit for QLoRA), or for full fine-tuning the base loaded from its folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from tasks.config import RunConfig
from tasks.data.sources import load_split
from tasks.evaluation.metrics import load_metric
from tasks.plan import RunPlan

SHORT_ANSWER_TOKENS = 32  # median answer length up to which exact match is the default primary metric


def response_loss(model, rows, batch_size: int, device: str) -> float:
    """Mean cross-entropy per answer token over tokenized rows (tasks/training/batching.py TokenRows)."""
    import torch

    from tasks.data.sft_rows import causal_lm_loss

    loss_fn, total = causal_lm_loss, 0.0
    order = np.argsort(-rows.lengths, kind="stable").tolist()
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            batch, labels = rows.collate(order[i : i + batch_size], device)
            total += float(loss_fn(model(**batch).logits, labels))
    return total / rows.total_weight


def text_perplexity(model, tokenizer, path: Path, max_length: int, device: str) -> float:
    """Perplexity of a plain text file, in windows of max_length tokens (every token predicted once)."""
    import torch

    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, max(1, len(ids) - 1), max_length):
            window = torch.tensor([ids[start : start + max_length]], device=device)
            if window.shape[1] < 2:
                break
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(total / max(1, count))


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers to conversations (each without its last, assistant, message)."""
    import torch

    from tasks.data.sft_tokens import template_of

    template, _ = template_of(tokenizer)
    prompts = [
        tokenizer.apply_chat_template(c, chat_template=template, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                )
                enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]


def _sample(test, n: int, seed: int):
    if n and len(test) > n:
        test = test.sample(n=n, random_state=seed).sort_index()
    return test if n else test.iloc[:0]


def score_model(model, tok, rows, sample, reference: Path | None, cfg: RunConfig, plan: RunPlan, device: str) -> dict:
    """Response loss, perplexity, generation metrics on the sample, reference perplexity; plus the answers."""
    t0 = time.perf_counter()
    loss = response_loss(model, rows, cfg.evaluation.batch_size, device)
    out = {"metrics": {"response_loss": loss, "perplexity": math.exp(min(loss, 50.0))}, "answers": []}
    if len(sample):
        convs = [json.loads(m)[:-1] for m in sample["messages"]]
        answers = generate(model, tok, convs, cfg.evaluation.max_new_tokens)
        scores = load_metric("generation").compute(predictions=answers, references=sample["response"].tolist())
        out["metrics"].update(exact_match=scores["exact_match"], rouge_l=scores["rouge_l"])
        out["answers"], out["per_example"] = answers, scores["per_example"]
    if reference is not None:
        out["metrics"]["reference_perplexity"] = text_perplexity(model, tok, reference, plan.max_length, device)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def primary_of(cfg: RunConfig, test_rows) -> str:
    """evaluation.primary_metric, or exact match for short answers (median up to 32 tokens), response loss otherwise."""
    if cfg.evaluation.primary_metric:
        return cfg.evaluation.primary_metric
    lengths = [int(x) for x in test_rows.targets]
    short = lengths and statistics.median(lengths) <= SHORT_ANSWER_TOKENS
    return "exact_match" if short and cfg.evaluation.generation_samples else "response_loss"


def reference_path(cfg: RunConfig) -> Path | None:
    ref = cfg.evaluation.forgetting_reference
    if not ref:
        return None
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluation.forgetting_reference: {path} does not exist; fix: point it at a plain "
            "text file, or set it to null to skip the forgetting check"
        )
    return path


@contextlib.contextmanager
def base_model(model, plan: RunPlan, tok, device: str):
    """The model before fine-tuning: the adapter switched off, or (full fine-tuning) the base from its folder."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    from tasks.model.loading import load_run_base

    yield load_run_base(plan, tok.pad_token_id, device, quantized=False).eval()


def evaluate_models(cfg: RunConfig, run: Path, plan: RunPlan) -> dict:
    """Scores of the fine-tuned and the base model on the same rows and sample."""
    from tasks.data.sft_rows import TokenRows
    from tasks.model.loading import default_device, load_trained_model

    device = default_device()
    model, tok = load_trained_model(run, device)
    rows = TokenRows(str(Path(plan.tokenized_path) / "test"), tok.pad_token_id)
    test = load_split(plan.prepared_path, "test")
    sample = _sample(test, cfg.evaluation.generation_samples, cfg.data.split.seed)
    reference = reference_path(cfg)
    tuned = score_model(model, tok, rows, sample, reference, cfg, plan, device)
    with base_model(model, plan, tok, device) as base:
        before = score_model(base, tok, rows, sample, reference, cfg, plan, device)
    return {"tuned": tuned, "base": before, "sample": sample, "primary": primary_of(cfg, rows), "rows": len(test)}


def _forgetting(tuned: dict, base: dict, max_ratio: float) -> dict | None:
    after, before = tuned["metrics"].get("reference_perplexity"), base["metrics"].get("reference_perplexity")
    if after is None or before is None:
        return None
    ratio = after / before
    return {"before": before, "after": after, "ratio": ratio, "max_ratio": max_ratio, "flagged": ratio > max_ratio}


def samples_table(scored: dict) -> list[dict]:
    """Prompt, reference, the base model's and the fine-tuned model's answers, side by side."""
    sample, tuned, base = scored["sample"], scored["tuned"], scored["base"]
    rows = []
    for i, (messages, ref) in enumerate(zip(sample["messages"], sample["response"], strict=True)):
        prompt = json.loads(messages)[-2]["content"]
        rows.append(
            {
                "prompt": prompt,
                "reference": ref,
                "base": base["answers"][i],
                "fine_tuned": tuned["answers"][i],
                "base_exact": base["per_example"][i]["exact_match"],
                "fine_tuned_exact": tuned["per_example"][i]["exact_match"],
            }
        )
    return rows


def sft_document(cfg: RunConfig, scored: dict) -> dict:
    """metrics.json's content for instruction tuning: the model's metrics, the base model as the baseline."""
    from tasks.evaluation.records import compare

    primary, tuned, base = scored["primary"], scored["tuned"], scored["base"]
    metrics, baselines = (
        dict(tuned["metrics"]),
        {
            "base": {
                "metrics": base["metrics"],
                "settings": {"what": "the base model before fine-tuning, scored the same way"},
                "seconds": base["seconds"],
            }
        },
    )
    forgetting = _forgetting(tuned, base, cfg.evaluation.forgetting_max_ratio)
    if forgetting:
        metrics["forgetting_ratio"] = forgetting["ratio"]
    comparison = compare(primary, metrics.get(primary), baselines)
    warnings = []
    if comparison["baselines"]["base"]["model_beats"] is False:
        warnings.append(
            f"WARNING: the fine-tuned model does not beat the base model on {primary}: "
            f"{metrics.get(primary)} vs {base['metrics'].get(primary)}"
        )
    if forgetting and forgetting["flagged"]:
        warnings.append(
            f"WARNING: forgetting: perplexity on the general-text reference rose {forgetting['ratio']:.2f}x "
            f"({forgetting['before']:.2f} -> {forgetting['after']:.2f}; evaluation.forgetting_max_ratio "
            f"{forgetting['max_ratio']:g}); a lower learning rate or fewer epochs keep more of the base model"
        )
    return {
        "task": "sft",
        "split": "test",
        "rows": scored["rows"],
        "primary_metric": primary,
        "metrics": metrics,
        "baselines": baselines,
        "comparison": comparison,
        "forgetting": forgetting,
        "warnings": warnings,
        "generation": {
            "samples": len(scored["sample"]),
            "max_new_tokens": cfg.evaluation.max_new_tokens,
            "decoding": "greedy",
            "seed": cfg.data.split.seed,
        },
        "prediction_seconds": tuned["seconds"],
        "texts_per_second": round(scored["rows"] / max(tuned["seconds"], 1e-9), 2),
    }


def sft_report(doc: dict, samples: list[dict], images: dict[str, str]) -> str:
    """report.md for instruction tuning: the comparison with the base model, forgetting, sample answers."""
    from tasks.evaluation.report import _delta, _fmt, _table

    base = doc["baselines"]["base"]["metrics"]
    lines = [f"# Evaluation `{doc['key']}` (instruction tuning)", ""] + [w for w in doc["warnings"]] + [""]
    lines += [
        f"- primary metric: **{doc['primary_metric']} = {_fmt(doc['metrics'].get(doc['primary_metric']))}**",
        f"- test rows: {doc['rows']}; generation on {doc['generation']['samples']} (greedy, at most "
        f"{doc['generation']['max_new_tokens']} new tokens)",
        "",
        "## Metrics (test): fine-tuned vs base",
        "",
    ]
    rows = [
        [k, _fmt(v), _fmt(base.get(k)), _delta(None if v is None or base.get(k) is None else v - base[k])]
        for k, v in doc["metrics"].items()
    ]
    lines.append(_table(["metric", "fine-tuned", "base", "delta"], rows))
    if doc.get("forgetting"):
        f = doc["forgetting"]
        lines += [
            "",
            "## Forgetting check",
            "",
            f"General-text perplexity {_fmt(f['before'])} before, {_fmt(f['after'])} "
            f"after fine-tuning: {f['ratio']:.3f}x (flagged above {f['max_ratio']:g}x): "
            f"**{'FLAGGED' if f['flagged'] else 'ok'}**.",
        ]
    if samples:
        lines += ["", "## Sample answers", ""]
        lines.append(
            _table(
                ["prompt", "reference", "base", "fine-tuned"],
                [
                    [_cell(s["prompt"]), _cell(s["reference"]), _cell(s["base"]), _cell(s["fine_tuned"])]
                    for s in samples[:10]
                ],
            )
        )
    if "loss" in images:
        lines += ["", "## Training curve", "", f"![loss curve]({images['loss']})"]
    return "\n".join(lines) + "\n"


def _cell(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def write_sft_evaluation(final: Path, cfg: RunConfig, run: Path, plan: RunPlan, common: dict, t0: float) -> None:
    """Score, then write metrics.json, samples.json, report.md (+ loss_curve.png) into `final` atomically."""
    import pandas as pd

    from tasks.evaluation.records import clean
    from tasks.files import atomic_dir, write_json
    from tasks.reporting.plots import loss_curve_png

    scored = evaluate_models(cfg, run, plan)
    doc = sft_document(cfg, scored) | common
    samples = samples_table(scored) if len(scored["sample"]) else []
    with atomic_dir(final) as tmp:
        images = {}
        if (run / "metrics.jsonl").is_file() and loss_curve_png(run / "metrics.jsonl", tmp / "loss_curve.png"):
            images["loss"] = "loss_curve.png"
        pd.DataFrame(samples).to_parquet(tmp / "predictions.parquet", index=False)
        write_json(tmp / "samples.json", samples)
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        doc = clean(doc)
        write_json(tmp / "metrics.json", doc)
        (tmp / "report.md").write_text(sft_report(doc, samples, images), encoding="utf-8")
