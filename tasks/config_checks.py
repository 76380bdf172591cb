"""Cross-field checks of the run configuration: contradictions between settings, each a small function.

They run on a valid config (RunConfig's validator) and, when some fields do not parse, on whatever parts do
(tasks/config_loading.py), so a bad config lists field errors and contradictions in one round. A check reads
values through `get("section.key")`; a value that did not parse raises `Unknown` and the check is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class Unknown(Exception):
    """A value a check needs did not parse: the check is skipped (the field's own error is reported)."""


Getter = Callable[[str], Any]


ADAPTER_OPTIONS = {
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "quant_type",
    "double_quant",
    "compute_dtype",
}
QUANT_OPTIONS = {"quant_type", "double_quant", "compute_dtype"}


def _method_options(get: Getter, set_fields: Callable[[str], set[str]]) -> list[tuple[str, str]]:
    kind, given = get("method.kind"), set_fields("method")
    if kind == "full" and given & ADAPTER_OPTIONS:
        return [
            (
                "method",
                f"{', '.join(sorted(given & ADAPTER_OPTIONS))} only apply to lora/qlora/dora, but kind is "
                "'full'; remove them or choose an adapter method",
            )
        ]
    if kind in ("lora", "dora") and given & QUANT_OPTIONS:
        return [("method", f"{', '.join(sorted(given & QUANT_OPTIONS))} only apply to qlora, but kind is '{kind}'")]
    return []


def _data_source(get: Getter, set_fields) -> list[tuple[str, str]]:
    source, out = get("data.source"), []
    if isinstance(source, dict):
        unknown = set(source) - {"train", "validation", "test"}
        if unknown:
            out.append(("data.source", f"unknown split name(s) {sorted(unknown)}; use train, validation, test"))
        if "train" not in source:
            out.append(("data.source", "a split mapping needs a 'train' entry"))
    return out


def _data_task(get: Getter, set_fields) -> list[tuple[str, str]]:
    out = []
    task, given = get("data.task"), set_fields("data")
    if task == "sft" and "class_weighting" in given and get("data.class_weighting") != "none":
        out.append(("data.class_weighting", "does not apply to task sft (the loss is on the response tokens)"))
    if task != "sft" and get("data.packing"):
        out.append(("data.packing", "only applies to task sft"))
    if get("data.label_delimiter") is not None and get("data.task") not in ("auto", "multi_label"):
        out.append(("data.label_delimiter", "only meaningful for task multi_label"))
    if task == "regression" and get("data.class_weighting") != "none":
        out.append(("data.class_weighting", "must be 'none' for task regression (MSE has no class weights)"))
    return out


def _splits(get: Getter, set_fields) -> list[tuple[str, str]]:
    if get("data.split.validation") + get("data.split.test") >= 0.8:
        return [("data.split", "validation + test must leave at least 20 % for training")]
    return []


def _batch(get: Getter, set_fields) -> list[tuple[str, str]]:
    eff, micro, procs = (
        get("training.effective_batch_size"),
        get("training.micro_batch_size"),
        get("training.processes"),
    )
    if micro is not None and eff % (micro * procs) != 0:
        return [
            (
                "training.effective_batch_size",
                f"({eff}) must be a multiple of training.micro_batch_size x training.processes ({micro} x {procs})",
            )
        ]
    return []


def _workspace(get: Getter, set_fields) -> list[tuple[str, str]]:
    raw = get("workspace")
    if not str(raw).strip():
        return [("workspace", "is empty; fix: name a folder (it is created if missing), e.g. ./workspace")]
    ws = Path(raw).expanduser()
    if ws.exists() and not ws.is_dir():
        return [
            (
                "workspace",
                f"{ws} exists and is not a folder; fix: point workspace at a folder (it is created if missing)",
            )
        ]
    return []


CHECKS = (_method_options, _data_source, _data_task, _splits, _batch, _workspace)


def cross_field_problems(get: Getter, set_fields: Callable[[str], set[str]]) -> list[tuple[str, str]]:
    """Every cross-field problem; a check whose inputs did not parse is skipped."""
    problems: list[tuple[str, str]] = []
    for check in CHECKS:
        try:
            problems += check(get, set_fields)
        except Unknown:
            continue
    return problems
