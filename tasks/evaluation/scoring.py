"""Scoring texts with a loaded model: probabilities for evaluation, raw logits for the merge and ONNX checks, and
the comparison of two models' outputs that every merge verification uses.

torch is imported inside the functions; importing this module stays cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np


def predict_scores(
    model, tokenizer, texts, text_pairs=None, task: str = "single_label", batch_size: int = 64, max_length: int = 512
) -> np.ndarray:
    """Probabilities (n, K) for classification (softmax / sigmoid), values (n,) for regression.

    Texts are tokenized once, batched by token length (longest first: less padding, and an out-of-memory
    shows in the first batch) and the results put back in input order.
    """
    import torch

    texts = [str(t) for t in texts]
    n = len(texts)
    num_labels = int(getattr(model.config, "num_labels", 1))
    if n == 0:
        return np.zeros(0) if task == "regression" else np.zeros((0, num_labels))
    args = (texts, [str(t) for t in text_pairs]) if text_pairs is not None else (texts,)
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = set(inspect.signature(base.forward).parameters)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and k in accepted]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = pad_id  # decoder heads find the last real token through it
    left = getattr(tokenizer, "padding_side", "right") == "left"
    lengths = np.array([len(x) for x in enc["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    device = next(model.parameters()).device
    out = np.zeros((n, num_labels), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            width = int(lengths[idx].max())
            batch = {}
            for k in keys:
                fill = pad_id if k == "input_ids" else 0
                rows = [list(enc[k][i]) for i in idx]
                rows = [[fill] * (width - len(r)) + r if left else r + [fill] * (width - len(r)) for r in rows]
                batch[k] = torch.tensor(rows, dtype=torch.long, device=device)
            if "attention_mask" in accepted and "attention_mask" not in batch:
                real = [[1] * int(lengths[i]) for i in idx]
                batch["attention_mask"] = torch.tensor(
                    [[0] * (width - len(r)) + r if left else r + [0] * (width - len(r)) for r in real], device=device
                )
            logits = model(**batch).logits.float()
            if task == "single_label":
                probs = torch.softmax(logits, dim=-1)
            elif task == "multi_label":
                probs = torch.sigmoid(logits)
            else:
                probs = logits
            out[idx] = probs.cpu().numpy().reshape(len(idx), -1)
    return out[:, 0] if task == "regression" else out


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
            idx = order[s : s + batch_size]
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
        return {
            "rows": len(ref),
            "finite": False,
            "max_abs_logit_diff": float("inf"),
            "identical_prediction_share": 0.0,
            "changed_beyond_ties": len(ref),
        }
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
