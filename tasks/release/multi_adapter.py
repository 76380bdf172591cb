"""Several registered versions on one base: `finetune predict --model a --model b ...`.

Versions whose runs trained an adapter on the same base model (the same base fingerprint in their plans) share one
copy of that base: it is loaded once (4-bit again for QLoRA, as trained), each version's adapter (the export keeps
it alone in `model/adapter/` beside the merged model) is attached with peft's `load_adapter` under its own name,
and `set_adapter` switches between them for each version's predictions. Each version's columns are prefixed with
`NAME@VERSION_` (`sentiment@2_prediction`, `sentiment@2_score`, `chat@1_response`).

Refused, with the fix named: a version that kept no adapter (full fine-tuning changed every weight: predict with it
on its own), versions on different bases, versions of different tasks, a mix of 4-bit and full-precision bases, or
classifiers whose heads differ in size. The memory saved is the base's bytes counted once instead of once per
version; it is printed and written to `<output stem>.summary.json` beside the predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.files import write_json
from tasks.model.methods import get_method
from tasks.plan import RunPlan
from tasks.release.export import ADAPTER_FILES
from tasks.release.merge import MergeError, check_base
from tasks.release.predict import (
    PredictError,
    answer,
    classify,
    conversations_of,
    read_table,
    text_columns,
    write_table,
)
from tasks.workspace import Workspace, WorkspaceError, read_facts

MB = 1024 * 1024


class MultiAdapterError(PredictError):
    """Versions that cannot share one base (the message names which, why, and what to do instead)."""


@dataclass
class Member:
    """One registered version taking part: its facts, its run's plan and where its adapter lies."""

    name: str
    version: int
    folder: Path
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    plan: RunPlan

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "model" / "adapter"


@dataclass
class MultiResult:
    path: str
    rows: int
    models: list[str]
    seconds: float
    memory: dict[str, Any]
    summary: str


def _member(ws: Workspace, ref: str) -> Member:
    name, version, vdir = ws.resolve_ref(ref)
    label = f"{name}@{version}"
    lineage = read_facts(vdir / "lineage.json", "registered version")
    metrics = read_facts(vdir / "metrics.json", "registered version") if (vdir / "metrics.json").exists() else {}
    adapter = vdir / "model" / "adapter"
    if not lineage.get("adapter") or not all((adapter / f).is_file() for f in ADAPTER_FILES):
        raise MultiAdapterError(
            f"{label} (method {lineage.get('method')}) kept no adapter in {adapter}: a full fine-tune changes every "
            "weight, so it cannot share a base with other versions; fix: predict with it on its own (one --model)"
        )
    run = ws.root / str((lineage.get("run") or {}).get("path", ""))
    if not (run / "plan.json").is_file():
        raise MultiAdapterError(
            f"{label}: its training run {run} (with plan.json, which names the base model) is no longer in the "
            "workspace, so its base cannot be found; fix: predict with it on its own (its export is self-contained)"
        )
    try:
        plan = RunPlan.read(run)
    except WorkspaceError as exc:
        raise MultiAdapterError(f"{label}: {exc}") from None
    return Member(name, version, vdir, lineage, metrics, plan)


def _one_value(members: list[Member], what: str, value, fix: str) -> None:
    found = {m.label: value(m) for m in members}
    if len(set(map(str, found.values()))) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in found.items())
        raise MultiAdapterError(f"these versions differ in {what} ({listed}); {fix}")


