"""Fault injection: a full disk during export, the whole flow process SIGKILLed mid-export, an unwritable checkpoint
folder, a truncated checkpoint, two processes promoting at the same moment. After every fault: a clear error,
nothing half-written visible in the registry, and a rerun that completes.

(SIGKILL of the training child mid-epoch, resumed by the task's retry, is tests/test_flow.py::
test_training_retry_resumes_from_checkpoint.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, toy_rows, write_csv

RERUN_TIMEOUT_S = 45  # a rerun whose stages up to export are cached takes ~11 s here


# ---- helpers ---------------------------------------------------------------------------------------------


def cli_run(ws: Path, data: Path, model: Path, home: Path, out: Path, prelude: str = "") -> subprocess.Popen:
    """`finetune run` in its own process group (own PREFECT_HOME, ephemeral server); `prelude` runs first."""
    env = dict(os.environ, PREFECT_HOME=str(home), HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    args = [
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
        "registry.name=toy",
        "--set",  # tiny model, toy data: TF-IDF is near perfect; these tests are about faults, not the quality gate
        "registry.must_beat=[]",
    ]
    code = f"import sys\n{prelude}\nsys.argv = ['finetune'] + {args!r}\nfrom tasks.cli import main\nmain()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait for the run; None (and the whole process group killed) when it is still running after timeout."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def versions(ws: Path, name: str = "toy") -> list[str]:
    vdir = ws / "registry" / name / "versions"
    return sorted(p.name for p in vdir.iterdir()) if vdir.is_dir() else []


def finished_exports(ws: Path) -> list[Path]:
    exp = ws / "exports"
    return sorted(p for p in exp.iterdir() if not p.name.startswith(".")) if exp.is_dir() else []


def user_error(log: str) -> str:
    """The CLI's own `error:` line(s), without Prefect's log lines."""
    lines = [ln for ln in log.splitlines() if " | " not in ln[:16]]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    return "\n".join(lines[starts[-1] :]) if starts else ""


DISK_FULL_AT_EXPORT = """
import errno, os
from pathlib import Path
import tasks.release.export as ex
_real = ex.write_json
def _full(path, obj, *a, **k):  # the disk fills up while the export folder is being written
    if Path(path).name == "lineage.json":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _real(path, obj, *a, **k)
ex.write_json = _full
"""


# ---- export: a full disk, then SIGKILL mid-export, then a rerun (one workspace, in that order) -----------


@pytest.fixture(scope="module")
def export_faults(tmp_path_factory, tiny_bert) -> dict:
    """Run 1 hits a full disk while writing the export; run 2 (training cached) is SIGKILLed, whole process
    group, as soon as the export's temporary folder appears; run 3 is a plain rerun. Facts after each."""
    base = tmp_path_factory.mktemp("export-faults")
    ws, home = base / "ws", base / "prefect-home"
    data = write_csv(base / "data" / "train.csv", toy_rows(90))
    facts: dict = {"ws": ws}

    p = cli_run(ws, data, tiny_bert, home, base / "run1.log", prelude=DISK_FULL_AT_EXPORT)
    facts["disk_full"] = {
        "code": finish(p, 300),
        "log": (base / "run1.log").read_text(),
        "versions": versions(ws),
        "exports": sorted(q.name for q in (ws / "exports").glob("*")) if (ws / "exports").exists() else [],
        "aliases": (ws / "registry" / "toy" / "aliases.json").exists(),
    }

    before = set((ws / "exports").glob(".*.tmp-*"))
    p = cli_run(ws, data, tiny_bert, home, base / "run2.log")
    seen, deadline = None, time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:  # the signal: this run's export temp folder appears
        tmps = [t for t in (ws / "exports").glob(".*.tmp-*") if t not in before] if (ws / "exports").is_dir() else []
        if tmps:
            kill_group(p)
            seen = tmps
            break
        time.sleep(0.01)
    if seen is None:
        kill_group(p)
    facts["kill"] = {
        "seen": seen,
        "code": p.returncode,
        "log": (base / "run2.log").read_text(),
        "versions": versions(ws),
        "finished_exports": finished_exports(ws),
        "aliases": (ws / "registry" / "toy" / "aliases.json").exists(),
        "registry_entries": sorted(str(q.relative_to(ws)) for q in ws.glob("registry/**/*")),
    }

    t0 = time.monotonic()
    p = cli_run(ws, data, tiny_bert, home, base / "run3.log")
    facts["rerun"] = {
        "code": finish(p, RERUN_TIMEOUT_S),
        "seconds": time.monotonic() - t0,
        "log": (base / "run3.log").read_text(),
        "versions": versions(ws),
        "finished_exports": finished_exports(ws),
        "locks": sorted(ws.glob("prefect/locks/*.lock")),
    }
    return facts


