"""Model-aware classification heads: respect how the checkpoint was trained.

A sentence-transformers checkpoint whose `modules.json` + `1_Pooling/config.json` say mean pooling (the
bundled all-MiniLM-L6-v2 does) gets a head on mean-pooled token states (tasks/model/modeling_mean_pooling.py),
not on BERT's first-token pooler, whose weights come from the original pretraining and were never
trained with the sentence embedding. Everything else keeps its architecture's own head.

`model.head`: auto | pooler | mean. `resolve_head(setting, base, revision)` -> "mean" | "pooler" (+ the reason);
`base` is a local folder or a Hub id (modules.json is fetched, or read from the local cache when offline).
`register()` makes AutoConfig / AutoModelForSequenceClassification know the custom model type in this
process (pipeline(), from_pretrained() without trust_remote_code). Imports stay light; torch and
transformers load only in register()/wrap_config().
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPE = "mean_pooling_classifier"
HEADS = ("auto", "pooler", "mean")
_registered = False


def _reader(base: str | Path, revision: str | None):
    """read(relative path) -> text or None, from a local folder or (for a Hub id) the Hub / its local cache."""
    root = Path(base)
    if root.is_dir():

        def read_local(rel: str) -> str | None:
            try:
                return (root / rel).read_text(encoding="utf-8")
            except OSError:
                return None

        return read_local
    name = str(base)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return lambda rel: None  # a path that does not exist: nothing to read

    def read_hub(rel: str) -> str | None:
        from huggingface_hub import hf_hub_download

        try:  # HF_HUB_OFFLINE=1 answers from the local cache only; a missing file is "not sentence-transformers"
            return Path(hf_hub_download(name, rel, revision=revision)).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - not found, offline without a cached copy, gated: no pooling facts
            return None

    return read_hub


def pooling_mode(base: str | Path, revision: str | None = None) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with ("mean", "cls", "max", ...), or None
    when `base` is not one. `base`: a local folder, or a Hub id (its modules.json and pooling config are
    fetched, or read from the local Hugging Face cache when offline)."""
    read = _reader(base, revision)
    try:
        entries = json.loads(read("modules.json") or "null")
    except ValueError:
        return None
    for entry in entries if isinstance(entries, list) else []:
        if str(entry.get("type", "")).endswith("models.Pooling"):
            rel = "/".join(p for p in (str(entry.get("path", "")).strip("/"), "config.json") if p)
            try:
                cfg = json.loads(read(rel) or "null")
            except ValueError:
                return None
            if not isinstance(cfg, dict):
                return None
            if cfg.get("pooling_mode"):
                return str(cfg["pooling_mode"])
            for mode in (
                "mean_tokens",
                "cls_token",
                "max_tokens",
                "lasttoken",
                "weightedmean_tokens",
                "mean_sqrt_len_tokens",
            ):
                if cfg.get(f"pooling_mode_{mode}"):
                    return {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(mode, mode)
            return None
    return None


def resolve_head(setting: str, base: str | Path, revision: str | None = None) -> tuple[str, str]:
    """("mean" | "pooler", why). auto: mean for a sentence-transformers checkpoint trained with mean pooling
    (a local folder or a Hub id at `revision`)."""
    if setting not in HEADS:
        raise ValueError(f"unknown head {setting!r}; use one of {', '.join(HEADS)}")
    if setting != "auto":
        return setting, "model.head in the config"
    mode = pooling_mode(base, revision)
    if mode == "mean":
        return (
            "mean",
            "sentence-transformers checkpoint trained with mean pooling (modules.json, 1_Pooling/config.json)",
        )
    if mode is None:
        return "pooler", "not a sentence-transformers checkpoint: the architecture's own head"
    return "pooler", f"sentence-transformers checkpoint with {mode} pooling: the architecture's own head"


def register() -> None:
    """Register the mean-pooling config/model with the Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tasks.model.modeling_mean_pooling import MeanPoolingConfig, MeanPoolingForSequenceClassification

    try:
        AutoConfig.register(MODEL_TYPE, MeanPoolingConfig, exist_ok=True)
        AutoModelForSequenceClassification.register(
            MeanPoolingConfig, MeanPoolingForSequenceClassification, exist_ok=True
        )
    except TypeError:  # older transformers without exist_ok
        AutoConfig.register(MODEL_TYPE, MeanPoolingConfig)
        AutoModelForSequenceClassification.register(MeanPoolingConfig, MeanPoolingForSequenceClassification)
    _registered = True


def wrap_config(encoder_config, **head_facts):
    """A MeanPoolingConfig around a base (encoder) config; head_facts: num_labels, id2label, problem_type, ..."""
    register()
    from tasks.model.modeling_mean_pooling import MeanPoolingConfig

    return MeanPoolingConfig(encoder=encoder_config, **head_facts)


def is_mean_pooling(config) -> bool:
    return getattr(config, "model_type", None) == MODEL_TYPE


LOADER_NOTE = (
    "This model uses a mean-pooling classification head (custom model type `mean_pooling_classifier`, code in "
    "`modeling_mean_pooling.py` beside the weights). Load it with "
    "`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` or "
    '`pipeline("text-classification", model=folder, trust_remote_code=True)`; inside this project '
    "`import tasks.model.heads; tasks.model.heads.register()` makes it load without trust_remote_code."
)
