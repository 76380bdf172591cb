"""Export stage: merge a trained adapter into its base (verified), write a self-contained HF folder
(+ the adapter alone, a model card, lineage, optional ONNX) at `<workspace>/exports/<key>/`.

The merge is its own idempotent step that checks before acting (litgpt merge_lora, peft
_check_merge_allowed): it refuses non-finite adapter weights, a base model that changed since
training, and a merged model whose outputs drift from the adapter model's. Nothing is written
unless every check passes (the folder is built in a temporary sibling and renamed).

Tolerance (export.merge_tolerance, default 1e-3 absolute on logits): merging replaces
W x + s B (A x) by (W + s B A) x, the same sums in another order. In float32 that reassociation costs
~1e-7 relative per matmul, ~1e-6 relative after a dozen layers (measured here: 1.5e-8..2e-6 absolute,
at most 4e-7 relative, on tiny BERT/Llama and MiniLM logits of size ~0.1..10), so 1e-3 leaves about three
orders of margin, while a wrong merge (a dropped adapter, a missed scaling factor, a wrong head) moves
logits by the size of the adapter's effect (measured 0.09..5.5 here). QLoRA: the adapter was trained
against the 4-bit weights, so it is merged into those weights dequantized to float32 (merging into the
original float32 weights instead shifts every logit by the quantization error: on GoEmotions only 63 % of
rows kept their 28 predicted labels). The exactness check is made against the unmerged adapter on that
dequantized base, and agreement with the 4-bit model itself (which may compute in bf16) is reported and held
to export.qlora_min_agreement.
"""

from __future__ import annotations

import gc
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import ModelConfig, RunConfig
from tasks.files import atomic_dir, read_json, sha256_file, sha256_json, sha256_tree, write_json

EXPORT_VERSION = "1"
ADAPTER_METHODS = ("lora", "qlora", "dora")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(ValueError):
    """The run or evaluation folder cannot be exported as it is; the message says why and the fix."""


class MergeError(ExportError):
    """The merge was refused or failed its verification; nothing was written."""


@dataclass
class ExportResult:
    path: str
    merge_verification: dict
    onnx: bool
    key: str = ""
    method: str = ""
    reused: bool = False
    seconds: float = 0.0
    onnx_parity: dict | None = field(default=None)


# ---- facts from the run and evaluation folders ----------------------------------------------------

def read_run(run_dir: str | Path) -> dict:
    """run_info.json of a finished run, after checking the folder holds a model."""
    run = Path(run_dir)
    if not (run / "run_info.json").is_file():
        raise ExportError(f"{run} has no run_info.json: not a finished training run; fix: train first")
    info = read_json(run / "run_info.json")
    model = run / "model"
    if info.get("method") in ADAPTER_METHODS:
        missing = [f for f in ADAPTER_FILES if not (model / f).is_file()]
    else:
        missing = [] if (model / "config.json").is_file() and list(model.glob("*.safetensors")) else ["config.json + *.safetensors"]
    if missing:
        raise ExportError(f"{model} lacks {', '.join(missing)} (method {info.get('method')}); the run did not finish")
    return info


def read_eval(eval_dir: str | Path) -> dict:
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        raise ExportError(f"{eval_dir} has no metrics.json: evaluate the run first")
    m = read_json(path)
    if m.get("primary_metric") not in m.get("metrics", {}):
        raise ExportError(f"{path}: primary_metric {m.get('primary_metric')!r} is not among its metrics")
    return m


def heldout_fingerprint(prepared_dir: str | Path) -> str:
    """Hash of the test split's rows (id, texts, label): two models are comparable only on equal values."""
    from tasks.data import load_split

    df = load_split(prepared_dir, "test")
    cols = [c for c in ("id", "text", "text_pair", "label") if c in df.columns]
    rows = [[str(v.tolist() if hasattr(v, "tolist") else v) for v in r] for r in df[cols].itertuples(index=False)]
    return sha256_json({"columns": cols, "rows": rows})[:20]


def export_key(cfg: RunConfig, run_dir: str | Path, eval_dir: str | Path) -> str:
    """Content key: the trained weights, the run facts, the evaluation, the export settings."""
    run = Path(run_dir)
    return sha256_json({
        "model": sha256_tree(run / "model"),
        "run_info": sha256_file(run / "run_info.json"),
        "metrics": sha256_file(Path(eval_dir) / "metrics.json"),
        "export": cfg.export.model_dump(mode="json"),
        "name": cfg.registry.name,
        "version": EXPORT_VERSION,
    })[:20]


