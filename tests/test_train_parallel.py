"""Scale-out on torch's engines (tasks/training/parallel.py): two processes under torchrun, with DDP or with FSDP2
sharding, follow the same loss curve as one process on the same global batches; FSDP writes full-tensor checkpoints
and a model that loads like any other, and resumes from its own checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train import learnable_bert, make_cfg, prepare, task_rows, write_rows  # noqa: F401 (a fixture)

pytestmark = pytest.mark.child  # each case trains in torchrun children (tens of seconds on two cores)


@pytest.fixture(scope="module")
def still_bert(learnable_bert, tmp_path_factory) -> Path:
    """test_train's learnable tiny BERT without dropout: the processes' dropout streams differ, so only a dropout-free model can follow one
    curve whatever the number of processes."""
    path = tmp_path_factory.mktemp("still-bert")
    for f in learnable_bert.iterdir():
        shutil.copy(f, path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _train(tmp_path: Path, model: Path, name: str, method: str, *sets: str) -> tuple[Path, list[float]]:
    from conftest import train_model

    src = write_rows(tmp_path / "single", task_rows("single_label"))
    cfg = make_cfg(
        tmp_path / name,
        src,
        model,
        "single_label",
        method,
        ["training.epochs=2", f"training.learning_rate={3e-3 if method == 'full' else 1e-2}", *sets]
        + (["method.lora_dropout=0"] if method != "full" else []),
    )
    run = Path(train_model(cfg, *prepare(cfg, model)).path)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return run, [ln["loss"] for ln in lines if ln["type"] == "step"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_and_fsdp_follow_the_single_process_loss_curve(tmp_path, still_bert, method):
    from tasks.files import read_json
    from tasks.model.loading import load_trained_model

    _, single = _train(tmp_path, still_bert, "one", method)
    curves = {}
    for strategy in ("ddp", "fsdp"):
        run, curves[strategy] = _train(
            tmp_path, still_bert, strategy, method, "training.processes=2", f"training.strategy={strategy}"
        )
        summary = read_json(run / "training_summary.json")
        assert (summary["processes"], summary["strategy"]) == (2, strategy)
        assert f"processes 2 ({strategy})" in (run / "logs" / "attempt-1.log").read_text()
        model, _ = load_trained_model(str(run))  # the saved model is whole, not one process's shard
        assert model.config.num_labels == 3
    assert len(single) == len(curves["ddp"]) == len(curves["fsdp"]) >= 20
    assert sum(single[-5:]) < 0.8 * sum(single[:5])  # it learned: a flat curve would match trivially
    for strategy, curve in curves.items():
        gap = max(abs(a - b) / abs(a) for a, b in zip(single, curve, strict=True))
        print(f"{method} {strategy}: largest relative gap to one process {gap:.1e}")
        assert gap < 1e-4, f"{strategy}: the curve left the single-process one by {gap:.2e} (relative)"


def test_fsdp_resumes_from_its_own_checkpoint(tmp_path, still_bert):
    """Checkpoints hold full tensors gathered from the shards; a second attempt reads them back into the shards
    and continues the same curve."""
    from tasks.files import read_json

    run, first = _train(tmp_path, still_bert, "ws", "full", "training.processes=2", "training.strategy=fsdp")
    steps = read_json(run / "training_summary.json")["steps_per_epoch"]
    # undo the second epoch: what a crash after the first epoch's checkpoint leaves behind
    shutil.rmtree(run / "checkpoints" / f"step-{2 * steps}")
    shutil.rmtree(run / "model")
    (run / "training_summary.json").unlink()
    run2, again = _train(tmp_path, still_bert, "ws", "full", "training.processes=2", "training.strategy=fsdp")
    assert run2 == run
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "resume" and e["step"] == steps for e in events)
    assert len(again) == len(first)
    assert max(abs(a - b) / abs(a) for a, b in zip(first, again, strict=True)) < 1e-3


def test_fsdp_is_refused_for_a_4bit_base(tmp_path, tiny_bert):
    from tasks.config import ConfigError

    src = write_rows(tmp_path / "single", task_rows("single_label"))
    cfg = make_cfg(
        tmp_path / "ws", src, tiny_bert, "single_label", "qlora", ["training.processes=2", "training.strategy=fsdp"]
    )
    from conftest import plan_for

    with pytest.raises(ConfigError, match=r"training.strategy.*fsdp cannot shard a 4-bit"):
        plan_for(cfg, *prepare(cfg, tiny_bert))
