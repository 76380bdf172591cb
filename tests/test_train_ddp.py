"""Two processes under torchrun (DDP, gloo on CPU) finish and write the same kind of run folder."""

from __future__ import annotations

import json
from pathlib import Path

from test_train import make_cfg, prepare, task_rows, write_rows


def test_two_process_torchrun_on_cpu(tmp_path, tiny_bert):
    from conftest import train_model

    from tasks.files import read_json
    from tasks.model.loading import load_trained_model
    from tasks.training.launch import worker_command

    src = write_rows(tmp_path / "single", task_rows("single_label"))
    cfg = make_cfg(
        tmp_path / "ws",
        src,
        tiny_bert,
        "single_label",
        "full",
        ["training.processes=2", "training.epochs=2", "training.learning_rate=0.003"],
    )
    assert "torch.distributed.run" in worker_command(Path("x"), 2)
    res = train_model(cfg, *prepare(cfg, tiny_bert))
    run = Path(res.path)
    summary = read_json(run / "training_summary.json")
    assert summary["processes"] == 2
    # effective batch 8 = micro-batch 4 x accumulation 1 x 2 processes
    assert (summary["micro_batch_size"], summary["gradient_accumulation_steps"]) == (4, 1)
    assert summary["global_step"] == 2 * summary["steps_per_epoch"] and summary["epochs_run"] == 2
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln["type"] == "step"] == list(range(1, summary["global_step"] + 1))
    assert sum(ln["type"] == "eval" for ln in lines) == 2  # rank 0 alone writes
    assert (run / "model" / "model.safetensors").exists() and (run / "model" / "config.json").exists()
    log = (run / "logs" / "attempt-1.log").read_text()
    assert "processes 2" in log
    model, tok = load_trained_model(str(run))
    assert model.config.problem_type == "single_label_classification" and model.config.num_labels == 3
