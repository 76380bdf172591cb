"""The model card (README.md) of an export: YAML front matter (model-index metrics, base model, method,
data fingerprint) and the facts a reader needs: training settings, test metrics against baselines,
merge verification figures, ONNX parity, lineage and how to load it. Pure: dicts in, text out."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tasks.config import BUNDLED_MODEL
from tasks.model.heads import LOADER_NOTE
from tasks.plan import RunPlan
from tasks.reporting.tables import search_rows

HUB_NAMES = {BUNDLED_MODEL: "sentence-transformers/all-MiniLM-L6-v2"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def base_model(lineage: dict) -> dict:
    """The lineage's base model facts (export.py: name, source, hub_id, fingerprint), with the Hub id of the
    bundled model (HUB_NAMES). A lineage written before [2-2] has only base_model_name: a path stays a folder name."""
    facts = lineage.get("base_model")
    if not isinstance(facts, dict):
        name = str(lineage.get("base_model_name") or facts or "")
        local = name.startswith((".", "/", "~")) or name.count("/") > 1
        facts = {"name": name.rstrip("/").rsplit("/", 1)[-1] if local else name, "hub_id": None if local else name}
    return {**facts, "hub_id": HUB_NAMES.get(facts.get("name")) or facts.get("hub_id")}


def front_matter(lineage: dict, metrics: dict) -> dict:
    """The card's YAML header; `base_model` only when it is a Hub id (a local folder's name would link nowhere)."""
    base = base_model(lineage)
    values = metrics.get("metrics", {})
    task_type = "text-classification"
    return {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        **({"base_model": base["hub_id"]} if base["hub_id"] else {}),
        "tags": ["text-classification", "fine-tuned", lineage["method"], lineage.get("task") or "single_label"],
        "finetune": {
            "base_model": base["name"],
            "method": lineage["method"],
            "dataset_fingerprint": lineage.get("dataset_fingerprint"),
            "test_set_fingerprint": lineage.get("test_set_fingerprint"),
            "base_model_fingerprint": lineage.get("base_model_fingerprint"),
            "config_hash": lineage.get("config_hash"),
            "code_version": lineage.get("code_version"),
        },
        "model-index": [
            {
                "name": lineage.get("name") or "model",
                "results": [
                    {
                        "task": {
                            "type": task_type,
                            "name": "Text Classification" if lineage.get("task") != "regression" else "Regression",
                        },
                        "dataset": {
                            "name": f"prepared dataset {lineage.get('dataset_fingerprint')}",
                            "type": str(lineage.get("dataset_fingerprint")),
                            "split": metrics.get("split", "test"),
                        },
                        "metrics": [
                            {"type": k, "name": k, "value": float(v)}
                            for k, v in values.items()
                            if isinstance(v, (int, float)) and v == v
                        ],
                    }
                ],
            }
        ],
    }


def _verification_section(v: dict, method: str) -> list[str]:
    out = ["## Merge verification", ""]
    if not v.get("merged"):
        out.append(f"No merge: {v.get('reason', 'full fine-tuning')}.")
    else:
        ex = v.get("merged_vs_adapter", {})
        out += [
            f"The {method} adapter was merged into the full-precision base (`merge_and_unload(safe_merge=True)`) "
            f"and checked on {v.get('rows')} test rows against the unmerged adapter model:",
            "",
            f"- max |logit difference|: **{_fmt(ex.get('max_abs_logit_diff'))}** (tolerance {_fmt(v.get('tolerance'))}; "
            f"relative {_fmt(ex.get('max_rel_logit_diff'))})",
            f"- identical predictions: **{_fmt(ex.get('identical_prediction_share'))}**",
            f"- effect of the adapter itself (max |logit difference| adapter vs base): {_fmt(v.get('adapter_effect_max_logit_diff'))}",
            "",
            "Why this tolerance: merging computes (W + sBA)x instead of Wx + sB(Ax), the same sums in another order; in "
            "float32 that costs ~1e-6 relative, far below the tolerance, while a wrong merge moves logits by the "
            "adapter's own effect.",
        ]
        q = v.get("merged_vs_quantized")
        if q:
            out += [
                "",
                "QLoRA: the adapter was trained on a 4-bit base; it is merged into those 4-bit weights dequantized to "
                "float32 (the weights it was trained against), so the export computes what the 4-bit adapter model "
                "computes, up to rounding:",
                "",
                f"- identical predictions vs the 4-bit adapter model: **{_fmt(q.get('identical_prediction_share'))}** "
                f"(required: >= {_fmt(v.get('min_agreement'))})",
                f"- max |logit difference| vs the 4-bit adapter model: **{_fmt(q.get('max_abs_logit_diff'))}**",
            ]
    s = v.get("saved_vs_in_memory")
    if s:
        out += ["", f"Saved and reloaded from this folder: max |logit difference| {_fmt(s.get('max_abs_logit_diff'))}."]
    return out


def _model_section(lineage: dict) -> list[str]:
    return [
        "## Model",
        "",
        _table(
            [
                ["method", lineage["method"]],
                ["base model", base_model(lineage)["hub_id"] or base_model(lineage)["name"]],
                ["base model fingerprint", lineage.get("base_model_fingerprint")],
                ["labels", ", ".join(map(str, lineage.get("labels") or [])) or "(regression)"],
                ["problem type", lineage.get("problem_type")],
                ["max length (tokens)", lineage.get("max_length")],
                ["dataset fingerprint", lineage.get("dataset_fingerprint")],
                ["test set fingerprint", lineage.get("test_set_fingerprint")],
                ["config hash", lineage.get("config_hash")],
                ["code version", lineage.get("code_version")],
                [
                    "quantization (training)",
                    json.dumps(lineage.get("quantization")) if lineage.get("quantization") else "none",
                ],
            ],
            ["fact", "value"],
        ),
        "",
    ]


def _training_section(lineage: dict, plan: RunPlan, search: dict | None) -> list[str]:
    tr = lineage.get("training") or {}
    settings = plan.method_settings
    lines = [
        "## Training",
        "",
        _table(
            [
                ["learning rate", f"{_fmt(plan.learning_rate)} ({plan.learning_rate_source})"],
                ["effective batch size", plan.effective_batch_size],
                ["micro batch x accumulation", f"{plan.micro_batch_size} x {plan.gradient_accumulation_steps}"],
                ["epochs run (max)", f"{_fmt(tr.get('epochs_run'))} ({_fmt(plan.epochs)})"],
                ["best epoch", tr.get("best_epoch")],
                [f"best validation {tr.get('best_metric_name') or 'metric'}", tr.get("best_metric")],
                [
                    "LoRA r / alpha / dropout",
                    "/".join(_fmt(settings.get(k)) for k in ("lora_r", "lora_alpha", "lora_dropout"))
                    if settings.get("lora_r") is not None
                    else "n/a",
                ],
                ["training seconds", tr.get("seconds")],
            ],
            ["setting", "value"],
        ),
        "",
    ]
    if search:
        rows = search_rows(search)
        lines += [
            "### Learning-rate search",
            "",
            f"`training.learning_rate: auto` tried {len(search.get('candidates') or [])} rates by successive halving "
            f"(rungs of {', '.join(map(str, search.get('rungs') or []))} optimizer steps), scored on the validation "
            f"split by {search.get('metric')}; the winner, **{_fmt(search.get('best_rate'))}**, trained this model. "
            f"The search took {_fmt(search.get('seconds'))} s.",
            "",
            _table(
                [
                    [
                        r["rung"],
                        r["learning_rate"],
                        r["steps"],
                        r[search["metric"]],
                        r["val_loss"],
                        "diverged" if r["diverged"] else ("winner" if r["winner"] else ""),
                    ]
                    for r in rows
                ],
                ["rung", "learning rate", "steps", f"validation {search.get('metric')}", "val loss", "note"],
            ),
            "",
        ]
    return lines


def _evaluation_section(metrics: dict) -> list[str]:
    primary = metrics.get("primary_metric")
    values = metrics.get("metrics", {})
    lines = [
        "## Evaluation (held-out test split)",
        "",
        f"Primary metric: **{primary} = {_fmt(values.get(primary))}**.",
        "",
    ]
    baselines = metrics.get("baselines") or {}
    names = [k for k, v in values.items() if isinstance(v, (int, float))]
    base_values = {b: (v or {}).get("metrics", v or {}) for b, v in baselines.items()}  # {"metrics": {...}} or flat
    rows = [[n, values[n]] + [base_values[b].get(n) for b in baselines] for n in names]
    lines += [_table(rows, ["metric", "this model"] + [f"{b} baseline" for b in baselines]), ""]
    comp = metrics.get("comparison") or {}
    if comp.get("beats_tfidf") is not None:
        lines += [f"Beats the TF-IDF baseline on {primary}: **{'yes' if comp['beats_tfidf'] else 'no'}**.", ""]
    return lines


def _use_section(lineage: dict) -> list[str]:
    lines: list[str] = []
    onnx = lineage.get("onnx")
    if onnx:
        lines += [
            "## ONNX",
            "",
            f"`{onnx['file']}` (opset {onnx['opset']}): max |logit difference| against torch "
            f"{_fmt(onnx['max_abs_logit_diff'])} on {onnx['rows']} test rows (tolerance {_fmt(onnx['tolerance'])}).",
            "",
        ]
    if lineage.get("head") == "mean":
        lines += [
            "## Use",
            "",
            LOADER_NOTE,
            "",
            "```python",
            "from transformers import pipeline",
            "",
            'clf = pipeline("text-classification", model="path/to/this/folder", trust_remote_code=True)',
            'clf("some text")',
            "```",
            "",
        ]
    else:
        lines += [
            "## Use",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            'clf = pipeline("text-classification", model="path/to/this/folder")',
            'clf("some text")',
            "```",
            "",
        ]
    if lineage.get("adapter"):
        lines += [
            "The adapter alone is in `adapter/` (one base can carry several adapters):",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification",
            "",
            (
                f"base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels={len(lineage.get('labels') or []) or 1})"
                if lineage.get("head") != "mean"
                else "base = AutoModelForSequenceClassification.from_config(...)  # the mean-pooling head: see tasks/model/heads.py"
            ),
            'model = PeftModel.from_pretrained(base, "path/to/this/folder/adapter")',
            "```",
            "",
        ]
    if lineage.get("task") == "regression":
        lines += [
            "Regression: the pipeline applies a sigmoid to single-output models; call the model directly "
            "(`model(**inputs).logits`) for the raw predicted value.",
            "",
        ]
    return lines


def _lineage_section(lineage: dict) -> list[str]:
    return [
        "## Lineage",
        "",
        f"Run `{lineage['run']['key']}`, evaluation `{lineage['evaluation']['key']}`, "
        f"export `{lineage['export_key']}`, created {lineage.get('created_at')}. Details: `lineage.json`.",
        "",
    ]


def render_model_card(lineage: dict, metrics: dict, plan: RunPlan, search: dict | None = None) -> str:
    """README.md for an export folder, from its lineage, the evaluation's metrics, the run plan and the search."""
    fm = yaml.safe_dump(front_matter(lineage, metrics), sort_keys=False, allow_unicode=True)
    lines = [
        f"---\n{fm}---",
        "",
        f"# {lineage.get('name') or 'model'}",
        "",
        f"A {lineage.get('task') or 'text classification'} model fine-tuned from "
        f"`{base_model(lineage)['hub_id'] or base_model(lineage)['name']}` with **{lineage['method']}**.",
        "",
    ]
    lines += _model_section(lineage) + _training_section(lineage, plan, search) + _evaluation_section(metrics)
    lines += _verification_section(lineage.get("merge_verification") or {}, lineage["method"]) + [""]
    lines += _use_section(lineage) + _lineage_section(lineage)
    return "\n".join(lines)
