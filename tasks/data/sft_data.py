"""The data stage for instruction tuning (data.task: sft): rows of prompt/response pairs, Alpaca records or chat
conversations (tasks/data/chat.py) checked row by row, every problem collected, and projected onto the prepared
schema: id, text (the prompt side, where duplicates and leakage are looked for), response, messages (the
conversation as JSON), _file, _row."""

from __future__ import annotations

import json

import pandas as pd

from tasks.config import DataConfig
from tasks.data.chat import FORMATS, detect_format, prompt_text, response_text, to_messages
from tasks.data.sources import DataError, RawData, _where
from tasks.data.splits import apply_leakage
from tasks.data.validation import CheckedData


def _format_of(part, cfg: DataConfig, problems: list[str]) -> str | None:
    cols = [c for c in part.frame.columns if not str(c).startswith("_")]
    fmt = (
        cfg.sft_format
        if cfg.sft_format != "auto"
        else detect_format(cols, cfg.prompt_column, cfg.response_column, cfg.messages_column)
    )
    needed = {
        "prompt_response": [cfg.prompt_column, cfg.response_column],
        "alpaca": ["instruction", "output"],
        "messages": [cfg.messages_column],
        "sharegpt": ["conversations"],
    }
    if fmt is None:
        problems.append(
            f"{part.file}: no instruction columns (columns: {', '.join(map(str, cols)) or 'none'}); fix: "
            f"give the file '{cfg.prompt_column}' and '{cfg.response_column}' columns (or instruction + "
            f"output, or a '{cfg.messages_column}' list, or ShareGPT 'conversations'), or set "
            "data.prompt_column / data.response_column / data.sft_format"
        )
        return None
    missing = [c for c in needed[fmt] if c not in cols]
    if missing:
        problems.append(
            f"{part.file}: data.sft_format {fmt} needs column(s) {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(map(str, cols))}); fix: rename them or choose another of "
            f"{', '.join(FORMATS)}"
        )
        return None
    return fmt


def _rows(part, fmt: str, cfg: DataConfig, problems: list[str]) -> pd.DataFrame:
    df = part.frame
    records, bad = [], {}
    for row in df.to_dict("records"):
        messages, problem = to_messages(row, fmt, cfg.prompt_column, cfg.response_column, cfg.messages_column)
        if problem:
            bad.setdefault(problem, []).append(row["_row"])
            continue
        records.append(
            {
                "id": f"{part.file.rsplit('/', 1)[-1]}:{row['_row']}",
                "text": prompt_text(messages),
                "response": response_text(messages),
                "messages": json.dumps(messages, ensure_ascii=False),
                "_file": row["_file"],
                "_row": row["_row"],
            }
        )
    for problem, rows in bad.items():
        where = _where(df, df["_row"].isin(rows))[0]
        problems.append(f"{where}: {problem}")
    return pd.DataFrame(records, columns=["id", "text", "response", "messages", "_file", "_row"])


def check_sft(raw: RawData, cfg: DataConfig) -> CheckedData:
    """Every problem of instruction data at once; clean conversations by split."""
    problems = list(raw.problems)
    frames: dict[str | None, pd.DataFrame] = {}
    for part in raw.parts:
        if not len(part.frame):
            problems.append(f"{part.file}: no data rows (header only or empty); fix: add rows or remove the file")
            continue
        fmt = _format_of(part, cfg, problems)
        if fmt is not None:
            rows = _rows(part, fmt, cfg, problems)
            frames[part.split] = pd.concat([frames.get(part.split), rows], ignore_index=True)
    if not frames and not problems:
        problems.append("no instruction rows; fix: point data.source at prompt/response or conversation data")
    frames, warnings, leakage = apply_leakage(frames, cfg, problems)
    if problems:
        raise DataError(problems)
    return CheckedData(frames, "sft", [], warnings, leakage)