@pytest.mark.flow
def test_disk_full_while_writing_the_export_is_a_clear_error_and_registers_nothing(export_faults):
    f = export_faults["disk_full"]
    assert f["code"] == 1, f["log"][-3000:]
    msg = user_error(f["log"])
    assert msg.startswith("error: the run failed:") and "No space left on device" in msg and "lineage.json" in msg, msg
    assert "export" in msg and "Traceback" not in msg
    assert f["versions"] == [] and not f["aliases"]
    assert f["exports"] == [], f"the failed export left {f['exports']}"  # the temporary folder was removed
    assert "register" not in [ln.split()[0] for ln in f["log"].splitlines() if ln.startswith("  ") and ln.split()]


@pytest.mark.flow
def test_sigkill_mid_export_leaves_no_partial_version(export_faults):
    k = export_faults["kill"]
    assert k["seen"], "the export's temporary folder never appeared"
    assert k["code"] == -signal.SIGKILL
    assert k["versions"] == [] and not k["aliases"], k["registry_entries"]
    assert k["finished_exports"] == []  # only the dot-prefixed temporary folder, which nothing reads as an export


@pytest.mark.flow
def test_rerun_after_sigkill_mid_export_completes_with_one_version(export_faults):
    r = export_faults["rerun"]
    assert r["code"] == 0, (
        f"rerun still running after {RERUN_TIMEOUT_S} s (stale locks: {r['locks']})"
        if r["code"] is None
        else r["log"][-3000:]
    )
    assert r["versions"] == ["1"]
    ws = export_faults["ws"]
    assert json.loads((ws / "registry" / "toy" / "aliases.json").read_text())["production"] == 1
    assert len(r["finished_exports"]) == 1 and (r["finished_exports"][0] / "lineage.json").is_file()


# ---- training: an unwritable checkpoint folder, a truncated checkpoint --------------------------------------


def _train_cfg(ws: Path, data: Path, model: Path, *sets: str):
    from tasks.config_loading import load_config

    return load_config(
        None,
        [
            f"workspace={ws}",
            f"data.source={data}",
            f"model.name_or_path={model}",
            "data.max_length=32",
            "training.effective_batch_size=8",
            "training.epochs=1",
            "training.early_stopping.patience=10",
            "training.learning_rate=default",
            *sets,
        ],
    )


def _prepared(cfg, model: Path) -> tuple[str, str]:
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset

    prep = prepare_dataset(cfg)
    return prep.path, tokenize_dataset(prep.path, str(model), cfg).path


def _unfinish(run: Path) -> None:
    """Remove what marks a run finished (model/, training_summary.json): the next train_model resumes."""
    shutil.rmtree(run / "model", ignore_errors=True)
    (run / "training_summary.json").unlink(missing_ok=True)


def _last_log(run: Path) -> str:
    return max((run / "logs").glob("attempt-*.log"), key=lambda p: int(p.stem.split("-")[1])).read_text()


def test_unwritable_checkpoint_folder_is_a_clear_training_error(tmp_path, tiny_bert):
    """A FILE where the checkpoint folder must go (chmod does not stop root): the child fails at its first
    checkpoint; the error names the path; nothing that looks finished is left."""
    from conftest import prepare_run, train_model

    from tasks.training.launch import TrainingError

    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    cfg = _train_cfg(tmp_path / "ws", data, tiny_bert, "training.save_every_steps=2")
    prepared, tokenized = _prepared(cfg, tiny_bert)
    run = prepare_run(cfg, prepared, tokenized)
    (run / "checkpoints").write_text("in the way")
    with pytest.raises(TrainingError) as err:
        train_model(cfg, prepared, tokenized)
    msg = str(err.value)
    assert "training child exited with code" in msg and str(run / "checkpoints") in msg, msg
    assert "FileExistsError" in msg or "NotADirectoryError" in msg, msg
    assert not (run / "model").exists() and not (run / "training_summary.json").exists()


