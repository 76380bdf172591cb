"""Tokens for instruction tuning: a conversation rendered by the tokenizer's own chat template, with labels on the
assistant's tokens only (every assistant turn of a multi-turn conversation), and packing of short examples.

Masking. transformers can return an assistant-token mask from `apply_chat_template(return_assistant_tokens_mask=True)`
only for templates that mark assistant text with `{% generation %}`, which most shipped templates (SmolLM2's
included) do not. So the spans are found by rendering with the same template: the tokens of the conversation up to
an assistant turn with the generation prompt, then up to the end of that turn; the tokens in between are the
assistant's (its text and its end-of-turn token, which teaches the model to stop). The prefixes must be token
prefixes of the whole conversation; a template for which they are not is refused with a clear error rather than
masked wrongly. A tokenizer without a chat template gets a named fallback (ChatML), recorded in the report.

Packing. Several short examples share one row of at most max_length tokens; `position_ids` restart at 0 for each
example and no attention mask is passed, from which transformers builds a block-diagonal causal mask (no attention
across example boundaries: tests/test_sft.py checks that a packed example's logits equal those of the example alone).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100
FALLBACK_NAME = "chatml (fallback: the tokenizer has no chat template)"
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template cannot be used to find the assistant's tokens."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int  # tokens before the last answer
    response_tokens: int  # tokens the loss is computed on (after truncation)
    truncated: bool


def template_of(tokenizer) -> tuple[str | None, str]:
    """(template to pass to apply_chat_template, its name for the report); None = the tokenizer's own."""
    if getattr(tokenizer, "chat_template", None):
        return None, "the tokenizer's own chat template"
    return FALLBACK_TEMPLATE, FALLBACK_NAME


def _ids(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def assistant_spans(tokenizer, messages: list[dict], template: str | None) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of the whole conversation, [(start, end) of each assistant turn])."""
    full = _ids(tokenizer, messages, template, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _ids(tokenizer, messages[:i], template, True)
        end = _ids(tokenizer, messages[: i + 1], template, False)
        if full[: len(start)] != start or full[: len(end)] != end or len(end) <= len(start):
            raise TemplateError(
                "the chat template does not render a conversation as the concatenation of its turns "
                "(a prefix of the conversation tokenizes differently); fix: use a tokenizer whose "
                "template appends turns, or set model.chat_template"
            )
        spans.append((len(start), len(end)))
    return full, spans


def encode(tokenizer, messages: list[dict], max_length: int, template: str | None = None) -> Encoded:
    """Token ids and labels (IGNORE outside assistant turns), cut to max_length from the right."""
    ids, spans = assistant_spans(tokenizer, messages, template)
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    prompt = spans[-1][0] if spans else len(ids)
    return Encoded(ids, labels, prompt, sum(1 for x in labels if x != IGNORE), truncated)


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices grouped into rows of at most max_length tokens (first fit over the examples sorted longest
    first: few rows, little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def packed_row(examples: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) of examples laid end to end, positions restarting at each example."""
    ids, labels, positions = [], [], []
    for example_ids, example_labels in examples:
        ids += example_ids
        labels += [IGNORE] + example_labels[1:]  # never predict an example's first token from the previous example
        positions += list(range(len(example_ids)))
    return ids, labels, positions
