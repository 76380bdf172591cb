"""The tokenize stage for instruction data: each conversation rendered by the chat template with labels on the
assistant's tokens (tasks/data/sft_tokens.py), written like the classification splits (`datasets` folders) plus the
facts the report shows: the template used, tokens and target tokens per split, truncations. A prompt that leaves no
room for the answer within data.max_length is an error naming the rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from tasks.config import RunConfig
from tasks.data.report import truncation_warning
from tasks.data.sft_tokens import TemplateError, encode, template_of
from tasks.data.sources import DataError
from tasks.data.splits import SPLITS
from tasks.files import atomic_dir, write_json
from tasks.model.base import load_tokenizer


def _encode_split(df: pd.DataFrame, tok, template, max_length: int, split: str, problems: list[str]) -> dict:
    out = {"id": [], "input_ids": [], "labels": [], "length": [], "prompt_tokens": [], "response_tokens": []}
    no_room, truncated = [], 0
    for row in df.itertuples(index=False):
        e = encode(tok, json.loads(row.messages), max_length, template)
        if e.response_tokens == 0:
            no_room.append(row.id)
            continue
        truncated += e.truncated
        for key, value in (
            ("id", row.id),
            ("input_ids", e.input_ids),
            ("labels", e.labels),
            ("length", len(e.input_ids)),
            ("prompt_tokens", e.prompt_tokens),
            ("response_tokens", e.response_tokens),
        ):
            out[key].append(value)
    if no_room:
        shown = ", ".join(no_room[:8]) + (f" (+{len(no_room) - 8} more)" if len(no_room) > 8 else "")
        problems.append(
            f"{split} rows {shown}: the prompt leaves no room for the answer within data.max_length="
            f"{max_length} tokens; fix: raise data.max_length, shorten these prompts, or remove the rows"
        )
    out["_truncated"] = truncated
    return out


def tokenize_conversations(prepared: Path, tokenizer_dir: str, cfg: RunConfig, final: Path) -> tuple[dict, list[str]]:
    """Write the tokenized splits into `final`; returns (truncated share per split, warnings)."""
    import datasets

    tok = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code, cfg.model.revision)
    template, template_name = template_of(tok)
    max_length, t0 = cfg.data.max_length, time.perf_counter()
    problems, encoded = [], {}
    for split in SPLITS:
        try:
            encoded[split] = _encode_split(
                pd.read_parquet(prepared / f"{split}.parquet"), tok, template, max_length, split, problems
            )
        except TemplateError as exc:
            raise DataError([f"model.name_or_path {tokenizer_dir}: {exc}"]) from None
    if problems:
        raise DataError(problems)
    shares, warnings, stats = {}, [], {}
    with atomic_dir(final) as tmp:
        for split, cols in encoded.items():
            n, truncated = len(cols["id"]), cols.pop("_truncated")
            shares[split] = round(truncated / max(1, n), 4)
            if truncated:
                warnings.append(truncation_warning(split, truncated, n, max_length))
            stats[split] = {
                "examples": n,
                "tokens": int(sum(cols["length"])),
                "target_tokens": int(sum(cols["response_tokens"])),
                "truncated": truncated,
            }
            datasets.Dataset.from_dict(cols).save_to_disk(str(tmp / split))
        write_json(
            tmp / "tokenized.json",
            {
                "key": final.name,
                "dataset_fingerprint": prepared.name,
                "tokenizer": tokenizer_dir,
                "max_length": max_length,
                "truncated_share": shares,
                "warnings": warnings,
                "task": "sft",
                "chat_template": template_name,
                "tokens": stats,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
    return shares, warnings
