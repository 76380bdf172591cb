"""Reliability (issue [2-2]): stage results are JSON records that are never unpickled; a damaged cached result is a
cache miss, never a hang; the training child dies with its parent and locks its run folder; a damaged workspace
file is a clear error naming the file and the fix."""

from __future__ import annotations

import base64
import fcntl
import json
import logging
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

DEMO = REPO / "configs" / "demo.yaml"


def _sets(ws: Path, data: Path, model: Path) -> list[str]:
    return [
        f"workspace={ws}",
        f"data.source={data}",
        f"model.name_or_path={model}",
        "training.epochs=1",
        "training.effective_batch_size=8",
        "data.max_length=32",
        "registry.name=toy",
        "training.learning_rate=0.001",
    ]


def _run(cfg):
    import flows.finetune as ff

    state = ff.finetune(cfg, return_state=True)
    result = state.result(raise_on_failure=False)
    summary = result if isinstance(result, dict) else getattr(result, "run_summary", {})
    return state, {k: v["state"] for k, v in dict(summary).get("tasks", {}).items()}


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def done(prefect_harness, tmp_path_factory, tiny_bert) -> dict:
    """One completed run (every stage cached from here on); each test leaves it completed and cached again."""
    base = tmp_path_factory.mktemp("reliability")
    ws, data = base / "ws", write_csv(base / "data" / "train.csv", toy_rows(90))
    sets = _sets(ws, data, tiny_bert)
    cfg = load_config(DEMO, sets)
    state, states = _run(cfg)
    assert state.is_completed() and set(states.values()) == {"Completed"}, states
    return {"ws": ws, "cfg": cfg, "sets": sets, "base": base}


def _stored(ws: Path, stage: str) -> tuple[Path, Path]:
    """(cache record, stored result) of a stage: one of each after a completed run."""
    (meta,) = (ws / "prefect" / "cache-keys").glob(f"{stage}-*")
    return meta, ws / "prefect" / "results" / meta.name


