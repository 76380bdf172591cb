"""ONNX export of an exported model, with an onnxruntime parity check against torch on test rows."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from tasks.evaluation.scoring import batched_logits
from tasks.release.merge import ExportError


def export_onnx(
    model,
    tokenizer,
    out_dir: Path,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    tolerance: float,
    reference: np.ndarray | None = None,
) -> dict:
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
    sample = tokenizer(
        texts[:2] or ["a b"],
        *([pairs[:2]] if pairs else []),
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(model),
            tuple(sample[k] for k in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names}, "logits": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = min(len(texts), 256)
    check_texts, check_pairs = texts[:n], (pairs[:n] if pairs else None)
    torch_logits = (
        reference[:n]
        if reference is not None
        else batched_logits(model, tokenizer, check_texts, check_pairs, max_length)
    )
    got = []
    for s in range(0, n, 32):  # other batch sizes and lengths than the traced sample
        args = (check_texts[s : s + 32],) + ((check_pairs[s : s + 32],) if check_pairs else ())
        enc = tokenizer(*args, truncation=True, max_length=max_length, padding=True, return_tensors="np")
        got.append(session.run(None, {k: enc[k].astype(np.int64) for k in names})[0])
    onnx_logits = np.concatenate(got) if got else np.zeros_like(torch_logits)
    diff = float(np.abs(onnx_logits - torch_logits).max()) if n else 0.0
    parity = {
        "file": "onnx/model.onnx",
        "rows": n,
        "max_abs_logit_diff": diff,
        "tolerance": tolerance,
        "opset": 17,
        "seconds": round(time.perf_counter() - t0, 3),
        "passed": diff <= tolerance,
    }
    if not parity["passed"]:
        raise ExportError(f"ONNX parity check failed: max |logit diff| {diff:.3g} > {tolerance:g} on {n} test rows")
    return parity