@pytest.mark.child
def test_truncated_checkpoint_is_detected_and_the_previous_one_is_used(tmp_path, tiny_bert):
    from conftest import train_model

    from tasks.training.checkpoints import checkpoint_steps

    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    cfg = _train_cfg(tmp_path / "ws", data, tiny_bert, "training.save_every_steps=3")
    prepared, tokenized = _prepared(cfg, tiny_bert)
    first = train_model(cfg, prepared, tokenized)
    run = Path(first.path)
    steps = [s for s, _ in checkpoint_steps(run / "checkpoints")]
    assert len(steps) >= 2, steps
    latest, previous = steps[0], steps[1]

    weights = run / "checkpoints" / f"step-{latest}" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    _unfinish(run)  # as if the crash came before the run finished

    second = train_model(cfg, prepared, tokenized)
    log = _last_log(run)
    assert f"WARNING: checkpoint step-{latest} is unusable" in log and "does not match its recorded sha256" in log, log
    assert f"resuming from step-{previous}" in log, log
    assert second.resumed_from_step == previous and second.global_step == first.global_step
    assert (run / "model").is_dir() and (run / "training_summary.json").is_file()
    assert (run / "checkpoints" / f"corrupt-step-{latest}").is_dir()  # moved aside, kept for a look

    # every checkpoint corrupt: a clean restart from step 0, with a warning per checkpoint
    for _, path in checkpoint_steps(run / "checkpoints"):
        f = path / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    _unfinish(run)
    third = train_model(cfg, prepared, tokenized)
    log = _last_log(run)
    assert log.count("is unusable") >= 2 and "resuming from" not in log, log
    assert third.resumed_from_step == 0 and third.global_step == first.global_step


@pytest.mark.child
def test_truncated_best_checkpoint_is_detected_when_it_is_restored(tmp_path, tiny_bert):
    """The best checkpoint is older than the latest (min_delta makes epoch 1 the best of 2), and it is the one cut
    short: resuming from the intact latest works, but restoring the best at the end must notice and recover."""
    from conftest import train_model

    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    cfg = _train_cfg(tmp_path / "ws", data, tiny_bert, "training.epochs=2", "training.early_stopping.min_delta=100")
    prepared, tokenized = _prepared(cfg, tiny_bert)
    first = train_model(cfg, prepared, tokenized)
    run = Path(first.path)
    best = json.loads((run / "training_summary.json").read_text())["best_step"]
    assert best is not None and best < first.global_step
    weights = run / "checkpoints" / f"step-{best}" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _unfinish(run)

    second = train_model(cfg, prepared, tokenized)
    log = _last_log(run)
    assert "WARNING" in log and f"step-{best}" in log, log
    assert (run / "model").is_dir() and second.global_step == first.global_step


# ---- registry: two processes promoting at the same moment ---------------------------------------------------


def fake_export(ws: Path, value: float, tag: str) -> tuple[Path, Path]:
    """An export + evaluation folder with the files the registry checks (it never loads a model)."""
    from tasks.files import write_json

    exp, ev = ws / "exports" / tag, ws / "evaluations" / tag
    exp.mkdir(parents=True)
    (exp / "model.safetensors").write_bytes(b"weights " + tag.encode())
    write_json(exp / "config.json", {"model_type": "bert"})
    write_json(
        exp / "lineage.json",
        {
            "export_key": tag,
            "method": "full",
            "task": "single_label",
            "test_set_fingerprint": "T1",
            "dataset_fingerprint": "D1",
        },
    )
    write_json(
        ev / "metrics.json",
        {
            "task": "single_label",
            "split": "test",
            "primary_metric": "f1_macro",
            "metrics": {"f1_macro": value},
            "baselines": {"majority": {"metrics": {"f1_macro": 0.0}}, "tfidf": {"metrics": {"f1_macro": 0.0}}},
        },
    )
    return exp, ev


