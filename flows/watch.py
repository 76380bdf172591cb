"""The `watch-data` flow: a sensor that scans a drop location once per run and announces each new,
complete data file as a `dataset.updated` event (which triggers the `retrain-on-new-data` deployment).

Deployed with an interval schedule for storage that cannot be watched continuously; `finetune watch`
is the long-running equivalent. Wiring only; the logic is in tasks/data/watching.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger


@flow(name="watch-data", log_prints=True, persist_result=False)
def watch_data(
    location: str,
    dataset: str = "demo",
    workspace: str = "./workspace",
    stable_seconds: float = 5.0,
    state_file: str | None = None,
    create_missing: bool = True,
) -> dict[str, Any]:
    """Scan a drop folder or fsspec URL once; emit dataset.updated for each new complete file."""
    from tasks.data.watching import canonical_location, check_location, default_state_path

    logger = get_run_logger()
    location = canonical_location(location)
    if create_missing and "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)  # a fresh project has no drop folder yet
    state = Path(state_file) if state_file else default_state_path(workspace, location)
    result = check_location(location, state, dataset=dataset, stable_seconds=stable_seconds, settle=True)
    for ann in result.announced:
        logger.info("dataset.updated %s: %s (sha256 %s, %d bytes)", dataset, ann.path, ann.sha256[:12], ann.size)
    for url in result.duplicates:
        logger.info("content already announced, not again: %s", url)
    for url in result.waiting:
        logger.info("still settling (checked again next run): %s", url)
    return {
        "location": location,
        "state_file": str(state),
        "announced": [a.payload() for a in result.announced],
        "duplicates": result.duplicates,
        "waiting": result.waiting,
    }
