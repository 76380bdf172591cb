"""Checkpoints and resume: a SIGKILLed training child resumes from its last checkpoint and ends where an
uninterrupted run ends; a corrupt latest checkpoint is reported and the previous one is used."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_train import make_cfg, prepare, step_losses, task_rows, write_rows


def _evals(run: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [ln for ln in lines if ln["type"] == "eval"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("resume-data") / "single", task_rows("single_label"))


EXTRA = ["training.epochs=3", "training.learning_rate=0.01", "training.save_every_steps=2"]


@pytest.mark.child
def test_killed_child_resumes_from_checkpoint_and_matches_uninterrupted_run(tmp_path, tiny_llama, source, monkeypatch):
    from conftest import train_model

    from tasks.files import read_json
    from tasks.training.launch import TrainingError

    # the reference: one uninterrupted run
    ref_cfg = make_cfg(tmp_path / "ref", source, tiny_llama, "single_label", "lora", EXTRA)
    ref = train_model(ref_cfg, *prepare(ref_cfg, tiny_llama))
    assert ref.resumed_from_step == 0

    # the same run, slowed down (0.25 s per step) and SIGKILLed once checkpoint step-4 exists
    monkeypatch.setenv("FINETUNE_TEST_STEP_DELAY_S", "0.25")
    cfg = make_cfg(tmp_path / "killed", source, tiny_llama, "single_label", "lora", EXTRA)
    data = prepare(cfg, tiny_llama)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, train_model, cfg, *data))
    thread.start()
    run = cfg.workspace_path() / "runs" / ref.key
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step-4").exists():
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(read_json(run / "worker.json")["pid"], signal.SIGKILL)
    thread.join(60)
    assert errors and isinstance(errors[0], TrainingError) and "killed by signal 9" in str(errors[0])
    killed_at = max(int(json.loads(ln)["step"]) for ln in (run / "metrics.jsonl").read_text().splitlines())
    assert not (run / "model").exists() and not (run / "training_summary.json").exists()
    total = read_json(Path(ref.path) / "training_summary.json")["global_step"]
    assert 4 <= killed_at < total

    monkeypatch.delenv("FINETUNE_TEST_STEP_DELAY_S")
    res = train_model(cfg, *data)
    assert res.path == str(run) and not res.reused
    assert res.resumed_from_step >= 4 and res.global_step == total == ref.global_step
    log = (run / "logs" / "attempt-2.log").read_text()
    assert f"resuming from step-{res.resumed_from_step}" in log
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "resume" and events[-1]["step"] == res.resumed_from_step

    # the loss curve continues without gaps or duplicates, and ends where the uninterrupted run ends
    steps = [
        json.loads(ln)["step"]
        for ln in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(ln)["type"] == "step"
    ]
    assert steps == list(range(1, total + 1))
    assert step_losses(run) == pytest.approx(step_losses(Path(ref.path)), rel=1e-4, abs=1e-6)
    for a, b in zip(_evals(run), _evals(Path(ref.path)), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-6)
        assert a["accuracy"] == pytest.approx(b["accuracy"])
    assert res.best_metric == pytest.approx(ref.best_metric, rel=1e-4)
    kept = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert len(kept) <= 3 and kept[-1] == total  # the last two plus the best


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_corrupt_latest_checkpoint_is_detected_and_the_previous_one_used(tmp_path, tiny_llama, source, capsys):
    from conftest import prepare_run

    from tasks.training import loop as train_worker
    from tasks.training.checkpoints import checkpoint_steps, verify_checkpoint

    cfg = make_cfg(tmp_path / "ws", source, tiny_llama, "single_label", "lora", EXTRA + ["training.epochs=2"])
    run = prepare_run(cfg, *prepare(cfg, tiny_llama))
    first = train_worker.run(str(run))
    (run / "training_summary.json").unlink()
    import shutil

    shutil.rmtree(run / "model")
    (latest, latest_dir), (previous, _) = checkpoint_steps(run / "checkpoints")[:2]
    weights = latest_dir / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert "does not match" in verify_checkpoint(latest_dir)

    capsys.readouterr()
    again = train_worker.run(str(run))
    out = capsys.readouterr().out
    assert f"checkpoint step-{latest} is unusable" in out and "truncated or corrupt" in out
    assert again["resumed_from_step"] == previous and again["global_step"] == first["global_step"]
    assert (run / "checkpoints" / f"corrupt-step-{latest}").is_dir()
    assert again["best_metric"] == pytest.approx(first["best_metric"], rel=1e-4)


def test_unusable_best_checkpoint_keeps_the_final_weights_and_says_so(tmp_path, tiny_llama, source, capsys):
    import shutil

    from conftest import prepare_run

    from tasks.training import loop as train_worker

    # min_delta=100: epoch 1 stays the best of 2, so the best checkpoint is older than the latest
    cfg = make_cfg(
        tmp_path / "ws",
        source,
        tiny_llama,
        "single_label",
        "lora",
        ["training.epochs=2", "training.early_stopping.min_delta=100"],
    )
    run = prepare_run(cfg, *prepare(cfg, tiny_llama))
    first = train_worker.run(str(run))
    assert first["best_epoch"] == 1 and first["best_step"] < first["global_step"]
    weights = run / "checkpoints" / f"step-{first['best_step']}" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (run / "training_summary.json").unlink()
    shutil.rmtree(run / "model")

    capsys.readouterr()
    again = train_worker.run(str(run))
    out = capsys.readouterr().out
    assert f"WARNING: best checkpoint step-{first['best_step']} was unusable" in out
    assert again["best_step"] == again["global_step"] == first["global_step"] and again["best_epoch"] == 2
    assert "kept the final weights" in again["best_restore_note"]
    assert again["best_metric_name"] == "f1_macro"  # early stopping auto: the evaluation's primary metric
    assert again["best_metric"] == pytest.approx(_evals(run)[-1]["f1_macro"])
    assert (run / "model" / "adapter_model.safetensors").exists()