def check_finite(path: str | Path) -> None:
    """Refuse weights holding NaN or inf (a diverged run): name the tensors."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():
            t = fh.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise MergeError(
            f"{path} holds NaN/inf values in {', '.join(bad[:5])}{more}; refusing to merge or export a diverged "
            "model; fix: retrain (lower the learning rate, check the data) and export that run"
        )


# ---- verification ---------------------------------------------------------------------------------

def _verification_texts(info: dict, cfg: RunConfig) -> tuple[list[str], list[str] | None]:
    from tasks.data import load_split

    df = load_split(info["prepared_path"], "test")
    n = cfg.export.verify_max_rows
    if n and len(df) > n:  # a seeded sample in file order: a test file sorted by label gives no one-class head
        df = df.sample(n=n, random_state=cfg.data.split.seed).sort_index()
    pairs = df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None
    return df["text"].astype(str).tolist(), pairs


def _check_base(info: dict) -> None:
    from tasks.base_model import model_fingerprint

    expected = info.get("base_model_fingerprint")
    if not expected:
        return
    found = model_fingerprint(ModelConfig(name_or_path=info["base_model"], revision=info.get("revision")))
    if found != expected:
        raise MergeError(
            f"base model {info['base_model']} has fingerprint {found}, but the adapter was trained on {expected}; "
            "merging it into another base gives a different model; fix: restore that base or retrain"
        )


def merge_adapter(run_dir: str | Path, info: dict, texts: list[str], pairs: list[str] | None, cfg: RunConfig,
                  max_length: int):
    """Merge the run's adapter into a full-precision base and verify it: (merged model, tokenizer, figures, logits).

    Checks before acting: finite adapter weights, the base the adapter was trained on, no layer merged twice.
    The reference is the model as trained (load_trained_model); for QLoRA that is the 4-bit model, which is
    never merged into: the base is reloaded in float32, its 4-bit layers replaced by their dequantized
    weights (what the adapter was trained against), and the adapter put on it (our loader).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks.modeling import dequantized_weights, load_weights
    from tasks.predict import batched_logits, compare_outputs, load_adapter_model, load_reference_model

    tol, bs = cfg.export.merge_tolerance, cfg.evaluation.batch_size
    run = Path(run_dir)
    check_finite(run / "model" / "adapter_model.safetensors")
    _check_base(info)
    problem_type = info.get("problem_type") or "single_label_classification"
    quantized = bool(info.get("quantization")) or info.get("method") == "qlora"
    figures: dict[str, Any] = {"method": info["method"], "merged": True, "tolerance": tol, "rows": len(texts),
                               "quantized_reference": quantized}
    t0 = time.perf_counter()
    model, tok = load_reference_model(run)
    if quantized:
        q_logits = batched_logits(model, tok, texts, pairs, max_length, bs)
        base_weights = dequantized_weights(model)
        del model
        gc.collect()
        model, tok = load_adapter_model(run, quantized=False)
        try:
            figures["dequantized_layers"] = load_weights(model, base_weights)
        except ValueError as exc:
            raise MergeError(f"{run}: the 4-bit weights do not fit the full-precision base ({exc}); nothing was written") from exc
        del base_weights
    if any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise MergeError(f"{run}: adapter layers are already merged; refusing to merge twice")
    adapter_logits = batched_logits(model, tok, texts, pairs, max_length, bs)
    with model.disable_adapter():
        base_logits = batched_logits(model, tok, texts, pairs, max_length, bs)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # peft's safe_merge found NaNs in the merged weights
        raise MergeError(f"merging {run / 'model'} produced non-finite weights ({exc}); nothing was written") from exc
    bad = [n for n, p in merged.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise MergeError(f"merged weights {', '.join(bad[:5])} are not finite; nothing was written")
    merged_logits = batched_logits(merged, tok, texts, pairs, max_length, bs)
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    figures["merged_vs_adapter"] = compare_outputs(adapter_logits, merged_logits, problem_type, tol)
    figures["adapter_effect_max_logit_diff"] = float(np.abs(adapter_logits - base_logits).max()) if len(texts) else 0.0
    exact = figures["merged_vs_adapter"]
    problems = []
    if not exact["finite"]:
        problems.append("non-finite logits")
    elif exact["max_abs_logit_diff"] > tol:
        problems.append(f"max |logit diff| {exact['max_abs_logit_diff']:.3g} > export.merge_tolerance {tol:g}")
    if exact.get("changed_beyond_ties"):
        problems.append(f"{exact['changed_beyond_ties']} prediction(s) changed that were not near-ties")
    if quantized:
        agree = compare_outputs(q_logits, merged_logits, problem_type, tol)
        figures["merged_vs_quantized"] = agree
        floor = cfg.export.qlora_min_agreement
        figures["min_agreement"] = floor
        if agree["identical_prediction_share"] < floor:
            problems.append(f"only {agree['identical_prediction_share']:.1%} of test predictions agree with the 4-bit "
                            f"model (export.qlora_min_agreement {floor:.0%})")
    figures["passed"] = not problems
    if problems:
        raise MergeError(f"merge verification failed for {run}: {'; '.join(problems)}; nothing was written. "
                         f"Figures: {figures}")
    return merged, tok, figures, merged_logits


# ---- ONNX -----------------------------------------------------------------------------------------

def export_onnx(model, tokenizer, out_dir: Path, texts: list[str], pairs: list[str] | None, max_length: int,
                tolerance: float, reference: np.ndarray | None = None) -> dict:
    """torch.onnx.export (TorchScript exporter: no onnxscript needed) + an onnxruntime parity check."""
    import onnxruntime as ort
    import torch

    class _Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            return self.inner(**kw).logits

    model = model.to("cpu").eval()
    sample = tokenizer(texts[:2] or ["a b"], *( [pairs[:2]] if pairs else []), truncation=True,
                       max_length=max_length, padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), tuple(sample[k] for k in names), str(path), dynamo=False,
                          input_names=names, output_names=["logits"], opset_version=17,
                          dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names}, "logits": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from tasks.predict import batched_logits

    n = min(len(texts), 256)
    check_texts, check_pairs = texts[:n], (pairs[:n] if pairs else None)
    torch_logits = reference[:n] if reference is not None else batched_logits(model, tokenizer, check_texts, check_pairs, max_length)
    got = []
    for s in range(0, n, 32):  # other batch sizes and lengths than the traced sample
        args = (check_texts[s:s + 32],) + ((check_pairs[s:s + 32],) if check_pairs else ())
        enc = tokenizer(*args, truncation=True, max_length=max_length, padding=True, return_tensors="np")
        got.append(session.run(None, {k: enc[k].astype(np.int64) for k in names})[0])
    onnx_logits = np.concatenate(got) if got else np.zeros_like(torch_logits)
    diff = float(np.abs(onnx_logits - torch_logits).max()) if n else 0.0
    parity = {"file": "onnx/model.onnx", "rows": n, "max_abs_logit_diff": diff, "tolerance": tolerance,
              "opset": 17, "seconds": round(time.perf_counter() - t0, 3), "passed": diff <= tolerance}
    if not parity["passed"]:
        raise ExportError(f"ONNX parity check failed: max |logit diff| {diff:.3g} > {tolerance:g} on {n} test rows")
    return parity


