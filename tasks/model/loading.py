"""Reloading trained runs and exports for inference, evaluation and the merge.

Every loader reads the run's plan (tasks/plan.py) and asks the run's method how its model loads
(tasks/model/methods.py): a full fine-tune is a saved model, an adapter run is its base (4-bit again for QLoRA)
plus the adapter. torch/transformers/peft are imported inside functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tasks.model.base import load_tokenizer
from tasks.model.build import auto_class, plan_config
from tasks.model.methods import get_method
from tasks.plan import RunPlan
from tasks.workspace import WorkspaceError


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dir_of(run_dir: str | Path) -> Path:
    """A finished run's model/ folder, after checking it holds what the run's method saves."""
    run = Path(run_dir)
    plan = RunPlan.read(run)
    model = run / "model"
    if get_method(plan.method).adapter:
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (model / f).is_file()]
    else:
        ok = (model / "config.json").is_file() and list(model.glob("*.safetensors"))
        missing = [] if ok else ["config.json + *.safetensors"]
    if missing:
        raise WorkspaceError(
            f"{model} lacks {', '.join(missing)} (method {plan.method}): the run did not finish; "
            "fix: train again (it resumes from the last checkpoint)"
        )
    return model


def run_tokenizer(run_dir: str | Path, plan: RunPlan):
    run = Path(run_dir)
    src = run / "model" if (run / "model" / "tokenizer_config.json").exists() else plan.tokenizer_path
    return load_tokenizer(str(src), plan.trust_remote_code)


def load_run_base(plan: RunPlan, pad_token_id: int | None, device: str = "cpu", quantized: bool = False):
    """The base model a run trained on, with the run's head (labels, head kind, pad): 4-bit as trained when
    `quantized` and the method quantizes, full precision otherwise (what a merge needs)."""
    method = get_method(plan.method)
    loader = method if (quantized and method.quantized) else get_method("full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader.load_base(
            plan.base_model,
            plan_config(plan, pad_token_id),
            auto_class=auto_class(plan.task),
            device=device,
            quantization=plan.quantization,
            trust_remote_code=plan.trust_remote_code,
            revision=plan.revision,
            base_dtype="float32",
        )


def load_trained_model(run_dir: str | Path, device: str | None = None):
    """(model, tokenizer) as trained, from `<run>/plan.json` + `<run>/model/`, in eval mode."""
    from tasks.model.heads import register

    register()  # a mean-pooling head loads through the Auto classes
    run = Path(run_dir)
    plan = RunPlan.read(run)
    model_dir = model_dir_of(run)
    device = device or default_device()
    tokenizer = (
        load_tokenizer(str(model_dir), trust_remote_code=plan.trust_remote_code)
        if (model_dir / "tokenizer_config.json").exists()
        else run_tokenizer(run, plan)
    )
    method = get_method(plan.method)
    model = method.load_trained(
        str(model_dir),
        auto_class=auto_class(plan.task),
        trust_remote_code=plan.trust_remote_code,
        device=device,
        load_base=lambda quantized: load_run_base(plan, tokenizer.pad_token_id, device, quantized),
    )
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_adapter_model(run_dir: str | Path, quantized: bool = False, device: str | None = None):
    """(PeftModel on the base, tokenizer): the run's adapter + saved head, in eval mode."""
    from peft import PeftModel

    from tasks.model.heads import register

    register()
    run = Path(run_dir)
    plan = RunPlan.read(run)
    tok = run_tokenizer(run, plan)
    base = load_run_base(plan, tok.pad_token_id, "cpu", quantized=quantized)
    if not quantized:
        base.to(device or default_device())
    model = PeftModel.from_pretrained(base, str(model_dir_of(run)), is_trainable=False)
    return model.eval(), tok


def tensor_bytes(model) -> int:
    """Bytes of `model`'s parameters and buffers as they sit in memory (a tied or shared tensor counted once;
    a 4-bit weight by its packed storage)."""
    import itertools

    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type == "meta":
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def load_adapters_on_base(
    plan: RunPlan, adapters: dict[str, Path], pad_token_id: int | None, device: str | None = None
):
    """(PeftModel, bytes of the base): the base `plan` trained on, loaded once (4-bit as trained for a quantized
    method), with each adapter folder attached under its name (peft `load_adapter`); switch with `set_adapter`."""
    from peft import PeftModel

    from tasks.model.heads import register

    register()
    device = device or default_device()
    base = load_run_base(plan, pad_token_id, device, quantized=get_method(plan.method).quantized)
    if pad_token_id is not None:
        base.config.pad_token_id = pad_token_id
    base_bytes = tensor_bytes(base)
    model = None
    for name, folder in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    return model.eval(), base_bytes


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


def exported_task(model_dir: str | Path) -> str:
    """ "sft" for a saved causal language model, the classification default otherwise (from config.json)."""
    from tasks.workspace import read_facts

    archs = read_facts(Path(model_dir) / "config.json", "exported model").get("architectures") or []
    return "sft" if any(str(a).endswith("ForCausalLM") for a in archs) else "single_label"


def load_exported_model(model_dir: str | Path, trust_remote_code: bool = False, device: str | None = None):
    """An exported HF folder (merged weights + tokenizer) as (model, tokenizer), in eval mode."""
    from tasks.model.heads import register

    register()  # the mean-pooling head loads without remote code in this process
    tok = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    model = auto_class(exported_task(model_dir)).from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or default_device()).eval()
    return model, tok
