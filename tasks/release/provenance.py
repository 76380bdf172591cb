"""Provenance recorded beside every export and registered version: the code's git commit and package versions."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """The git commit of this code (with '+dirty' for local changes), else the package version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"finetune-pipeline=={version('finetune-pipeline')}"
    except PackageNotFoundError:
        return "unknown"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a model (for lineage)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out
