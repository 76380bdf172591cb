"""The finetune flow: correct caching, retries, a training retry that resumes, concurrency, artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, toy_rows, write_csv

from tasks.config_loading import load_config

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "data" / "train.csv", toy_rows(90))


def _cfg(workspace: Path, data: Path, model: Path, *sets: str):
    return load_config(
        None,
        [
            f"workspace={workspace}",
            f"data.source={data}",
            f"model.name_or_path={model}",
            "training.epochs=1",
            "training.effective_batch_size=8",
            "data.max_length=32",
            "registry.name=toy",
            "registry.must_beat=[]",  # tiny model, toy data: TF-IDF is near perfect; these tests are about the flow
            "training.search.candidates=[0.0003, 0.003]",
            "training.search.rung_steps=[2]",
            *sets,
        ],
    )


def _run(cfg):
    import flows.finetune as ff

    state = ff.finetune(cfg, return_state=True)
    result = state.result(raise_on_failure=False)
    summary = result if isinstance(result, dict) else getattr(result, "run_summary", {})  # a failed flow's error
    return state, dict(summary)


def _states(summary) -> dict[str, str]:
    return {k: v["state"] for k, v in summary["tasks"].items()}


STAGES = ["prepare-data", "tokenize", "plan", "lr-search", "train", "evaluate", "export", "register"]


def test_rerun_is_all_cached_and_byte_or_eval_changes_rerun_the_right_stages(
    prefect_harness, tmp_path, toy_csv, tiny_bert
):
    ws = tmp_path / "ws"
    cfg = _cfg(ws, toy_csv, tiny_bert)
    state, first = _run(cfg)
    assert state.is_completed(), state
    assert _states(first) == {s: "Completed" for s in STAGES}
    assert first["version"] == 1 and first["promoted"] is True

    state, second = _run(cfg)
    assert state.is_completed() and _states(second) == {s: "Cached" for s in STAGES}
    assert second["version"] == 1  # the same model is not registered twice
    assert sum(v["seconds"] for v in second["tasks"].values()) < 0.5 * sum(
        v["seconds"] for v in first["tasks"].values()
    )

    # a deleted output folder turns its cache hit into a miss
    import shutil

    shutil.rmtree(Path(first["folders"]["evaluation"]))
    state, third = _run(cfg)
    assert _states(third)["evaluate"] == "Completed" and _states(third)["train"] == "Cached"

    # changing only an evaluation setting re-runs evaluation onward, not training
    state, eval_only = _run(_cfg(ws, toy_csv, tiny_bert, "evaluation.batch_size=7"))
    s = _states(eval_only)
    assert [s[k] for k in ("prepare-data", "tokenize", "train")] == ["Cached"] * 3
    assert s["evaluate"] == "Completed"

    # one changed data byte re-runs data preparation and everything after it
    toy_csv.write_bytes(toy_csv.read_bytes().replace(b"good", b"Good", 1))
    state, changed = _run(cfg)
    assert state.is_completed() and _states(changed) == {s: "Completed" for s in STAGES}


def test_transient_failure_is_retried(prefect_harness, tmp_path, toy_csv, tiny_bert, monkeypatch):
    import tasks.evaluation.evaluate as ev

    real, calls = ev.evaluate_run, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("transient: network file system hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_run", flaky)
    state, summary = _run(_cfg(tmp_path / "ws", toy_csv, tiny_bert))
    assert state.is_completed() and len(calls) == 2
    assert _states(summary)["evaluate"] == "Completed"


def test_training_retry_resumes_from_checkpoint(prefect_harness, tmp_path, toy_csv, tiny_bert, monkeypatch):
    """SIGKILL the training child after its first checkpoint: the task's retry resumes, one version registered."""
    monkeypatch.setenv("FINETUNE_TEST_STEP_DELAY_S", "0.3")
    cfg = _cfg(tmp_path / "ws", toy_csv, tiny_bert, "training.epochs=2", "training.save_every_steps=2")
    runs = tmp_path / "ws" / "runs"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for run in runs.glob("*") if runs.exists() else []:
                if list((run / "checkpoints").glob("step-*")) and (run / "worker.json").exists():
                    pid = json.loads((run / "worker.json").read_text())["pid"]
                    try:
                        os.killpg(pid, signal.SIGKILL)
                        killed["pid"], killed["run"] = pid, run
                    except ProcessLookupError:
                        pass
                    return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    state, summary = _run(cfg)
    t.join(timeout=5)
    assert killed, "the training child was never seen with a checkpoint"
    assert state.is_completed(), state
    summary_file = json.loads((killed["run"] / "training_summary.json").read_text())
    assert summary_file["resumed_from_step"] >= 2
    versions = list((tmp_path / "ws" / "registry" / "toy" / "versions").iterdir())
    assert len(versions) == 1


