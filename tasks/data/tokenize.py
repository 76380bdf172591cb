"""Tokenization step: prepared dataset -> `<workspace>/tokenized/<key>/`, keyed by dataset fingerprint,
tokenizer content and max length. No padding here: batches are padded dynamically at training time.
"""

from __future__ import annotations

import time
from pathlib import Path

from tasks.config import RunConfig
from tasks.data.report import truncation_warning
from tasks.files import atomic_dir, sha256_json, write_json
from tasks.model.base import load_tokenizer, tokenizer_fingerprint
from tasks.records import TokenizedData
from tasks.workspace import Workspace, read_facts

TOKENIZE_VERSION = "2"  # 2: tokenized.json lists truncation warnings (counted in tokens)


def tokenized_dir(cfg: RunConfig, dataset_fp: str, tokenizer_dir: str) -> Path:
    """Where the tokenized splits for (dataset, tokenizer content, max_length) live: cheap, no torch."""
    key = sha256_json(
        {
            "dataset": dataset_fp,
            "tokenizer": tokenizer_fingerprint(tokenizer_dir),
            "max_length": cfg.data.max_length,
            "version": TOKENIZE_VERSION,
        }
    )[:20]
    return Workspace.at(cfg.workspace).tokenized(key)


def tokenize_dataset(prepared_dir: str, tokenizer_dir: str, cfg: RunConfig) -> TokenizedData:
    """Tokenize every split once per (dataset, tokenizer, max_length); returns where it lives."""
    from tasks.data.splits import SPLITS  # pandas: imported by the work, not by the stage key or its record

    manifest = read_facts(Path(prepared_dir) / "manifest.json", "prepared dataset")
    max_length = cfg.data.max_length
    final = tokenized_dir(cfg, manifest["fingerprint"], tokenizer_dir)
    key = final.name
    if (final / "tokenized.json").exists():
        info = read_facts(final / "tokenized.json", "tokenized dataset")
        return TokenizedData(str(final), key, info["truncated_share"], True, info.get("warnings", []))

    if manifest["task"] == "sft":
        from tasks.data.sft_tokenize import tokenize_conversations

        shares, warnings = tokenize_conversations(Path(prepared_dir), tokenizer_dir, cfg, final)
        return TokenizedData(str(final), key, shares, False, warnings)

    import datasets

    tok = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code, cfg.model.revision)
    has_pair = manifest["columns"].get("text_pair") is not None
    t0 = time.perf_counter()

    def encode(batch):
        args = (batch["text"], batch["text_pair"]) if has_pair else (batch["text"],)
        enc = tok(*args, truncation=True, max_length=max_length)
        full = tok(*args, truncation=False)["input_ids"]
        enc["length"] = [len(x) for x in enc["input_ids"]]
        enc["truncated"] = [len(f) > max_length for f in full]
        enc["labels"] = batch["label"]
        return enc

    shares, warnings = {}, []
    with atomic_dir(final) as tmp:
        for split in SPLITS:
            ds = datasets.Dataset.from_parquet(str(Path(prepared_dir) / f"{split}.parquet"), keep_in_memory=True)
            keep = ["id"]
            ds = ds.map(
                encode,
                batched=True,
                remove_columns=[c for c in ds.column_names if c not in keep],
                keep_in_memory=True,
                desc=f"tokenize {split}",
            )
            n = int(sum(ds["truncated"]))
            shares[split] = round(n / max(1, len(ds)), 4)
            if n:
                warnings.append(truncation_warning(split, n, len(ds), max_length))
            ds.remove_columns(["truncated"]).save_to_disk(str(tmp / split))
        write_json(
            tmp / "tokenized.json",
            {
                "key": key,
                "dataset_fingerprint": manifest["fingerprint"],
                "tokenizer": tokenizer_dir,
                "max_length": max_length,
                "truncated_share": shares,
                "warnings": warnings,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
    return TokenizedData(str(final), key, shares, False, warnings)
