"""Model building for every method from one builder (DESIGN.md rule 5) and reloading a trained run for
inference (memory estimates and the `auto` method choice: tasks/memory.py).

`build_model(...)` differs per method only in how the base is loaded (4-bit or not) and which adapter
is attached; the training loop (tasks/train_worker.py) is shared. torch/transformers/peft are imported
inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.files import read_json

PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}
ADAPTER_METHODS = ("lora", "qlora", "dora")
# Leaf names of attention projections across common architectures (used when scanning finds nothing).
KNOWN_ATTENTION_LEAVES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "c_attn",
                          "q_lin", "k_lin", "v_lin", "out_lin", "query_key_value", "Wqkv", "qkv_proj")


@dataclass
class BuiltModel:
    """A model ready for training plus the facts the run folder records about it."""

    model: Any
    method: str
    head_modules: list[str]
    target_modules: list[str]
    quantization: dict | None
    trainable_parameters: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)


def problem_type_for(task: str) -> str:
    return PROBLEM_TYPES[task]


def num_labels_for(task: str, labels: list[str]) -> int:
    return 1 if task == "regression" else len(labels)


def resolve_device(prefer: str | None = None) -> str:
    import torch

    if prefer:
        return prefer
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_dtype(setting: str, device: str) -> str:
    """QLoRA compute dtype: auto -> bfloat16 on a bf16-capable GPU, float32 otherwise (CPU included)."""
    import torch

    if setting != "auto":
        return setting
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_config(base: str, task: str, labels: list[str], *, pad_token_id: int | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, target_name: str = "target",
                 head: str = "pooler"):
    """The base config with the classification facts set: num_labels, id2label/label2id, problem_type, pad.

    head "mean": the base config wrapped in the mean-pooling head's config (tasks/heads.py)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, revision=revision)
    if head == "mean":
        from tasks.heads import wrap_config

        config = wrap_config(config)
    names = labels if task != "regression" else [target_name]
    config.num_labels = num_labels_for(task, labels)
    config.id2label = {i: n for i, n in enumerate(names)}
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = problem_type_for(task)
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config


def _meta_model(config, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)


def head_module_names(model) -> list[str]:
    """Qualified names of the modules the classification head needs trained and saved.

    The head is every top-level child outside the backbone that holds parameters (classifier, score,
    pre_classifier, ...), plus the backbone's pooler when it has one (BERT's head reads the pooled output).
    """
    prefix = getattr(model, "base_model_prefix", "")
    heads = [name for name, child in model.named_children()
             if name != prefix and any(True for _ in child.parameters())]
    backbone = getattr(model, prefix, None)
    if backbone is not None and getattr(backbone, "pooler", None) is not None:
        heads.append(f"{prefix}.pooler")
    return heads


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def find_target_modules(model, head_modules: list[str]) -> list[str]:
    """`auto` LoRA targets: leaf names of linear layers that only occur inside attention blocks.

    BERT -> query/key/value (its `dense` also sits in the MLP, so it is left out); Llama/Qwen ->
    q/k/v/o_proj; GPT-2 -> c_attn. Falls back to peft's per-architecture table.
    """
    inside, outside = set(), set()
    for name, module in model.named_modules():
        if not name or not _is_linear(module) or any(name == h or name.startswith(h + ".") for h in head_modules):
            continue
        leaf = name.rsplit(".", 1)[-1]
        path = name.lower()
        (inside if ("attn" in path or "attention" in path) else outside).add(leaf)
    found = sorted(inside - outside)
    if found:
        return found
    known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)} & set(KNOWN_ATTENTION_LEAVES))
    if known:
        return known
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:  # pragma: no cover
        table = {}
    mt = getattr(model.config, "model_type", None)
    if mt in table:
        return list(table[mt])
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})
    raise ValueError(
        f"could not find attention projections for model type {mt!r} (linear layers: {', '.join(linears)}); "
        "fix: set method.target_modules to a list of module names"
    )


