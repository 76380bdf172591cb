"""What the flow costs beside the work (benchmarks/pipeline_overhead.py): the flow's end does not wait for Prefect's
heartbeat thread (it sleeps in whole seconds; joining it cost up to 1 s per run), the training progress reaches the
dashboard through one API client at a bounded rate, and the CLI's progress records stay out of the run log."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, toy_rows, write_csv


class _Engine:
    """The parts of a flow run engine that prefect.flow_engine._send_heartbeats reads."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger("test.heartbeats")

    def __init__(self):
        self.beats = 0

    def _build_heartbeat_event_template(self):
        return None, None

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats += 1


def test_the_heartbeat_thread_is_stopped_without_waiting_for_its_sleep():
    from prefect import flow_engine

    import flows.finetune as ff

    assert ff.HEARTBEATS_WITHOUT_JOIN
    engine, before = _Engine(), set(threading.enumerate())
    with flow_engine._send_heartbeats(engine):
        deadline = time.monotonic() + 5
        while not engine.beats and time.monotonic() < deadline:  # the thread has emitted and gone to sleep
            time.sleep(0.01)
        started = [t for t in threading.enumerate() if t not in before]
    assert engine.beats == 1 and len(started) == 1
    thread = started[0]
    # Prefect's own join would have waited for the current 1 s sleep to end: the thread would be gone by now
    assert thread.is_alive() and thread.daemon
    thread.join(timeout=3)  # it stops by itself at its next wake-up, without another heartbeat
    assert not thread.is_alive() and engine.beats == 1


def test_applying_it_twice_keeps_one_wrapper():
    from prefect import flow_engine

    import flows.finetune as ff

    first = flow_engine._send_heartbeats
    assert ff._heartbeats_without_join() and flow_engine._send_heartbeats is first


def test_progress_records_stay_out_of_the_run_log():
    from tasks.reporting.progress import library_logs_to, progress_log

    class RunLog:
        def __init__(self):
            self.lines = []

        def log(self, level, fmt, *args):
            self.lines.append(fmt % args)

    run_log = RunLog()
    with library_logs_to(run_log):
        progress_log.info("train 12.5%", extra={"stage": "train", "state": "Progress"})
        logging.getLogger("finetune.train").warning("resumed from step 4")
    assert run_log.lines == ["[finetune.train] resumed from step 4"]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.flow
def test_training_progress_reaches_the_dashboard_through_one_client_at_a_bounded_rate(
    prefect_harness, tmp_path, monkeypatch
):
    from prefect import flow
    from prefect.client.orchestration import SyncPrefectClient, get_client

    from tasks.reporting.artifacts import artifact_key
    from tasks.reporting.progress import progress_log, training_progress

    updates, clients, reports = [], [], []
    real_update, real_enter = SyncPrefectClient.update_artifact, SyncPrefectClient.__enter__

    def update(self, artifact_id, artifact):
        updates.append(artifact.data)
        return real_update(self, artifact_id=artifact_id, artifact=artifact)

    def enter(self):
        if threading.current_thread().name == "training-progress":
            clients.append(self)
        return real_enter(self)

    monkeypatch.setattr(SyncPrefectClient, "update_artifact", update)
    monkeypatch.setattr(SyncPrefectClient, "__enter__", enter)

    class Seen(logging.Handler):
        def emit(self, record):
            reports.append(record.getMessage())

    handler = Seen()
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    run = tmp_path / "run"
    run.mkdir()

    @flow
    def trains():
        with training_progress("probe", run, epochs=4, every_s=0.05, artifact_every_s=0.6):
            for step in range(1, 13):
                with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"type": "step", "step": step, "epoch": step / 3, "loss": 1 / step}) + "\n")
                time.sleep(0.15)

    try:
        t0 = time.monotonic()
        trains()
        seconds = time.monotonic() - t0
    finally:
        progress_log.removeHandler(handler)
    assert len(reports) >= 8  # the CLI's view follows nearly every step
    mid = [u for u in updates if 0 < u < 100]
    assert mid, "the dashboard's bar never moved during training"
    assert len(mid) <= seconds / 0.6 + 1 < len(reports)  # at most one update per artifact_every_s
    assert len(clients) == 1  # the progress thread opens one client for the whole training, not one per update
    with get_client(sync_client=True) as client:
        art = [a for a in client.read_artifacts(limit=100) if a.key == artifact_key("probe", "training-progress")]
    assert art and art[0].data == 100 and art[0].description == "training finished"


