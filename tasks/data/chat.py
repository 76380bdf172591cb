"""Instruction data (data.task: sft): rows of any common shape turned into conversations, checked row by row.

Accepted shapes (data.sft_format: auto picks the first that fits the columns):
- `prompt_response`: a prompt column and a response column (data.prompt_column, data.response_column);
- `alpaca`: instruction + optional input -> the prompt ("instruction\\n\\ninput"), output -> the response;
- `messages`: a column of [{"role": system|user|assistant, "content": ...}, ...] (the OpenAI / chat-template shape);
- `sharegpt`: a `conversations` column of [{"from": system|human|gpt, "value": ...}, ...].

Every row becomes a list of {role, content} messages that ends with the assistant. The problems a row can have
(empty response, unknown role, no assistant turn, a conversation that does not end with the assistant, a
missing or non-text field) are collected for all rows and reported once, naming the file and rows (the data stage
raises them as one DataError). Pure Python: no tokenizer here (tokens: tasks/data/sft_tokens.py).
"""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("prompt_response", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


def detect_format(
    columns: list[str],
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
) -> str | None:
    """The shape the columns describe, or None."""
    cols = set(columns)
    if messages_column in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {prompt_column, response_column} <= cols:
        return "prompt_response"
    return None


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value if isinstance(value, str) else None


def _parse_list(value: Any) -> Any:
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            return json.loads(value)
        except ValueError:
            return value
    if hasattr(value, "tolist") and not isinstance(value, (list, dict)):  # numpy arrays from Parquet
        return value.tolist()
    return value


def _check_turns(messages: list[dict]) -> str | None:
    roles = [m["role"] for m in messages]
    unknown = sorted({r for r in roles if r not in ROLES})
    if unknown:
        return f"unknown role(s) {unknown}; use {', '.join(ROLES)}"
    if "assistant" not in roles:
        return "no assistant turn: nothing to learn from"
    if roles[-1] != "assistant":
        return f"the conversation ends with a '{roles[-1]}' turn, not the assistant's; fix: end each conversation with the answer"
    empty = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        return f"empty assistant response (turn {', '.join(map(str, empty))})"
    return None


def _from_messages(
    value: Any, role_key: str, content_key: str, roles: dict[str, str] | None
) -> tuple[list, str | None]:
    value = _parse_list(value)
    if not isinstance(value, list) or not value:
        return [], "not a list of messages (expected a JSON list of {role, content} objects)"
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or _text(m.get(content_key)) is None or not isinstance(m.get(role_key), str):
            return [], f"message {i} is not an object with a '{role_key}' and a text '{content_key}'"
        role = m[role_key].strip().lower()
        out.append({"role": roles.get(role, role) if roles else role, "content": m[content_key]})
    return out, _check_turns(out)


def to_messages(
    row: dict,
    fmt: str,
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
) -> tuple[list[dict], str | None]:
    """(messages, problem or None) for one row of the given shape."""
    if fmt == "messages":
        return _from_messages(row.get(messages_column), "role", "content", None)
    if fmt == "sharegpt":
        return _from_messages(row.get("conversations"), "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction, extra, output = _text(row.get("instruction")), _text(row.get("input")), _text(row.get("output"))
        if not instruction or not instruction.strip():
            return [], "empty instruction"
        prompt = instruction if not (extra or "").strip() else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output or ""}]
    else:
        prompt, response = _text(row.get(prompt_column)), _text(row.get(response_column))
        if not prompt or not prompt.strip():
            return [], f"empty prompt (column '{prompt_column}')"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response or ""}]
    return messages, _check_turns(messages)


def prompt_text(messages: list[dict]) -> str:
    """Everything before the last answer, as one string (duplicates and leakage between splits are found on it)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])


def response_text(messages: list[dict]) -> str:
    return messages[-1]["content"]
