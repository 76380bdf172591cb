"""What a merge and an export are verified on: a seeded sample of test rows and a way to score a model on them.

- classification: the logits of each sampled test text (tasks/evaluation/scoring.py batched_logits), compared with
  compare_outputs (max |logit difference|, identical predictions, changes that were not near-ties);
- instruction tuning: at every answer token of the sampled conversations, the logit of the reference token, the
  top-two logits and the argmax (the whole vocabulary's logits would be tens of MB per row), compared the same way;
  plus greedy answers to a few prompts, which must come out identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.config import RunConfig
from tasks.data.sources import load_split
from tasks.evaluation.scoring import batched_logits, compare_outputs
from tasks.plan import RunPlan

LM_MAX_ROWS = 24  # answer tokens of 24 conversations: thousands of positions, a few MB per model
GREEDY_PROMPTS = 4


@dataclass
class Probe:
    rows: int
    logits: Callable[[Any, Any], np.ndarray]
    compare: Callable[[np.ndarray, np.ndarray, float], dict]
    texts: list[str] = field(default_factory=list)  # classification: what ONNX parity is checked on
    pairs: list[str] | None = None
    answers: Callable[[Any, Any], list[str]] | None = None  # instruction tuning: greedy answers to a few prompts


def _sample(plan: RunPlan, cfg: RunConfig, cap: int | None):
    df = load_split(plan.prepared_path, "test")
    if cap and len(df) > cap:  # a seeded sample in file order: a test file sorted by label gives no one-class head
        df = df.sample(n=cap, random_state=cfg.data.split.seed).sort_index()
    return df


def classification_probe(plan: RunPlan, cfg: RunConfig) -> Probe:
    df = _sample(plan, cfg, cfg.export.verify_max_rows)
    texts = df["text"].astype(str).tolist()
    pairs = df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None

    def logits(model, tok):
        return batched_logits(model, tok, texts, pairs, plan.max_length, cfg.evaluation.batch_size)

    def compare(ref, cand, tol):
        return compare_outputs(ref, cand, plan.problem_type, tol)

    return Probe(len(texts), logits, compare, texts, pairs)


def compare_lm(ref: np.ndarray, cand: np.ndarray, tol: float) -> dict:
    """Two models at the same answer positions: columns (reference-token logit, top-1, top-2, argmax id)."""
    if not (np.isfinite(ref[:, :3]).all() and np.isfinite(cand[:, :3]).all()):
        return {
            "rows": len(ref),
            "finite": False,
            "max_abs_logit_diff": float("inf"),
            "identical_prediction_share": 0.0,
            "changed_beyond_ties": len(ref),
        }
    diff = np.abs(ref[:, :3] - cand[:, :3])
    same = ref[:, 3] == cand[:, 3]
    margin = ref[:, 1] - ref[:, 2]
    scale = max(float(np.abs(ref[:, :3]).max()) if len(ref) else 0.0, 1e-12)
    return {
        "rows": int(len(ref)),
        "finite": True,
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "max_rel_logit_diff": float(diff.max() / scale) if diff.size else 0.0,
        "identical_prediction_share": float(same.mean()) if len(same) else 1.0,
        "changed_beyond_ties": int(((~same) & (margin > 2 * tol)).sum()),
    }


def lm_probe(plan: RunPlan, cfg: RunConfig) -> Probe:
    from tasks.data.sft_tokens import IGNORE, encode, template_of

    df = _sample(plan, cfg, min(cfg.export.verify_max_rows or LM_MAX_ROWS, LM_MAX_ROWS))
    conversations = [json.loads(m) for m in df["messages"]]

    def logits(model, tok):
        import torch

        template, _ = template_of(tok)
        out = []
        with torch.inference_mode():
            for messages in conversations:
                e = encode(tok, messages, plan.max_length, template)
                ids = torch.tensor([e.input_ids], device=next(model.parameters()).device)
                lg = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                targets = torch.tensor(e.labels[1:], device=lg.device)
                at = targets != IGNORE
                lg, gold = lg[at], targets[at]
                top = lg.topk(2, dim=-1)
                out.append(
                    torch.stack(
                        [
                            lg.gather(1, gold[:, None])[:, 0],
                            top.values[:, 0],
                            top.values[:, 1],
                            top.indices[:, 0].float(),
                        ],
                        dim=1,
                    )
                    .cpu()
                    .numpy()
                )
        return np.concatenate(out) if out else np.zeros((0, 4))

    def answers(model, tok):
        from tasks.evaluation.sft_eval import generate

        return generate(model, tok, [m[:-1] for m in conversations[:GREEDY_PROMPTS]], cfg.evaluation.max_new_tokens)

    return Probe(len(conversations), logits, compare_lm, answers=answers)


def probe_for(plan: RunPlan, cfg: RunConfig) -> Probe:
    return lm_probe(plan, cfg) if plan.task == "sft" else classification_probe(plan, cfg)
