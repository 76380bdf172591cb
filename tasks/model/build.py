"""Building a model for training from a RunPlan: the base config with the task's facts, the head, the LoRA
targets, and the method's own loading and adapter (tasks/model/methods.py).

`build_model(plan, pad_token_id)` is the one builder for every method; the training loop is shared.
torch/transformers/peft are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.model.methods import get_method
from tasks.plan import RunPlan

# Leaf names of attention projections across common architectures (used when scanning finds nothing).
KNOWN_ATTENTION_LEAVES = (
    "query",
    "key",
    "value",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "c_attn",
    "q_lin",
    "k_lin",
    "v_lin",
    "out_lin",
    "query_key_value",
    "Wqkv",
    "qkv_proj",
)
PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


@dataclass
class BuiltModel:
    """A model ready for training plus the facts the run folder records about it (build.json)."""

    model: Any
    method: str
    head_modules: list[str]
    target_modules: list[str]
    trainable_parameters: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)

    def facts(self) -> dict:
        return {
            "method": self.method,
            "head_modules": self.head_modules,
            "target_modules": self.target_modules,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "build_notes": self.notes,
        }


def auto_class(task: str = "single_label"):
    """The transformers Auto class of a task: a causal LM for instruction tuning, a sequence classifier otherwise."""
    if task == "sft":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def peft_task_type(task: str) -> str:
    return "CAUSAL_LM" if task == "sft" else "SEQ_CLS"


def model_config(
    base: str,
    task: str,
    labels: list[str],
    *,
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    target_name: str = "target",
    head: str = "pooler",
):
    """The base config with the classification facts set: num_labels, id2label/label2id, problem_type, pad
    (instruction tuning: the base config, with the pad token).

    head "mean": the base config wrapped in the mean-pooling head's config (tasks/model/heads.py)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, revision=revision)
    if task == "sft":
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        return config
    if head == "mean":
        from tasks.model.heads import wrap_config

        config = wrap_config(config)
    names = labels if task != "regression" else [target_name]
    config.num_labels = 1 if task == "regression" else len(labels)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = PROBLEM_TYPES[task]
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config


def plan_config(plan: RunPlan, pad_token_id: int | None = None):
    return model_config(
        plan.base_model,
        plan.task,
        plan.labels,
        pad_token_id=pad_token_id,
        trust_remote_code=plan.trust_remote_code,
        revision=plan.revision,
        target_name=plan.target_name,
        head=plan.head,
    )


def meta_model(config, trust_remote_code: bool = False, task: str = "single_label"):
    """The model on the meta device: shapes and names, no memory, nothing loaded."""
    import torch

    with torch.device("meta"):
        return auto_class(task).from_config(config, trust_remote_code=trust_remote_code)


def head_module_names(model, task: str = "single_label") -> list[str]:
    """Qualified names of the modules the classification head needs trained and saved.

    The head is every top-level child outside the backbone that holds parameters (classifier, score,
    pre_classifier, ...), plus the backbone's pooler when it has one (BERT's head reads the pooled output).
    """
    if task == "sft":  # a language model's head is its (often tied) lm_head: adapters train the body
        return []
    prefix = getattr(model, "base_model_prefix", "")
    heads = [name for name, child in model.named_children() if name != prefix and any(True for _ in child.parameters())]
    backbone = getattr(model, prefix, None)
    if backbone is not None and getattr(backbone, "pooler", None) is not None:
        heads.append(f"{prefix}.pooler")
    return heads


def is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def _in_heads(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def find_target_modules(model, head_modules: list[str]) -> list[str]:
    """`auto` LoRA targets: leaf names of linear layers that only occur inside attention blocks.

    BERT -> query/key/value (its `dense` also sits in the MLP, so it is left out); Llama/Qwen ->
    q/k/v/o_proj; GPT-2 -> c_attn. Falls back to peft's per-architecture table.
    """
    inside, outside = set(), set()
    for name, module in model.named_modules():
        if not name or not is_linear(module) or _in_heads(name, head_modules):
            continue
        leaf = name.rsplit(".", 1)[-1]
        path = name.lower()
        (inside if ("attn" in path or "attention" in path) else outside).add(leaf)
    found = sorted(inside - outside)
    if found:
        return found
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear(m)}
    known = sorted(leaves & set(KNOWN_ATTENTION_LEAVES))
    if known:
        return known
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:  # pragma: no cover
        table = {}
    mt = getattr(model.config, "model_type", None)
    if mt in table:
        return list(table[mt])
    raise ValueError(
        f"could not find attention projections for model type {mt!r} (linear layers: {', '.join(sorted(leaves))}); "
        "fix: set method.target_modules to a list of module names"
    )


def all_linear_targets(model, heads: list[str]) -> list[str]:
    """`all-linear`: leaf names of every linear layer of the backbone (never the head or the lm_head)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {n for n, m in model.named_modules() if out is not None and m is out}
    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if n and is_linear(m) and n not in skip and not _in_heads(n, heads)
        }
    )


def resolve_targets(meta, heads: list[str], wanted) -> list[str]:
    """method.target_modules as leaf names. `auto` = every linear layer of the body (all-linear): on SMS spam and
    SST-2 (2,000 rows, MiniLM, LoRA with the rate search) it beat the attention projections alone (macro-F1 0.9347
    vs 0.9298, 0.8476 vs 0.8448; benchmarks/RESULTS.md), and on a set we do not have it matched full fine-tuning
    (0.863 vs 0.865) where attention alone reached 0.836. `attention` keeps the attention projections only."""
    if wanted in ("auto", "all-linear"):
        return all_linear_targets(meta, heads)
    if wanted == "attention":
        return find_target_modules(meta, heads)
    return list(wanted)


def build_model(plan: RunPlan, pad_token_id: int | None = None) -> BuiltModel:
    """The model of `plan.method`, on `plan.device`, ready for the shared training loop."""
    import torch

    method = get_method(plan.method)
    config = plan_config(plan, pad_token_id)
    meta = meta_model(config, plan.trust_remote_code, plan.task)
    heads = head_module_names(meta, plan.task)
    targets = resolve_targets(meta, heads, plan.method_settings.get("target_modules", "auto")) if method.adapter else []
    del meta
    torch.manual_seed(plan.seed)  # the new head (and adapters) start the same way every time
    model = method.load_base(
        plan.base_model,
        config,
        auto_class=auto_class(plan.task),
        device=plan.device,
        quantization=plan.quantization,
        trust_remote_code=plan.trust_remote_code,
        revision=plan.revision,
        base_dtype=plan.base_dtype,
    )
    if config.pad_token_id is not None:
        model.config.pad_token_id = config.pad_token_id
    model, notes = method.prepare(model, gradient_checkpointing=plan.gradient_checkpointing, device=plan.device)
    model = method.attach(
        model,
        settings=plan.method_settings,
        targets=targets,
        heads=heads,
        task_type=peft_task_type(plan.task),
        gradient_checkpointing=plan.gradient_checkpointing,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return BuiltModel(model, method.name, heads, targets, trainable, total, notes)