def test_flow_parameters_are_stored_as_prefects_own_serializer_would_store_them():
    """The flow serializes its parameters with pydantic instead of FastAPI's jsonable_encoder (whose import cost
    0.1 s of a cached rerun): the dashboard must receive the same JSON, and a value of another kind still goes
    through Prefect's serializer."""
    from fastapi.encoders import jsonable_encoder

    from flows.finetune import finetune
    from tasks.config_loading import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", ["training.learning_rate=3e-4", "data.max_rows=50"])
    params = {"config": cfg, "data_source": "/drop/new.csv", "data_sha256": None}
    ours = finetune.serialize_parameters(params)
    assert ours == {k: jsonable_encoder(v) for k, v in params.items()}
    assert ours["config"]["training"]["learning_rate"] == 3e-4 and json.loads(json.dumps(ours)) == ours
    odd = {"config": cfg, "data_source": Path("/drop/new.csv"), "data_sha256": None}
    assert finetune.serialize_parameters(odd)["data_source"] == "/drop/new.csv"  # Prefect's path, unchanged


@pytest.mark.flow
def test_a_cached_rerun_through_the_cli_imports_nothing_heavy_and_exits_with_its_status(
    prefect_harness, tmp_path, tiny_bert
):
    """`finetune run` twice in fresh processes against one server: the rerun is all Cached, imports neither torch,
    transformers, numpy nor FastAPI, and still ends like any Python process (its output and summary complete,
    exit status 0; a flow failed by bad input exits 2) although it skips the interpreter's module teardown."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "home"))
    sets = [f"workspace={tmp_path / 'ws'}", f"data.source={data}", f"model.name_or_path={tiny_bert}"]
    sets += ["training.epochs=1", "data.max_length=32", "registry.must_beat=[]"]
    sets += ["training.search.candidates=[0.0003, 0.003]", "training.search.rung_steps=[2]"]  # the demo's path

    def cli(*extra: str) -> tuple[subprocess.CompletedProcess, dict]:
        summary = tmp_path / "summary.json"
        summary.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tasks.cli", "run", str(REPO / "configs" / "demo.yaml")]
        cmd += ["--summary-json", str(summary)] + [a for s in [*sets, *extra] for a in ("--set", s)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        return done, (json.loads(summary.read_text()) if summary.exists() else {})

    first, s1 = cli()
    assert first.returncode == 0, first.stderr[-3000:]
    again, s2 = cli()
    assert again.returncode == 0, again.stderr[-3000:]
    assert {v["state"] for v in s2["tasks"].values()} == {"Cached"} and "lr-search" in s2["tasks"]
    assert s2["heavy_modules_imported"] == [] and "torch" in s1["heavy_modules_imported"]
    assert again.stdout.rstrip().splitlines()[-1].startswith("  report: ")  # stdout flushed before the fast exit
    failed, s3 = cli("data.text_column=no_such_column")
    assert failed.returncode == 2 and s3["state"] == "Failed" and "no_such_column" in failed.stderr


@pytest.mark.parametrize("watched", [False, True])
def test_the_fast_exit_keeps_the_status_and_stands_aside_for_profilers(watched):
    """After a flow (Prefect imported) the CLI ends with os._exit and the same status, atexit handlers run first;
    under a profiler or tracer (cProfile writes its file after the program returns) it exits the usual way."""
    import subprocess
    import sys

    code = (
        "import atexit, sys, prefect\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        + ("sys.settrace(lambda *a: None)\n" if watched else "")
        + "from tasks.cli.app import _exit_without_teardown\n"
        "_exit_without_teardown(5)\n"
        "print('returned', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "atexit ran" in done.stdout
    if watched:
        assert "returned" in done.stdout and done.returncode == 0
    else:
        assert "returned" not in done.stdout and done.returncode == 5