# ---- the stage ------------------------------------------------------------------------------------

def export_run(cfg: RunConfig, run_dir: str, eval_dir: str) -> ExportResult:
    """Merge (verified) and export a trained run; reuse `<workspace>/exports/<key>/` when it exists."""
    from tasks.model_card import render_model_card
    from tasks.predict import batched_logits, compare_outputs, load_exported_model
    from tasks.registry import code_version, package_versions

    t0 = time.perf_counter()
    run, evald = Path(run_dir), Path(eval_dir)
    info = read_run(run)
    metrics = read_eval(evald)
    key = export_key(cfg, run, evald)
    final = cfg.workspace_path() / "exports" / key
    if (final / "lineage.json").is_file():
        lin = read_json(final / "lineage.json")
        return ExportResult(str(final), lin["merge_verification"], bool(lin.get("onnx")), key, lin["method"], True,
                            round(time.perf_counter() - t0, 3), lin.get("onnx"))
    resolved = read_json(run / "resolved_config.json") if (run / "resolved_config.json").exists() else {}
    max_length = int((resolved.get("data") or {}).get("max_length") or cfg.data.max_length)
    texts, pairs = _verification_texts(info, cfg)
    problem_type = info.get("problem_type") or "single_label_classification"
    method = info["method"]
    timings: dict[str, float] = {}
    with atomic_dir(final) as tmp:
        t = time.perf_counter()
        if method in ADAPTER_METHODS:
            model, tok, figures, logits = merge_adapter(run, info, texts, pairs, cfg, max_length)
            (tmp / "adapter").mkdir()
            for f in ADAPTER_FILES:
                shutil.copy2(run / "model" / f, tmp / "adapter" / f)
        else:
            for f in (run / "model").glob("*.safetensors"):
                check_finite(f)
            model, tok = load_exported_model(run / "model", bool(info.get("trust_remote_code", False)))
            logits = batched_logits(model, tok, texts, pairs, max_length, cfg.evaluation.batch_size)
            figures = {"method": method, "merged": False, "reason": "full fine-tuning: no adapter to merge",
                       "tolerance": cfg.export.merge_tolerance, "rows": len(texts), "passed": True}
        timings["merge_and_verify_s"] = round(time.perf_counter() - t, 3)
        labels = list(info.get("labels") or [])
        if len(labels) == model.config.num_labels:
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {lab: i for i, lab in enumerate(labels)}
        model.config.problem_type = problem_type
        model.to("cpu").save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        t = time.perf_counter()
        reloaded, rtok = load_exported_model(tmp, bool(info.get("trust_remote_code", False)))
        figures["saved_vs_in_memory"] = compare_outputs(
            logits, batched_logits(reloaded, rtok, texts, pairs, max_length, cfg.evaluation.batch_size),
            problem_type, cfg.export.merge_tolerance)
        if figures["saved_vs_in_memory"]["max_abs_logit_diff"] > cfg.export.merge_tolerance:
            raise MergeError(f"the saved export does not reproduce the in-memory model: {figures['saved_vs_in_memory']}")
        timings["reload_check_s"] = round(time.perf_counter() - t, 3)
        onnx = None
        if cfg.export.onnx:
            onnx = export_onnx(reloaded, rtok, tmp / "onnx", texts, pairs, max_length,
                               max(cfg.export.merge_tolerance, 1e-4), logits)
            timings["onnx_s"] = onnx["seconds"]
        del model, reloaded
        gc.collect()
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        summary = read_json(run / "training_summary.json") if (run / "training_summary.json").exists() else {}
        data_cfg = resolved.get("data") or cfg.data.model_dump(mode="json")
        lineage = {
            "export_key": key, "export_version": EXPORT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "name": cfg.registry.name, "method": method, "task": info.get("task"), "problem_type": problem_type,
            "labels": labels, "run": {"path": str(run.resolve()), "key": run.name},
            "evaluation": {"path": str(evald.resolve()), "key": evald.name},
            "base_model": info.get("base_model"),
            "base_model_name": (resolved.get("model") or {}).get("name_or_path", info.get("base_model")),
            "base_model_fingerprint": info.get("base_model_fingerprint"),
            "dataset_fingerprint": info.get("dataset_fingerprint"),
            "test_set_fingerprint": heldout_fingerprint(info["prepared_path"]),
            "prepared_path": info.get("prepared_path"), "tokenized_path": info.get("tokenized_path"),
            "config_hash": sha256_json({k: v for k, v in resolved.items() if k != "workspace"})[:16] if resolved else None,
            "data": {k: data_cfg.get(k) for k in ("text_column", "text_pair_column", "label_column", "label_delimiter")},
            "max_length": max_length, "trust_remote_code": bool(info.get("trust_remote_code", False)),
            "quantization": info.get("quantization"), "head": info.get("head", "pooler"),
            "primary_metric": metrics["primary_metric"], "primary_value": metrics["metrics"][metrics["primary_metric"]],
            "code_version": code_version(), "packages": package_versions(),
            "training": {**{k: summary.get(k) for k in ("best_epoch", "best_metric_name", "best_metric", "epochs_run",
                                                        "global_step", "seconds", "learning_rate", "effective_batch_size")},
                         "resolved": resolved.get("resolved_training")},
            "timings": timings, "merge_verification": figures, "onnx": onnx,
        }
        write_json(tmp / "lineage.json", lineage)
        (tmp / "README.md").write_text(render_model_card(lineage, metrics, resolved), encoding="utf-8")
    return ExportResult(str(final), figures, onnx is not None, key, method, False,
                        round(time.perf_counter() - t0, 3), onnx)


def export_task():
    """The Prefect task wrapper (created lazily: importing this module must not import prefect)."""
    from prefect import task

    return task(name="export", description="Merge the adapter (verified) and export the model.")(export_run)