def test_artifacts_exist_with_stable_keys(prefect_harness, tmp_path, toy_csv, tiny_bert):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    state, summary = _run(_cfg(tmp_path / "ws", toy_csv, tiny_bert, "registry.name=art-check"))
    assert state.is_completed()
    keys = [
        "art-check-test-metrics",
        "art-check-confusion-matrix",
        "art-check-report",
        "art-check-model",
        "art-check-training-progress",
    ]

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    found = {a.key: a for a in asyncio.run(read())}
    assert set(keys) <= set(found), set(keys) - set(found)
    report = found["art-check-report"].data
    assert "data:image/png;base64," in report and "Test metrics" in report and "promoted" in report
    table = found["art-check-test-metrics"].data
    table = json.loads(table) if isinstance(table, str) else table
    f1 = [row for row in table if row["metric"] == "f1_macro"]
    assert f1 and isinstance(f1[0]["tfidf"], float) and isinstance(f1[0]["majority"], float)


def _cli_run(ws: Path, data: Path, model: Path, home: Path, summary: Path) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "tasks.cli",
        "run",
        str(REPO / "configs" / "demo.yaml"),
        "--set",
        f"workspace={ws}",
        "--set",
        f"data.source={data}",
        "--set",
        f"model.name_or_path={model}",
        "--set",
        "training.epochs=1",
        "--set",
        "training.effective_batch_size=8",
        "--set",
        "data.max_length=32",
        "--set",
        "data.task=auto",
        "--set",
        "registry.name=toy",
        "--summary-json",
        str(summary),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_concurrent_runs_do_the_work_once(tmp_path, toy_csv, tiny_bert):
    ws = tmp_path / "ws"
    procs = [_cli_run(ws, toy_csv, tiny_bert, tmp_path / f"home{i}", tmp_path / f"s{i}.json") for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=False):
        assert p.returncode == 0, out[-3000:]
    summaries = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(2)]
    trains = sorted(s["tasks"]["train"]["state"] for s in summaries)
    assert trains == ["Cached", "Completed"], trains
    assert len(list((ws / "registry" / "toy" / "versions").iterdir())) == 1
    assert len(list((ws / "runs").iterdir())) == 1
    for s in summaries:
        assert {"state", "wall_s", "tasks", "metrics", "baselines", "model_dir", "version", "promoted"} <= set(s)
        assert s["state"] == "Completed" and s["version"] == 1


def test_auto_method_deleted_run_folder_trains_again(prefect_harness, tmp_path, toy_csv, tiny_bert):
    """method.kind auto used to key the train stage on the workspace alone: a deleted run folder was still a hit.
    The plan resolves auto before any key is made, so the key names the real run folder."""
    import shutil

    cfg = _cfg(tmp_path / "ws", toy_csv, tiny_bert, "method.kind=auto", "training.learning_rate=0.001")
    state, first = _run(cfg)
    assert state.is_completed() and _states(first)["train"] == "Completed"
    plan = json.loads((Path(first["folders"]["run"]) / "plan.json").read_text())
    assert plan["method"] == "full" and plan["method_reason"].startswith("auto:")
    shutil.rmtree(first["folders"]["run"])
    state, again = _run(cfg)
    assert state.is_completed() and _states(again)["train"] == "Completed", _states(again)
    assert (Path(again["folders"]["run"]) / "model").is_dir()


def test_cached_rerun_reads_no_weight_file(prefect_harness, tmp_path, toy_csv, tiny_bert):
    """The base model is hashed once; a fully cached rerun (a new process in real use: the in-process memo is
    cleared here) reuses the workspace's size+mtime memo and hashes no byte of any weight file."""
    import tasks.model.base as base

    cfg = _cfg(tmp_path / "ws", toy_csv, tiny_bert, "training.learning_rate=0.001")
    base._MEMO.clear()
    base.BYTES_HASHED["total"] = 0
    state, first = _run(cfg)
    weights = sum(f.stat().st_size for f in tiny_bert.glob("*.safetensors"))
    assert state.is_completed() and base.BYTES_HASHED["total"] >= weights  # hashed once, on the first run
    base._MEMO.clear()
    base.BYTES_HASHED["total"] = 0
    state, second = _run(cfg)
    assert state.is_completed() and set(_states(second).values()) == {"Cached"}
    assert base.BYTES_HASHED["total"] == 0
    # touching the weights (same bytes, new mtime) makes the memo hash them again: stale facts are never trusted
    for f in tiny_bert.glob("*.safetensors"):
        os.utime(f)
    base._MEMO.clear()
    base.model_fingerprint(cfg.model, memo_dir=Path(cfg.workspace) / "fingerprints")
    assert base.BYTES_HASHED["total"] >= weights