def disable_cpu_bf16_packing(model) -> int:
    """bitsandbytes repacks 4-bit weights for avx512_bf16 CPUs on the first eval forward, after which
    training fails; switch that path off on every Linear4bit (DESIGN.md environment facts)."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base(base: str, config, *, method: str, device: str, quantization: dict | None,
              trust_remote_code: bool = False, revision: str | None = None, base_dtype: str = "float32"):
    """The AutoModelForSequenceClassification backbone + head, 4-bit for qlora, on `device`."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs: dict[str, Any] = dict(config=config, trust_remote_code=trust_remote_code, revision=revision,
                                  dtype=_dtype(base_dtype))
    if method == "qlora":
        q = quantization or {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=q.get("double_quant", True),
            bnb_4bit_compute_dtype=_dtype(q.get("compute_dtype", "float32")),
            llm_int8_skip_modules=list(q.get("skip_modules", [])),
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
    if method != "qlora":
        model.to(device)
    if config.pad_token_id is not None:
        model.config.pad_token_id = config.pad_token_id
    return model


def build_model(base: str, *, task: str, labels: list[str], method: str, method_cfg: dict,
                pad_token_id: int | None = None, trust_remote_code: bool = False, revision: str | None = None,
                device: str = "cpu", gradient_checkpointing: bool = False, base_dtype: str = "float32",
                seed: int = 42, target_name: str = "target", head: str = "pooler") -> BuiltModel:
    """One builder for full / lora / qlora / dora (method_cfg: the `method` config section as a dict).

    head: "pooler" (the architecture's own head) or "mean" (mean-pooled token states, tasks/heads.py)."""
    import torch

    if method not in ("full",) + ADAPTER_METHODS:
        raise ValueError(f"unknown method {method!r}; resolve 'auto' before building")
    config = model_config(base, task, labels, pad_token_id=pad_token_id, trust_remote_code=trust_remote_code,
                          revision=revision, target_name=target_name, head=head)
    meta = _meta_model(config, trust_remote_code)
    heads = head_module_names(meta)
    targets: list[str] = []
    if method in ADAPTER_METHODS:
        wanted = method_cfg.get("target_modules", "auto")
        targets = find_target_modules(meta, heads) if wanted == "auto" else list(wanted)
    del meta

    quantization = None
    notes: list[str] = []
    if method == "qlora":
        quantization = {
            "load_in_4bit": True,
            "quant_type": method_cfg.get("quant_type", "nf4"),
            "double_quant": bool(method_cfg.get("double_quant", True)),
            "compute_dtype": resolve_compute_dtype(method_cfg.get("compute_dtype", "auto"), device),
            "skip_modules": heads,
        }
    torch.manual_seed(seed)  # the new head (and adapters) start the same way every time
    model = load_base(base, config, method=method, device=device, quantization=quantization,
                      trust_remote_code=trust_remote_code, revision=revision,
                      base_dtype="float32" if method == "qlora" else base_dtype)

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        if device == "cpu":
            n = disable_cpu_bf16_packing(model)
            notes.append(f"avx512_bf16 weight packing disabled on {n} Linear4bit layers")
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if method in ADAPTER_METHODS:
        from peft import LoraConfig, get_peft_model

        if method != "qlora" and gradient_checkpointing:
            model.enable_input_require_grads()
        lora = LoraConfig(
            task_type="SEQ_CLS", r=int(method_cfg.get("lora_r", 8)), lora_alpha=int(method_cfg.get("lora_alpha", 16)),
            lora_dropout=float(method_cfg.get("lora_dropout", 0.1)), target_modules=targets,
            modules_to_save=list(heads), use_dora=(method == "dora"),  # peft extends the list in place
        )
        model = get_peft_model(model, lora)
        # the head stays in fp32 even when the frozen base is 16-bit
        for name, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return BuiltModel(model, method, heads, targets, quantization, trainable, total, notes)


# ----------------------------------------------------------------------------------------------
# Reloading a trained run
# ----------------------------------------------------------------------------------------------

def load_run_base(info: dict, pad_token_id: int | None, device: str = "cpu", quantized: bool = False):
    """The base model an adapter run trained on, with the run's head (labels, head kind, pad) from its
    run_info.json: 4-bit as trained when `quantized` (a qlora run), full precision otherwise (what a merge
    needs). The one loader for reloading runs (tasks/predict.py and the export's merge use it too)."""
    import warnings

    trust = bool(info.get("trust_remote_code", False))
    config = model_config(info["base_model"], info["task"], info["labels"], pad_token_id=pad_token_id,
                          trust_remote_code=trust, revision=info.get("revision"),
                          target_name=info.get("target_name", "target"), head=info.get("head", "pooler"))
    quantized = quantized and bool(info.get("quantization"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base(info["base_model"], config, method="qlora" if quantized else "full", device=device,
                         quantization=info.get("quantization"), trust_remote_code=trust, revision=info.get("revision"))
    if quantized:
        disable_cpu_bf16_packing(base)
    return base


def dequantized_weights(model) -> dict:
    """{parameter name: float32 weight} for every 4-bit Linear in `model`: the weights a QLoRA adapter was
    trained against (the quantization error included), for a merge that reproduces the 4-bit model."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            out[f"{name}.weight"] = dequantize_4bit(w.data, w.quant_state).float().cpu()
    return out


def load_weights(model, weights: dict) -> int:
    """Copy `weights` ({parameter name: tensor}) into `model`'s parameters of the same names and shapes;
    a missing name or a shape mismatch raises (the two models are not the same architecture)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise ValueError(f"{name} is not a parameter of {type(model).__name__}")
            param = params[name]
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))
    return len(weights)


def load_trained_model(run_dir: str, device: str = "cpu"):
    """(model, tokenizer) for inference from `<run>/run_info.json` + `<run>/model/`, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from tasks.tokenize import load_tokenizer

    from tasks.heads import register

    register()  # a mean-pooling head (tasks/heads.py) loads through the Auto classes
    run = Path(run_dir)
    info = read_json(run / "run_info.json")
    model_dir = run / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} does not exist: the run has not finished training")
    trust = bool(info.get("trust_remote_code", False))
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust)
    method = info["method"]
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=trust)
        model.to(device)
    else:
        from peft import PeftModel

        base = load_run_base(info, tokenizer.pad_token_id, device, quantized=method == "qlora")
        model = PeftModel.from_pretrained(base, str(model_dir), is_trainable=False)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
