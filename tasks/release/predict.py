"""`finetune predict`: score a file (CSV in, CSV out) with a registered model `NAME[@VERSION]`.

The pieces (reading the input, a classifier's columns, an instruction-tuned model's answers, the atomic write) are
shared with tasks/release/multi_adapter.py, which scores one file with several adapter versions on one base.
torch and transformers are imported inside functions (through the loaders), so importing this module stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluation.scoring import batched_logits, scores_from_logits
from tasks.model.loading import load_exported_model
from tasks.workspace import Workspace, read_facts


class PredictError(ValueError):
    """A problem the user can fix (missing model, version, column or file)."""


@dataclass
class PredictResult:
    path: str
    rows: int
    model: str
    version: int
    seconds: float


def read_table(path: Path):
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


def text_columns(df, lineage: dict[str, Any], text_column, text_pair_column, source: Path):
    """(texts, pairs or None) a classifier reads: the columns it was trained on, or the ones passed."""
    data = lineage.get("data", {})
    text_col = text_column or data.get("text_column") or "text"
    pair_col = text_pair_column or data.get("text_pair_column")
    texts = _column(df, text_col, source, "--text-column")
    pairs = _column(df, pair_col, source, "--text-pair-column") if pair_col else None
    return texts, pairs


def classify(
    model,
    tok,
    texts: list[str],
    pairs: list[str] | None,
    lineage: dict[str, Any],
    thresholds: dict[str, float] | None,
    id2label: dict[int, str],
    problem_type: str,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """{column: values}: `prediction`, `score` (and `score_<label>` per label for multi-label)."""
    logits = batched_logits(
        model, tok, texts, pairs, int(lineage.get("max_length") or 512), batch_size, progress, "predict"
    )
    scores = scores_from_logits(logits, problem_type)
    if problem_type == "regression":
        return {"prediction": scores[:, 0], "score": scores[:, 0]}
    if problem_type == "multi_label_classification":
        names = [id2label[i] for i in range(scores.shape[1])]
        per_label = (thresholds or {}).get("per_label", thresholds or {})  # evaluation's tuned thresholds
        cut = np.array([float(per_label.get(n, 0.5)) for n in names])
        hits = scores >= cut
        delim = lineage.get("data", {}).get("label_delimiter") or "|"
        cols = {
            "prediction": [delim.join(n for n, h in zip(names, row, strict=False) if h) for row in hits],
            "score": scores.max(axis=1),
        }
        return cols | {f"score_{n}": scores[:, j] for j, n in enumerate(names)}
    pred = scores.argmax(axis=1)
    return {"prediction": [id2label[int(i)] for i in pred], "score": scores[np.arange(len(pred)), pred]}


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
    texts, pairs = text_columns(df, lineage, text_column, text_pair_column, source)
    model, tok = load_exported_model(model_dir, bool(lineage.get("trust_remote_code", False)))
    problem_type = model.config.problem_type or "single_label_classification"
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    cols = classify(model, tok, texts, pairs, lineage, thresholds, id2label, problem_type, batch_size, progress)
    out = df.copy()
    for k, v in cols.items():
        out[k] = v
    return out


def conversations_of(df, lineage: dict[str, Any], source: Path, text_column: str | None) -> list[list[dict]]:
    """The prompts of an instruction-tuned model's input: a `messages` column, or one prompt per row (the column
    the model was trained on, `prompt`, or --text-column)."""
    from tasks.data.chat import to_messages

    if "messages" in df.columns and text_column is None:
        conversations = []
        for i, value in enumerate(df["messages"]):
            msgs, problem = to_messages({"messages": value}, "messages")
            if not msgs:
                raise PredictError(f"input file {source} row {i + 1}, column 'messages': {problem}")
            conversations.append(msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)
        return conversations
    col = text_column or lineage.get("data", {}).get("prompt_column") or "prompt"
    return [[{"role": "user", "content": p}] for p in _column(df, col, source, "--text-column")]


def answer(model, tok, conversations: list[list[dict]], max_new_tokens: int, batch_size: int, progress: bool):
    """Greedy answers, one per conversation, in order."""
    from tasks.evaluation.sft_eval import generate

    starts = range(0, len(conversations), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=len(starts), desc="generate", unit="batch")
    answers: list[str] = []
    for s in starts:
        answers += generate(model, tok, conversations[s : s + batch_size], max_new_tokens, batch_size)
    return answers


def generate_frame(
    df,
    model_dir: str | Path,
    lineage: dict[str, Any],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    source: Path = Path("<input>"),
    text_column: str | None = None,
):
    """An instruction-tuned model's greedy answers: the input frame plus `response`."""
    conversations = conversations_of(df, lineage, source, text_column)
    model, tok = load_exported_model(model_dir, bool(lineage.get("trust_remote_code", False)))
    out = df.copy()
    out["response"] = answer(model, tok, conversations, max_new_tokens, batch_size, progress)
    return out


def write_table(out, output_path: str | Path) -> Path:
    """Write a frame as CSV atomically (a temporary sibling, then a rename)."""
    dest = Path(output_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    out.to_csv(tmp, index=False)
    tmp.replace(dest)
    return dest


def predict_file(
    workspace: str | Path,
    model_ref: str,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 64,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    progress: bool = True,
    max_new_tokens: int = 128,
) -> PredictResult:
    """Score a file with a registered model `NAME[@VERSION]` (default: the production version); write a CSV.
    The name is validated before it becomes a path (RegistryError: never a model outside the workspace)."""
    t0 = time.perf_counter()
    name, version, vdir = Workspace.at(workspace).resolve_ref(model_ref)
    source = Path(input_path)
    df = read_table(source)
    lineage = read_facts(vdir / "lineage.json", "registered version")
    metrics = read_facts(vdir / "metrics.json", "registered version") if (vdir / "metrics.json").exists() else {}
    if lineage.get("task") == "sft":
        out = generate_frame(
            df, vdir / "model", lineage, max_new_tokens, min(batch_size, 8), progress, source, text_column
        )
    else:
        out = predict_frame(
            df,
            vdir / "model",
            lineage,
            metrics.get("thresholds"),
            text_column,
            text_pair_column,
            batch_size,
            progress,
            source,
        )
    dest = write_table(out, output_path)
    return PredictResult(str(dest), len(out), name, version, round(time.perf_counter() - t0, 3))
