"""retrain.start_from=production: a retrain continues from the production version's adapter."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import toy_rows, write_csv
from test_train import learnable_bert, make_cfg, prepare, step_losses  # noqa: F401 - the fixture is used by name


def _register_production(cfg, model: Path):
    from tasks.evaluate import evaluate_run
    from tasks.export import export_run
    from tasks.registry import register_version
    from tasks.train import train_model

    run = train_model(cfg, *prepare(cfg, model))
    ev = evaluate_run(cfg, run.path)
    ex = export_run(cfg, run.path, ev.path)
    return run, register_version(cfg, ex.path, ev.path)


def test_retrain_continues_from_the_production_adapter(tmp_path, learnable_bert):  # noqa: F811
    from tasks.train import train_model

    data = write_csv(tmp_path / "d.csv", toy_rows(90))
    extra = ["training.learning_rate=0.01", "registry.name=toy"]
    base_cfg = make_cfg(tmp_path / "ws", data, learnable_bert, "single_label", "lora", extra)
    first, reg = _register_production(base_cfg, learnable_bert)
    assert reg.promoted and reg.version == 1

    cont_cfg = make_cfg(tmp_path / "ws", data, learnable_bert, "single_label", "lora",
                        extra + ["retrain.start_from=production"])
    cont = train_model(cont_cfg, *prepare(cont_cfg, learnable_bert))
    run = Path(cont.path)
    assert cont.path != first.path  # the production adapter is an input: a new run folder
    info = json.loads((run / "run_info.json").read_text())
    adapter = Path(reg.path) / "model" / "adapter"
    assert info["start_adapter"] == str(adapter)
    assert "from the production adapter" in (run / "logs" / "attempt-1.log").read_text()
    # it starts where production left off: its first steps already have the trained model's low loss
    base_losses, cont_losses = step_losses(Path(first.path)), step_losses(run)
    assert cont_losses[0] < 0.8 * base_losses[0], (base_losses[:3], cont_losses[:3])

    # start_from=production with no production version, or with full fine-tuning, starts from the base
    from tasks.train import start_adapter

    assert start_adapter(cont_cfg.model_copy(update={"registry": cont_cfg.registry.model_copy(update={"name": "none"})}),
                         "lora") is None
    assert start_adapter(cont_cfg, "full") is None