PROMOTER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tasks.config import RunConfig
from tasks.release.registry import register_version
while time.time() < float(sys.argv[5]):
    time.sleep(0.001)
r = register_version(RunConfig(workspace=sys.argv[2], registry={"name": "clf"}), sys.argv[3], sys.argv[4])
print(r.version, r.promoted, r.comparison["decision"])
"""


@pytest.mark.parametrize("values", [(0.70, 0.80), (0.80, 0.70), (0.60, 0.90, 0.75, 0.85)], ids=["up", "down", "four"])
def test_concurrent_promotions_leave_production_consistent_with_the_gate(workspace, values):
    from tasks.release.registry import history, list_versions

    exports = [fake_export(workspace, v, f"e{i}") for i, v in enumerate(values)]
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTER, str(REPO), str(workspace), str(e), str(v), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for e, v in exports
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]

    root = workspace / "registry" / "clf"
    rows = {r["version"]: r for r in list_versions(workspace, "clf")}
    assert sorted(rows) == list(range(1, len(values) + 1))
    gates = {n: json.loads((root / "versions" / str(n) / "gate.json").read_text()) for n in rows}
    events = history(workspace, "clf")
    registered = [e["version"] for e in events if e["event"] == "register"]
    assert sorted(registered) == sorted(rows)  # each version registered once, in the order numbers were taken
    assert registered == sorted(registered)

    # replay the history: each gate compared against the production of its moment; production = last promoted
    production, promoted_order = None, []
    for e in events:
        if e["event"] == "register":
            gate = gates[e["version"]]
            assert gate.get("champion_version") == production, (e, gate)
            assert e["decision"] == gate["decision"]
            if gate["decision"] == "promote":
                assert gate["promoted"] is True
        elif e["event"] == "promote":
            assert gates[e["version"]]["decision"] == "promote" and e["previous"] == production
            production = e["version"]
            promoted_order.append(production)
    aliases = json.loads((root / "aliases.json").read_text())
    assert aliases["production"] == production == promoted_order[-1]
    assert aliases["production_history"] == promoted_order
    assert rows[production]["primary_value"] == max(values)  # with min_delta 0 the best one holds production
    assert not [p for p in (root / "versions").iterdir() if p.name.startswith(".")]


# ---- the cache's file locks: a lock file read while its writer is between creating and filling it ------------


def test_a_lock_file_read_before_its_json_is_written_counts_as_held(tmp_path):
    """Prefect creates the lock file empty, then writes it; a reader in between used to fail with
    'EOF while parsing a value' (two concurrent runs of one config). It now waits for the content."""
    import threading

    from tasks.caching import ProcessLockManager

    locks = ProcessLockManager(lock_files_directory=tmp_path)
    path = Path(locks._lock_path_for_key("k"))
    path.touch()
    writer = threading.Timer(0.1, lambda: path.write_text(json.dumps({"holder": "other", "expiration": None})))
    writer.start()
    try:
        assert locks.is_locked("k") and not locks.is_lock_holder("k", "me") and locks.is_lock_holder("k", "other")
    finally:
        writer.join()
    assert not locks.acquire_lock("k", "me", acquire_timeout=0.2)  # held by "other": no error, a timeout


def test_a_lock_file_left_empty_by_a_dead_writer_is_stale(tmp_path):
    from tasks.caching import ProcessLockManager

    locks = ProcessLockManager(lock_files_directory=tmp_path)
    locks.READ_RETRIES, locks.READ_PAUSE_S = 5, 0.01
    path = Path(locks._lock_path_for_key("k"))
    path.touch()
    assert not locks.is_locked("k") and not path.exists()
    assert locks.acquire_lock("k", "me") and locks.is_lock_holder("k", "me")
    info = json.loads(path.read_text())
    assert info["holder"] == "me" and info["pid"] == os.getpid() and not list(tmp_path.glob("*.tmp"))