def resolve_members(workspace: str | Path, refs: list[str]) -> list[Member]:
    """The versions named by `refs` (`NAME` = production, `NAME@VERSION`), checked to share one base."""
    ws = Workspace.at(workspace)
    members = [_member(ws, r) for r in refs]
    labels = [m.label for m in members]
    if len(set(labels)) != len(labels):
        raise MultiAdapterError(f"--model names the same version twice ({', '.join(labels)}); fix: name each once")
    separately = "fix: run predict once per group of versions that share a base"
    _one_value(
        members,
        "base model (name: fingerprint)",
        lambda m: f"{m.plan.base_model_name}: {m.plan.base_model_fingerprint}",
        "only versions trained on the same base can share it; " + separately,
    )
    _one_value(members, "task", lambda m: m.plan.task, separately)
    _one_value(
        members,
        "base precision (4-bit or not)",
        lambda m: "4-bit" if get_method(m.plan.method).quantized else "full precision",
        "QLoRA adapters need the 4-bit base they were trained on, LoRA ones the full-precision base; " + separately,
    )
    if members[0].plan.task != "sft":
        _one_value(
            members,
            "classification head (kind, outputs)",
            lambda m: f"{m.plan.head}, {len(m.plan.labels)}",
            "a shared base carries one head shape; " + separately,
        )
    try:
        check_base(members[0].plan, ws)
    except MergeError as exc:
        raise MultiAdapterError(str(exc)) from None
    return members


def _columns(model, tok, m: Member, df, source: Path, options: dict[str, Any]) -> dict[str, Any]:
    """One version's prediction columns (unprefixed) with its adapter active."""
    if m.plan.task == "sft":
        conversations = conversations_of(df, m.lineage, source, options["text_column"])
        batch = min(options["batch_size"], 8)
        return {"response": answer(model, tok, conversations, options["max_new_tokens"], batch, options["progress"])}
    texts, pairs = text_columns(df, m.lineage, options["text_column"], options["text_pair_column"], source)
    return classify(
        model,
        tok,
        texts,
        pairs,
        m.lineage,
        m.metrics.get("thresholds"),
        dict(enumerate(m.plan.labels)),
        m.plan.problem_type or "single_label_classification",
        options["batch_size"],
        options["progress"],
    )


def memory_figures(base_bytes: int, shared_bytes: int, n: int) -> dict[str, Any]:
    """The base counted once instead of `n` times: measured bytes of the loaded tensors."""
    adapters = shared_bytes - base_bytes
    return {
        "models": n,
        "base_bytes": base_bytes,
        "adapters_bytes": adapters,
        "shared_bytes": shared_bytes,
        "separate_bytes": n * base_bytes + adapters,
        "saved_bytes": (n - 1) * base_bytes,
        "saved_mb": round((n - 1) * base_bytes / MB, 2),
    }


def predict_many(
    workspace: str | Path,
    refs: list[str],
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 64,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    progress: bool = True,
    max_new_tokens: int = 128,
    device: str | None = None,
) -> MultiResult:
    """Score one file with several registered versions sharing their base: one column set per version."""
    from tasks.model.base import load_tokenizer
    from tasks.model.loading import load_adapters_on_base, tensor_bytes

    t0 = time.perf_counter()
    members = resolve_members(workspace, refs)
    source = Path(input_path)
    df = read_table(source)
    toks = [load_tokenizer(str(m.folder / "model"), m.plan.trust_remote_code) for m in members]
    adapters = {f"v{i}": m.adapter_dir for i, m in enumerate(members)}
    model, base_bytes = load_adapters_on_base(members[0].plan, adapters, toks[0].pad_token_id, device)
    memory = memory_figures(base_bytes, tensor_bytes(model), len(members))
    options = {
        "batch_size": batch_size,
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "progress": progress,
        "max_new_tokens": max_new_tokens,
    }
    out = df.copy()
    for (adapter, m), tok in zip(zip(adapters, members, strict=True), toks, strict=True):
        model.set_adapter(adapter)
        for col, values in _columns(model, tok, m, df, source, options).items():
            out[f"{m.label}_{col}"] = values
    dest = write_table(out, output_path)
    seconds = round(time.perf_counter() - t0, 3)
    summary = dest.with_name(f"{dest.stem}.summary.json")
    write_json(
        summary,
        {
            "models": [m.label for m in members],
            "columns_prefix": {m.label: f"{m.label}_" for m in members},
            "base_model": members[0].plan.base_model_name,
            "base_model_fingerprint": members[0].plan.base_model_fingerprint,
            "memory": memory,
            "rows": len(out),
            "seconds": seconds,
        },
    )
    return MultiResult(str(dest), len(out), [m.label for m in members], seconds, memory, str(summary))
