"""retrain.start_from=production: a retrain continues from the production version's adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import toy_rows, write_csv
from test_train import learnable_bert, make_cfg, prepare, step_losses  # noqa: F401 - the fixture is used by name


def _register_production(cfg, model: Path):
    from conftest import train_model

    from tasks.evaluation.evaluate import evaluate_run
    from tasks.release.export import export_run
    from tasks.release.registry import register_version

    run = train_model(cfg, *prepare(cfg, model))
    ev = evaluate_run(cfg, run.path)
    ex = export_run(cfg, run.path, ev.path)
    return run, register_version(cfg, ex.path, ev.path)


@pytest.mark.child
def test_retrain_continues_from_the_production_adapter(tmp_path, learnable_bert):  # noqa: F811
    from conftest import train_model

    data = write_csv(tmp_path / "d.csv", toy_rows(90))
    # registry.must_beat=[]: the toy data is TF-IDF's home ground; this test is about continuing from production
    extra = ["training.learning_rate=0.01", "registry.name=toy", "registry.must_beat=[]"]
    base_cfg = make_cfg(tmp_path / "ws", data, learnable_bert, "single_label", "lora", extra)
    first, reg = _register_production(base_cfg, learnable_bert)
    assert reg.promoted and reg.version == 1

    cont_cfg = make_cfg(
        tmp_path / "ws", data, learnable_bert, "single_label", "lora", extra + ["retrain.start_from=production"]
    )
    cont = train_model(cont_cfg, *prepare(cont_cfg, learnable_bert))
    run = Path(cont.path)
    assert cont.path != first.path  # the production adapter is an input: a new run folder
    plan = json.loads((run / "plan.json").read_text())
    adapter = Path(reg.path) / "model" / "adapter"
    assert plan["start_adapter"] == str(adapter) and plan["start_adapter_fingerprint"]
    assert "from the production adapter" in (run / "logs" / "attempt-1.log").read_text()
    # it starts where production left off: its first steps already have the trained model's low loss
    base_losses, cont_losses = step_losses(Path(first.path)), step_losses(run)
    assert cont_losses[0] < 0.8 * base_losses[0], (base_losses[:3], cont_losses[:3])

    # start_from=production with no production version, or with full fine-tuning, starts from the base
    from tasks.training.planner import start_adapter
    from tasks.workspace import Workspace

    ws = Workspace.at(cont_cfg.workspace)
    assert (
        start_adapter(
            cont_cfg.model_copy(update={"registry": cont_cfg.registry.model_copy(update={"name": "none"})}), ws
        )
        is None
    )
    full = train_model(
        make_cfg(
            tmp_path / "ws",
            data,
            learnable_bert,
            "single_label",
            "full",
            ["training.learning_rate=0.001", "registry.name=toy", "retrain.start_from=production", "training.epochs=1"],
        ),
        *prepare(cont_cfg, learnable_bert),
    )
    assert json.loads((Path(full.path) / "plan.json").read_text())["start_adapter"] is None  # full: from the base
