"""Load and score models: batched logits, scores, output comparison, loaders for trained runs and
exports, and `predict_file` (CSV in, CSV out) behind `finetune predict`.

The export stage verifies merges with the same loaders and scorer. torch and transformers are imported
inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.files import read_json


class PredictError(ValueError):
    """A problem the user can fix (missing model, version, column or file)."""


@dataclass
class PredictResult:
    path: str
    rows: int
    model: str
    version: int
    seconds: float


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def batched_logits(
    model,
    tokenizer,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int = 512,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "scoring",
) -> np.ndarray:
    """Raw model outputs (N x num_labels, float32) in input order; texts are batched by length (less padding)."""
    import torch

    texts = [str(t) for t in texts]
    pairs = None if text_pairs is None else [str(t) for t in text_pairs]
    order = np.argsort([len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)], kind="stable")
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=len(starts), desc=desc, unit="batch")
    model.eval()
    with torch.inference_mode():
        for s in starts:
            idx = order[s:s + batch_size]
            args = ([texts[i] for i in idx],) + (([pairs[i] for i in idx],) if pairs else ())
            enc = tokenizer(*args, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            logits = model(**enc).logits
            out.append(logits.float().cpu().numpy())
    n_out = int(getattr(model.config, "num_labels", 1))
    flat = np.concatenate(out) if out else np.zeros((0, n_out), dtype=np.float32)
    result = np.empty_like(flat)
    result[order] = flat
    return result


def scores_from_logits(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Probabilities for classification (softmax / sigmoid), the values themselves for regression."""
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification":
        return 1.0 / (1.0 + np.exp(-logits))
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predicted_classes(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Class ids (single-label), 0/1 per label (multi-label at logit 0 = probability 0.5), values (regression)."""
    logits = np.asarray(logits)
    if problem_type == "multi_label_classification":
        return (logits > 0).astype(np.int8)
    if problem_type == "regression":
        return logits[:, 0]
    return logits.argmax(axis=1)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, problem_type: str, tolerance: float) -> dict:
    """Max |logit| difference, share of identical predictions, and predictions that changed although the
    reference was not a near-tie (margin > 2 x tolerance): those mean the merge is wrong."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if not (np.isfinite(ref).all() and np.isfinite(cand).all()):
        return {"rows": len(ref), "finite": False, "max_abs_logit_diff": float("inf"), "identical_prediction_share": 0.0,
                "changed_beyond_ties": len(ref)}
    diff = np.abs(ref - cand)
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
    if problem_type == "regression":
        same = diff[:, 0] <= max(tolerance, 0.01 * float(np.ptp(ref[:, 0])) if len(ref) else 0.0)
        beyond = int((~same).sum())
    else:
        same_rows = predicted_classes(ref, problem_type) == predicted_classes(cand, problem_type)
        same = same_rows.all(axis=1) if same_rows.ndim == 2 else same_rows
        if problem_type == "multi_label_classification":
            margin = np.abs(ref).min(axis=1) * 2  # distance of the closest label to the 0.5 cut, both ways
        else:
            top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
            margin = top2[:, 1] - top2[:, 0]
        beyond = int(((~same) & (margin > 2 * tolerance)).sum())
    return {
        "rows": int(len(ref)),
        "finite": True,
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "max_rel_logit_diff": float(diff.max() / scale) if diff.size else 0.0,
        "identical_prediction_share": float(same.mean()) if len(same) else 1.0,
        "changed_beyond_ties": beyond,
    }


def load_exported_model(model_dir: str | Path, trust_remote_code: bool = False, device: str | None = None):
    """An exported HF folder (merged weights + tokenizer) as (model, tokenizer), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.heads import register

    register()  # the mean-pooling head (tasks/heads.py) loads without remote code in this process
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or default_device()).eval()
    return model, tok


# ---- loading trained runs (the export stage verifies merges with these) ---------------------------

def _run_tokenizer(run: Path, info: dict):
    from tasks.tokenize import load_tokenizer

    src = run / "model" if (run / "model" / "tokenizer_config.json").exists() else info["base_model"]
    return load_tokenizer(str(src), bool(info.get("trust_remote_code", False)))


def load_adapter_model(run_dir: str | Path, quantized: bool = False):
    """(PeftModel on the base, tokenizer): the run's adapter + saved head, in eval mode."""
    from peft import PeftModel

    from tasks.export import read_run
    from tasks.modeling import load_run_base

    run = Path(run_dir)
    info = read_run(run)
    tok = _run_tokenizer(run, info)
    base = load_run_base(info, tok.pad_token_id, "cpu", quantized=quantized)
    if not quantized:
        base.to(default_device())
    model = PeftModel.from_pretrained(base, str(run / "model"), is_trainable=False)
    return model.eval(), tok


def load_reference_model(run_dir: str | Path):
    """The model as trained and evaluated (tasks.modeling.load_trained_model on the default device, in eval
    mode; for a qlora run its loader already switches off the CPU bf16 repacking of the 4-bit layers)."""
    from tasks.modeling import load_trained_model

    return load_trained_model(str(run_dir), default_device())


def _read_table(path: Path):
    import pandas as pd

    if not path.is_file():
        raise PredictError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise PredictError(f"input file {path}: unsupported type {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")


def _column(df, name: str, path: Path, option: str) -> list[str]:
    if name not in df.columns:
        raise PredictError(
            f"input file {path} has no column {name!r} (columns: {', '.join(map(str, df.columns))}); "
            f"fix: rename the column or pass {option} NAME"
        )
    return df[name].astype(str).tolist()


def predict_frame(
    df,
    model_dir: str | Path,
    lineage: dict[str, Any],
    thresholds: dict[str, float] | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    source: Path = Path("<input>"),
):
    """The input frame plus `prediction`, `score` (and `score_<label>` per label for multi-label)."""
    data = lineage.get("data", {})
    text_col = text_column or data.get("text_column") or "text"
    pair_col = text_pair_column or data.get("text_pair_column")
    texts = _column(df, text_col, source, "--text-column")
    pairs = _column(df, pair_col, source, "--text-pair-column") if pair_col else None
    model, tok = load_exported_model(model_dir, bool(lineage.get("trust_remote_code", False)))
    problem_type = model.config.problem_type or "single_label_classification"
    logits = batched_logits(model, tok, texts, pairs, int(lineage.get("max_length") or 512), batch_size, progress, "predict")
    scores = scores_from_logits(logits, problem_type)
    out = df.copy()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    if problem_type == "regression":
        out["prediction"] = scores[:, 0]
        out["score"] = scores[:, 0]
    elif problem_type == "multi_label_classification":
        names = [id2label[i] for i in range(scores.shape[1])]
        per_label = (thresholds or {}).get("per_label", thresholds or {})  # evaluation's tuned thresholds
        cut = np.array([float(per_label.get(n, 0.5)) for n in names])
        hits = scores >= cut
        delim = data.get("label_delimiter") or "|"
        out["prediction"] = [delim.join(n for n, h in zip(names, row) if h) for row in hits]
        out["score"] = scores.max(axis=1)
        for j, n in enumerate(names):
            out[f"score_{n}"] = scores[:, j]
    else:
        pred = scores.argmax(axis=1)
        out["prediction"] = [id2label[int(i)] for i in pred]
        out["score"] = scores[np.arange(len(pred)), pred]
    return out


def predict_file(
    workspace: str | Path,
    model_ref: str,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 64,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    progress: bool = True,
) -> PredictResult:
    """Score a file with a registered model `NAME[@VERSION]` (default: the production version); write a CSV."""
    from tasks.registry import resolve_ref

    t0 = time.perf_counter()
    name, version, vdir = resolve_ref(workspace, model_ref)
    source = Path(input_path)
    df = _read_table(source)
    lineage = read_json(vdir / "lineage.json")
    metrics = read_json(vdir / "metrics.json") if (vdir / "metrics.json").exists() else {}
    out = predict_frame(
        df, vdir / "model", lineage, metrics.get("thresholds"), text_column, text_pair_column, batch_size, progress, source
    )
    dest = Path(output_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    out.to_csv(tmp, index=False)
    tmp.replace(dest)
    return PredictResult(str(dest), len(out), name, version, round(time.perf_counter() - t0, 3))
