"""The prepared dataset's identity: a hash of the raw bytes and the settings that shape the output. No rows read,
no pandas imported: on a cached run the prepare stage's key costs a file hash."""

from __future__ import annotations

from tasks.config import DataConfig
from tasks.data.sources import source_files, source_hashes
from tasks.files import sha256_json

DATA_STAGE_VERSION = "2"  # 2: numeric labels canonical, leaked rows dropped, no word-count truncation estimate


def dataset_fingerprint(cfg: DataConfig, hashes: dict[str, str] | None = None) -> str:
    """Hash of the raw bytes and the settings that shape the output (not the paths). Reads no rows."""
    settings = cfg.model_dump(mode="json", exclude={"source"})
    hashes = source_hashes(cfg.source) if hashes is None else hashes
    if isinstance(cfg.source, str) and cfg.source.startswith("hf://"):
        sources = [("hf", cfg.source)]
    else:
        split_of = {str(path): split for split, path in source_files(cfg.source)[1]}
        sources = sorted((str(split_of.get(f)), sha) for f, sha in hashes.items())
    return sha256_json({"sources": sources, "settings": settings, "version": DATA_STAGE_VERSION})[:20]
