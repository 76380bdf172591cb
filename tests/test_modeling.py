"""The one model builder: heads, auto target modules, QLoRA on CPU, decoder padding, memory estimates, the
auto choice, reloading a trained run, losses and the train/estimate commands."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_plan
from test_train import make_cfg, prepare, task_rows, write_rows

LABELS = ["neg", "neu", "pos"]


def _meta(config_obj):
    from tasks.model.build import meta_model

    return meta_model(config_obj)


def test_heads_and_auto_targets_per_architecture(tiny_bert, tiny_llama):
    from transformers import GPT2Config

    from tasks.model.build import find_target_modules, head_module_names, model_config

    bert = _meta(model_config(str(tiny_bert), "single_label", LABELS))
    assert head_module_names(bert) == ["classifier", "bert.pooler"]
    assert find_target_modules(bert, head_module_names(bert)) == ["key", "query", "value"]  # not the MLP's `dense`
    llama = _meta(model_config(str(tiny_llama), "single_label", LABELS))
    assert head_module_names(llama) == ["score"]
    assert find_target_modules(llama, ["score"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    gpt2 = _meta(GPT2Config(n_embd=32, n_layer=2, n_head=2, num_labels=2))
    assert find_target_modules(gpt2, head_module_names(gpt2)) == ["c_attn"]  # c_proj also sits in the MLP


def test_decoder_gets_pad_token_and_label_maps(tiny_llama):
    from tasks.model.base import load_tokenizer
    from tasks.model.build import build_model

    tok = load_tokenizer(str(tiny_llama))
    assert tok.pad_token_id is not None
    built = build_model(tiny_plan(tiny_llama, "multi_label", LABELS, "full"), pad_token_id=tok.pad_token_id)
    cfg = built.model.config
    assert cfg.pad_token_id == tok.pad_token_id
    assert cfg.problem_type == "multi_label_classification" and cfg.num_labels == 3
    assert cfg.id2label == {0: "neg", 1: "neu", 2: "pos"} and cfg.label2id["pos"] == 2
    batch = tok(["great good", "bad awful terrible worst"], padding=True, return_tensors="pt")
    assert built.model(**batch).logits.shape == (2, 3)
    assert built.trainable_parameters == built.total_parameters


def test_qlora_on_cpu_keeps_head_out_of_4bit_and_trains_after_an_eval_forward(tiny_bert):
    import torch

    from tasks.model.base import load_tokenizer
    from tasks.model.build import build_model

    tok = load_tokenizer(str(tiny_bert))
    from tasks.model.build import head_module_names, meta_model, model_config

    heads = head_module_names(meta_model(model_config(str(tiny_bert), "single_label", LABELS)))
    assert heads == ["classifier", "bert.pooler"]  # the planner keeps these out of 4-bit
    plan = tiny_plan(tiny_bert, "single_label", LABELS, "qlora", method_settings={"lora_r": 4}, skip_modules=heads)
    built = build_model(plan, pad_token_id=tok.pad_token_id)
    model = built.model
    assert plan.quantization["compute_dtype"] == "float32"
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer"] == "Linear4bit"
    assert kinds["base_model.model.bert.encoder.layer.0.intermediate.dense"] == "Linear4bit"
    assert kinds["base_model.model.classifier.modules_to_save.default"] == "Linear"
    assert kinds["base_model.model.bert.pooler.modules_to_save.default.dense"] == "Linear"
    import bitsandbytes as bnb

    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    assert not getattr(model.base_model.model, "is_gradient_checkpointing", False)  # decided: off on CPU

    batch = tok(["great good", "bad awful terrible"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)  # on avx512_bf16 CPUs this used to repack the weights and break the next backward
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([2, 0]))
    loss.backward()
    opt.step()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_memory_estimate_and_auto_choice(tiny_bert, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    import tasks.model.memory as memory
    from tasks.cli.train import format_estimate

    est = memory.estimate_memory(str(tiny_bert), {"lora_r": 8}, micro_batch_size=16, max_length=128)
    m = {k: v["bytes"] for k, v in est["methods"].items()}
    assert est["choice"] == "full" and est["parameters"] < 1e6
    assert m["full"]["optimizer"] > m["lora"]["optimizer"] and m["qlora"]["weights"] < m["lora"]["weights"]
    assert "auto choice: full" in format_estimate(est)

    # a 1.3B-parameter decoder (config only: the estimate never loads weights)
    big = tmp_path / "big"
    LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=16,
    ).save_pretrained(big)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 64 * 1024**3)
    est = memory.estimate_memory(str(big), {"lora_r": 8}, micro_batch_size=4, max_length=256, device="cpu")
    assert est["parameters"] > 1e9 and est["choice"] == "lora"
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 5 * 1024**3)
    est = memory.estimate_memory(str(big), {"lora_r": 8}, micro_batch_size=4, max_length=256, device="cpu")
    assert est["choice"] == "qlora" and est["methods"]["qlora"]["fits"] and not est["methods"]["lora"]["fits"]
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 256 * 1024**2)
    est = memory.estimate_memory(str(big), {"lora_r": 8}, micro_batch_size=4, max_length=256, device="cpu")
    assert est["choice"] is None and "no method fits" in est["reason"]


@pytest.mark.parametrize("model_name,method", [("tiny_bert", "full"), ("tiny_llama", "lora"), ("tiny_bert", "qlora")])
def test_load_trained_model_reproduces_the_trained_model(request, tmp_path, model_name, method):
    import torch
    from conftest import prepare_run

    from tasks.model.loading import load_trained_model
    from tasks.training import loop as train_worker

    model_dir = request.getfixturevalue(model_name)
    src = write_rows(tmp_path / "single", task_rows("single_label", n=60))
    cfg = make_cfg(
        tmp_path / "ws", src, model_dir, "single_label", method, ["training.epochs=1", "training.learning_rate=0.01"]
    )
    run = prepare_run(cfg, *prepare(cfg, model_dir))
    _, trained = train_worker.run(str(run), return_model=True)
    loaded, tok = load_trained_model(str(run))
    assert not loaded.training
    batch = tok(["great good love", "bad awful", "table chair 7"], padding=True, return_tensors="pt")
    trained.eval()
    with torch.no_grad():
        a, b = trained(**batch).logits, loaded(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert loaded.config.id2label == {0: "neg", 1: "neu", 2: "pos"}


def test_losses_per_task_and_class_weights():
    import numpy as np
    import torch

    from tasks.config import ConfigError
    from tasks.training.losses import make_loss, resolve_loss, validation_metrics

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2, 1])
    plain, weighted = make_loss("single_label")(logits, y), make_loss("single_label", [1.0, 3.0, 1.0])(logits, y)
    assert float(plain) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")))
    assert float(weighted) > float(plain)  # the up-weighted class 1 is the worst-predicted sample
    multi = torch.tensor([[1.0, 0.0, 1.0]] * 3)
    assert float(make_loss("multi_label", [2.0, 2.0, 2.0])(logits, multi)) != pytest.approx(
        float(make_loss("multi_label")(logits, multi))
    )
    assert float(make_loss("regression")(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))) == pytest.approx(5.0)
    assert resolve_loss("multi_label") == "bce"
    with pytest.raises(ConfigError, match="training.loss"):
        resolve_loss("single_label", "bce")
    m = validation_metrics("single_label", np.array([0, 2, 1]), logits.numpy())
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_multi_label_validation_score_uses_the_thresholds_evaluation_uses():
    """A model trained with a large pos_weight scores a rare label high for every row; what separates the rows
    is above 0.5. Selection (early stopping, the rate search) must see the F1 the final evaluation will report
    (tuned thresholds), not the F1 at 0.5, which here cannot tell a perfect ranking from noise."""
    import numpy as np

    from tasks.evaluation.metrics import compute_metrics, tune_thresholds
    from tasks.training.losses import validation_metrics

    rng = np.random.default_rng(0)
    n = 300
    y = np.zeros((n, 2), dtype=int)
    y[:, 0] = rng.random(n) < 0.5
    y[rng.choice(n, 12, replace=False), 1] = 1  # a rare label (4 %), with enough positives for its own threshold
    p = np.where(y == 1, 0.995, 0.0)
    p[:, 0] = np.where(y[:, 0] == 1, 0.8, 0.2)
    p[:, 1] = np.where(y[:, 1] == 1, 0.995, rng.uniform(0.9, 0.98, n))  # negatives also above 0.5
    logits = np.log(p / (1 - p))
    m = validation_metrics("multi_label", y, logits)
    assert m["f1_micro"] == pytest.approx(1.0) and m["f1_macro"] == pytest.approx(1.0)
    assert m["f1_macro_at_0.5"] < 0.6 and m["f1_micro_at_0.5"] < m["f1_micro"]
    # the same figure the evaluation computes with thresholds tuned on validation
    t = tune_thresholds(y, p)
    assert t[1] >= 0.98  # beyond the old grid, which stopped at 0.95
    assert compute_metrics("multi_label", ["a", "b"], y, p, t)["f1_macro"] == pytest.approx(m["f1_macro"])


@pytest.mark.child
def test_estimate_and_train_commands(tmp_path, tiny_bert):
    import typer
    from typer.testing import CliRunner

    from tasks.cli.train import register

    app = typer.Typer()
    register(app)
    src = write_rows(tmp_path / "single", task_rows("single_label", n=60))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"workspace: {tmp_path / 'ws'}\ndata: {{source: {src}, max_length: 32}}\n"
        f"model: {{name_or_path: {tiny_bert}}}\ntraining: {{epochs: 1, effective_batch_size: 8}}\n"
    )
    runner = CliRunner()
    res = runner.invoke(app, ["estimate", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["choice"] == "full"
    res = runner.invoke(app, ["estimate", str(cfg)])
    assert "qlora" in res.output and "auto choice: full" in res.output
    res = runner.invoke(app, ["train", str(cfg), "--set", "method.kind=auto"])
    assert res.exit_code == 0, res.output
    assert "method full" in res.output and "best epoch 1" in res.output
    res = runner.invoke(app, ["train", str(cfg), "--set", "method.kind=auto"])
    assert "reused" in res.output
    res = runner.invoke(app, ["train", str(cfg), "--set", "training.loss=mse"])
    assert res.exit_code == 2 and "training.loss" in res.output