class _TouchOnUnpickle:
    """Unpickling this creates a marker file: proof that a stored result was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ---- 2. stage results are JSON records, never unpickled ---------------------------------------------------------


def test_stage_records_round_trip_as_json_and_only_allow_listed_records_load():
    from tasks.caching import RecordError, RecordSerializer, StageError
    from tasks.stages import PlanRecord
    from tasks.training.launch import TrainResult

    s = RecordSerializer()
    for obj in (
        PlanRecord("/p.json", "k", "lora", None, "search pending"),
        TrainResult("/r", "k", "full", "/r/model", 1, 0.5, 1, 12, 0, 3.0, oom_backoffs=[{"from_micro_batch": 8}]),
    ):
        blob = s.dumps(obj)
        assert json.loads(blob)["record"] == type(obj).__name__  # plain JSON, readable by anyone
        assert s.loads(blob) == obj
    bad = [
        b"\x80\x04garbage",
        json.dumps({"record": "subprocess.Popen", "data": {"args": "true"}}).encode(),
        json.dumps({"record": "PlanRecord", "data": {"path": "x", "surprise": 1}}).encode(),
        json.dumps({"record": "PlanRecord", "data": {"path": "x"}}).encode(),
    ]
    for blob in bad:
        with pytest.raises(RecordError):
            s.loads(blob)
    with pytest.raises(Exception, match="not a stage record"):
        s.dumps({"a": 1})
    failure = s.loads(s.dumps(KeyError("boom")))  # Prefect stores a failed attempt's exception: type and message
    assert isinstance(failure, StageError) and str(failure) == "KeyError: 'boom'"


def test_every_allow_listed_record_names_a_dataclass_where_it_says():
    """A renamed or moved record class must fail here, not silently stop a stage from being cached."""
    import importlib
    from dataclasses import is_dataclass

    from tasks.caching import STAGE_RECORDS

    for name, module in STAGE_RECORDS.items():
        assert is_dataclass(getattr(importlib.import_module(module), name, None)), f"{module}.{name}"


@pytest.mark.flow
def test_a_planted_pickle_result_is_never_unpickled_and_the_stage_recomputes(done, caplog):
    import cloudpickle
    import prefect

    ws, marker = done["ws"], done["base"] / "unpickled.marker"
    for stage in ("train", "evaluate"):
        meta, result = _stored(ws, stage)
        record = {
            "storage_key": str(result),
            "expiration": None,
            "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
            "prefect_version": prefect.__version__,
            "storage_block_id": None,
        }
        meta.write_text(json.dumps(record))
        result.write_bytes(base64.encodebytes(cloudpickle.dumps(_TouchOnUnpickle(marker))))
    caplog.set_level(logging.WARNING, logger="finetune.caching")
    state, states = _run(done["cfg"])
    assert not marker.exists(), "a stored result was unpickled"
    assert state.is_completed(), states
    assert states["train"] == "Completed" and states["evaluate"] == "Completed", states
    assert states["prepare-data"] == "Cached" and states["register"] == "Cached", states
    assert any(_stored(ws, "train")[0].name in r.getMessage() for r in caplog.records), caplog.text
    meta, result = _stored(ws, "train")
    assert json.loads(meta.read_text())["serializer"]["type"] == "finetune-record"
    assert json.loads(result.read_text())["record"] == "TrainResult"


# ---- 6. a damaged cached result is a miss, not a hang -----------------------------------------------------------


@pytest.mark.flow
@pytest.mark.timeout(300)
def test_damaged_cached_results_are_recomputed_instead_of_hanging(done, caplog):
    ws = done["ws"]
    _stored(ws, "train")[1].write_bytes(b"\x00\x01 not a record \xff")
    _, evaluated = _stored(ws, "evaluate")
    evaluated.write_bytes(evaluated.read_bytes()[: len(evaluated.read_bytes()) // 2])  # half-truncated
    caplog.set_level(logging.WARNING, logger="finetune.caching")
    state, states = _run(done["cfg"])
    assert state.is_completed(), states
    assert states["train"] == "Completed" and states["evaluate"] == "Completed", states
    assert states["plan"] == "Cached" and states["export"] == "Cached", states
    assert evaluated.name in caplog.text
    state, states = _run(done["cfg"])  # and stored anew: the next run is all cached
    assert set(states.values()) == {"Cached"}, states


def _locks(tmp_path: Path, **kw):
    from tasks.caching import ProcessLockManager

    return ProcessLockManager(lock_files_directory=tmp_path / "locks", **kw)


def test_a_retry_in_the_same_thread_does_not_wait_on_its_own_earlier_lock(tmp_path):
    """Prefect leaves a transaction's lock behind when reading its cached result fails; the retry (same process,
    same thread, a new holder) used to wait for it forever."""
    locks = _locks(tmp_path)
    assert locks.acquire_lock("train-k", holder="attempt-1")
    t0 = time.monotonic()
    assert locks.acquire_lock("train-k", holder="attempt-2", acquire_timeout=3)
    assert time.monotonic() - t0 < 2
    assert locks.is_lock_holder("train-k", "attempt-2")


def test_a_live_lock_of_another_thread_still_makes_a_second_holder_wait(tmp_path):
    locks = _locks(tmp_path)
    assert locks.acquire_lock("k", holder="first")
    got = []
    t = threading.Thread(target=lambda: got.append(locks.acquire_lock("k", holder="second", acquire_timeout=0.5)))
    t.start()
    t.join()
    assert got == [False]
    locks.release_lock("k", "first")
    assert locks.acquire_lock("k", holder="second", acquire_timeout=1)


def test_a_lock_left_by_a_finished_thread_or_past_its_hold_time_is_stale(tmp_path):
    locks = _locks(tmp_path, hold_timeout_s=0.5)
    t = threading.Thread(target=lambda: locks.acquire_lock("a", holder="gone"))
    t.start()
    t.join()
    assert locks.acquire_lock("a", holder="me", acquire_timeout=1)  # its holder's thread has ended

    done, release = threading.Event(), threading.Event()

    def slow_holder():  # alive throughout, but holds past its hold time
        locks.acquire_lock("b", holder="slow")
        done.set()
        release.wait(10)
        locks.release_lock("b", "slow")  # late: harmless, and leaves the next holder's lock alone

    t = threading.Thread(target=slow_holder)
    t.start()
    done.wait(5)
    t0 = time.monotonic()
    assert locks.acquire_lock("b", holder="next", acquire_timeout=5)
    assert 0.3 < time.monotonic() - t0 < 3  # waited for the expiry, not forever
    release.set()
    t.join()
    assert locks.is_lock_holder("b", "next")


# ---- 7. the training child dies with its parent and locks its run folder -----------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie no longer runs


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _prepared_run(tmp_path: Path, model: Path, *sets: str) -> tuple[Path, Path]:
    from conftest import prepare_run

    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset

    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    cfg = load_config(None, [*_sets(tmp_path / "ws", data, model), "training.epochs=3", *sets])
    prep = prepare_dataset(cfg)
    return tmp_path / "ws", prepare_run(cfg, prep.path, tokenize_dataset(prep.path, str(model), cfg).path)


TRAIN_SCRIPT = """
import sys
from tasks.plan import RunPlan
from tasks.training.launch import train
from tasks.workspace import Workspace
train(RunPlan.read(sys.argv[1]), Workspace.at(sys.argv[2]))
"""


def _kill_parent_and_watch(tmp_path: Path, ws: Path, run: Path, settle: float) -> dict:
    """Start train() in a parent process, SIGKILL the parent once its child trains; which processes outlive it."""
    env = dict(os.environ, FINETUNE_TEST_STEP_DELAY_S="0.5", PYTHONPATH=str(REPO))
    with open(tmp_path / "parent.log", "w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-c", TRAIN_SCRIPT, str(run), str(ws)], cwd=REPO, env=env, stdout=log, stderr=log
        )
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
            assert parent.poll() is None, (tmp_path / "parent.log").read_text()
            time.sleep(0.2)
        assert (run / "metrics.jsonl").exists(), "the child never trained"
        time.sleep(settle)
        child = json.loads((run / "worker.json").read_text())["pid"]
        seen = [child, *_children(child)]
        assert all(_alive(p) for p in seen)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.1)
        return {"seen": seen, "alive": [p for p in seen if _alive(p)]}
    finally:
        for p in seen:  # only what this test started
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.child
@pytest.mark.timeout(300)
def test_the_training_child_dies_with_its_killed_parent(tmp_path, tiny_bert):
    ws, run = _prepared_run(tmp_path, tiny_bert)
    out = _kill_parent_and_watch(tmp_path, ws, run, settle=0.5)
    assert out["alive"] == [], f"orphaned training processes {out['alive']} still write {run}"


@pytest.mark.child
@pytest.mark.timeout(400)
def test_torchrun_launcher_and_its_workers_die_with_their_killed_parent(tmp_path, tiny_bert):
    ws, run = _prepared_run(tmp_path, tiny_bert, "training.processes=2")
    out = _kill_parent_and_watch(tmp_path, ws, run, settle=1.0)
    assert len(out["seen"]) >= 3, out  # the launcher and its two workers
    assert out["alive"] == [], f"orphaned training processes {out['alive']} still write {run}"


def test_a_second_training_child_for_a_locked_run_folder_exits_with_a_clear_message(tmp_path):
    from tasks.training import worker

    run = tmp_path / "run"
    run.mkdir()
    with open(run / worker.CHILD_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = subprocess.run(
            [sys.executable, "-m", "tasks.training.worker", str(run)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), FINETUNE_CHILD_LOCK_WAIT_S="1"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == worker.EXIT_BUSY, res.stderr
    assert "another training process" in res.stderr and str(run) in res.stderr, res.stderr


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    """The child appends metrics.jsonl line by line; killed (or out of disk) mid-append, the resume must not fail
    on the torn last line: it is dropped with the lines after the checkpoint."""
    from tasks.training.session import last_eval, rewrite_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"type": "step", "step": 1, "loss": 1.0}, {"type": "eval", "step": 1, "val_loss": 0.9}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "step", "step": 2, "lo')
    assert last_eval(path) == lines[1]
    rewrite_metrics(path, upto_step=1)
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == lines


# ---- 8. a damaged workspace file is a clear error ---------------------------------------------------------------


def _cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _truncated(path: Path):
    """Truncate a JSON file to half for the duration of a `with` block."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        saved = path.read_bytes()
        path.write_bytes(saved[: len(saved) // 2])
        try:
            yield path
        finally:
            path.write_bytes(saved)

    return cm()


def _assert_clear(res: subprocess.CompletedProcess, path: Path) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-4000:]
    assert str(path) in res.stderr and "fix:" in res.stderr, res.stderr[-4000:]
    assert "Traceback" not in res.stderr and "JSONDecodeError" not in res.stderr.replace(
        "not readable JSON (JSONDecodeError", ""
    ), res.stderr[-4000:]


@pytest.mark.flow
def test_damaged_registry_files_are_clear_errors(done, tmp_path):
    from tasks.release.registry import promote

    ws = done["ws"]
    reg = ws / "registry" / "toy"
    if not (reg / "aliases.json").exists():  # the gate kept version 1 out of production: promote it by hand
        promote(ws, "toy", 1, "test")
    with _truncated(reg / "aliases.json") as p:
        _assert_clear(_cli("registry", "list", "toy", "-w", str(ws), home=tmp_path / "h"), p)
        _assert_clear(_cli("registry", "show", "toy", "1", "-w", str(ws), home=tmp_path / "h"), p)
    with _truncated(reg / "versions" / "1" / "version.json") as p:
        _assert_clear(_cli("registry", "show", "toy", "1", "-w", str(ws), home=tmp_path / "h"), p)


@pytest.mark.flow
@pytest.mark.parametrize("damaged", ["training_summary.json", "plan.json"])
def test_a_rerun_over_a_damaged_run_file_is_a_clear_error(done, tmp_path, damaged):
    (run,) = (done["ws"] / "runs").iterdir()
    args = ["run", str(DEMO)] + [a for s in done["sets"] for a in ("--set", s)]
    with _truncated(run / damaged) as p:
        _assert_clear(_cli(*args, home=tmp_path / "h", timeout=400), p)
