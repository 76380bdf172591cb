"""Training stage on tiny random models: every method x task type learns, only the intended parameters
change, class weights reach the loss, the run folder has the contract's files, OOM back-off works."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import WORDS, toy_rows, write_csv

# ----------------------------------------------------------------------------------------------
# helpers (also imported by the other training test files)
# ----------------------------------------------------------------------------------------------


def task_rows(task: str, n: int = 96, seed: int = 0, classes=("pos", "neg", "neu")) -> list[dict]:
    """A learnable toy set per task type: each label has its own vocabulary."""
    if task == "single_label":
        return toy_rows(n, classes=classes, seed=seed)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if task == "multi_label":
            chosen = [c for c in ("pos", "neg") if rng.random() < 0.5] or [rng.choice(("pos", "neg"))]
            words = [w for c in chosen for w in rng.choices(WORDS[c], k=rng.randint(2, 4))]
            words += rng.choices(WORDS["neu"], k=rng.randint(0, 2))
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" {i}", "label": chosen})
        else:
            p = rng.randint(0, 6)
            words = rng.choices(WORDS["pos"], k=p) + rng.choices(WORDS["neg"], k=6 - p)
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" {i}", "label": round(p / 6 + 0.001, 4)})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    if isinstance(rows[0]["label"], list):
        path = path.with_suffix(".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    return write_csv(path.with_suffix(".csv"), rows)


def make_cfg(
    workspace: Path, source: Path, model: Path, task: str, method: str = "full", extra: list[str] | None = None
):
    from tasks.config_loading import load_config

    ov = [
        f"workspace={workspace}",
        f"data.source={source}",
        f"model.name_or_path={model}",
        f"method.kind={method}",
        "data.max_length=32",
        "training.effective_batch_size=8",
        "training.epochs=4",
        "training.warmup_ratio=0.0",
        "training.early_stopping.patience=10",
        f"data.task={task}",
        "training.learning_rate=default",
    ]
    if task == "regression":
        ov.append("data.class_weighting=none")
    return load_config(None, ov + list(extra or []))


def prepare(cfg, model: Path):
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset

    prep = prepare_dataset(cfg)
    tok = tokenize_dataset(prep.path, str(model), cfg)
    return prep.path, tok.path


def step_losses(run: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [ln["loss"] for ln in lines if ln["type"] == "step"]


EPOCHS = {"single_label": 4, "multi_label": 8, "regression": 4}  # multi-label learns slowest on the tiny BERT
LR = {"full": 3e-3, "lora": 1e-2, "dora": 1e-2, "qlora": 1e-2}
MODELS = {"bert": "learnable_bert", "llama": "tiny_llama"}


@pytest.fixture(scope="session")
def learnable_bert(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert's tokenizer with a tiny BERT initialised at std 0.2 instead of 0.02.

    At std 0.02 the fixture's [CLS] output barely depends on the input (std across inputs ~0.003 of a
    magnitude ~0.8), so a head + adapters need hundreds of steps to move; at 0.2 the toy task is learnable
    in the few dozen steps a unit test can afford.
    """
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("learnable-bert")
    for f in tiny_bert.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-data")
    return {task: write_rows(d / task, task_rows(task)) for task in ("single_label", "multi_label", "regression")}


_PREPARED: dict[tuple[str, str], tuple[str, str]] = {}
CASES = [
    (m, meth, task)
    for m in ("bert", "llama")
    for meth in ("full", "lora", "dora")
    for task in ("single_label", "multi_label", "regression")
]
CASES += [("bert", "qlora", "single_label"), ("llama", "qlora", "single_label"), ("llama", "qlora", "regression")]


@pytest.mark.parametrize("model_name,method,task", CASES, ids=["-".join(c) for c in CASES])
def test_method_task_learns_and_changes_only_intended_params(request, tmp_path, datasets_dir, model_name, method, task):
    import contextlib

    import torch
    from conftest import prepare_run

    from tasks.model.base import load_tokenizer
    from tasks.model.build import build_model
    from tasks.plan import RunPlan
    from tasks.training import loop as train_worker
    from tasks.training.batching import Rows
    from tasks.training.losses import make_loss

    model_dir = request.getfixturevalue(MODELS[model_name])
    extra = [f"training.learning_rate={LR[method]}", f"training.epochs={EPOCHS[task]}"]
    if (model_name, task) not in _PREPARED:  # data + tokens once per (model, task); each test its own run folder
        shared = make_cfg(
            datasets_dir[task].parent / f"ws-{model_name}", datasets_dir[task], model_dir, task, method, extra
        )
        _PREPARED[(model_name, task)] = prepare(shared, model_dir)
    cfg = make_cfg(tmp_path / "ws", datasets_dir[task], model_dir, task, method, extra)
    run = prepare_run(cfg, *_PREPARED[(model_name, task)])
    summary, trained = train_worker.run(str(run), return_model=True)

    losses = step_losses(run)
    assert summary["global_step"] == len(losses) == EPOCHS[task] * summary["steps_per_epoch"]

    # a fresh build with the same seed is the starting point: compare the loss and every parameter with it
    plan = RunPlan.read(run)
    tok = load_tokenizer(str(model_dir))
    start = build_model(plan, pad_token_id=tok.pad_token_id).model
    rows = Rows(str(Path(plan.tokenized_path) / "train"), task, tok.pad_token_id)
    loss_fn = make_loss(task)
    loss_before = train_worker.evaluate(start, rows, loss_fn, 64, "cpu", contextlib.nullcontext)["val_loss"]
    loss_after = train_worker.evaluate(trained, rows, loss_fn, 64, "cpu", contextlib.nullcontext)["val_loss"]
    assert loss_after < 0.9 * loss_before, f"train-set loss did not go down: {loss_before:.4f} -> {loss_after:.4f}"
    before = dict(start.named_parameters())
    changed, unchanged = [], []
    for name, p in trained.named_parameters():
        (changed if not torch.equal(p.detach().cpu(), before[name].detach().cpu()) else unchanged).append(name)
        assert p.requires_grad == before[name].requires_grad, name
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    if method == "full":
        assert not unchanged, f"full fine-tuning left parameters untouched: {unchanged[:5]}"
    else:
        assert set(changed) == trainable, f"frozen parameters changed: {sorted(set(changed) - trainable)[:5]}"
        assert any("lora_B" in n for n in changed) and any("modules_to_save" in n for n in changed)
        if model_name == "bert":  # the pooler feeds BERT's head: trained and saved with it
            assert any("pooler.modules_to_save" in n for n in changed)
        saved = run / "model" / "adapter_model.safetensors"
        from safetensors import safe_open

        with safe_open(str(saved), "pt") as fh:
            keys = list(fh.keys())
        assert any("lora_A" in k for k in keys) and any(("classifier" in k or "score" in k) for k in keys)
        if model_name == "bert":
            assert any("pooler" in k for k in keys)
        if method == "dora":
            assert any("lora_magnitude_vector" in k for k in keys)
    if method == "qlora":
        assert plan.quantization["load_in_4bit"] and plan.quantization["quant_type"] == "nf4"
        assert type(trained.base_model.model.get_submodule(_first_target(trained))).__name__ == "Linear4bit"


def _first_target(peft_model) -> str:
    for name, module in peft_model.base_model.model.named_modules():
        if type(module).__name__ == "Linear4bit" and "base_layer" not in name and hasattr(module, "lora_A"):
            return name
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            return name
    raise AssertionError("no adapted layer")


def test_class_weights_reach_the_training_loss(tmp_path, tiny_bert):
    """Same seed, same data order: the first step's loss differs only because of the manifest weights."""
    from conftest import prepare_run

    from tasks.files import read_json
    from tasks.training import loop as train_worker

    rows = toy_rows(60, classes=("pos", "neg")) + toy_rows(30, classes=("neg",), seed=1)
    src = write_csv(tmp_path / "imb.csv", rows)
    firsts = {}
    for scheme in ("none", "balanced"):
        cfg = make_cfg(
            tmp_path / f"ws-{scheme}",
            src,
            tiny_bert,
            "single_label",
            "full",
            [f"data.class_weighting={scheme}", "training.epochs=1"],
        )
        prep, tok = prepare(cfg, tiny_bert)
        weights = read_json(Path(prep) / "manifest.json")["class_weights"]
        run = prepare_run(cfg, prep, tok)
        train_worker.run(str(run))
        firsts[scheme] = (step_losses(run)[0], weights)
    assert set(firsts["none"][1].values()) == {1.0}
    assert firsts["balanced"][1]["pos"] > 1.0 > firsts["balanced"][1]["neg"]
    assert firsts["none"][0] != pytest.approx(firsts["balanced"][0], rel=1e-3)


def test_wrong_loss_or_metric_for_task_is_a_config_error(tmp_path, tiny_bert, datasets_dir):
    from conftest import prepare_run

    from tasks.config import ConfigError

    for task, extra, field in (
        ("regression", ["training.loss=cross_entropy"], "training.loss"),
        ("single_label", ["training.loss=mse"], "training.loss"),
        ("regression", ["training.early_stopping.metric=accuracy"], "training.early_stopping.metric"),
    ):
        cfg = make_cfg(tmp_path / "ws", datasets_dir[task], tiny_bert, task, "full", extra)
        with pytest.raises(ConfigError) as err:
            prepare_run(cfg, *prepare(cfg, tiny_bert))
        assert field in str(err.value)


def test_run_key_changes_only_with_training_inputs(tmp_path, tiny_bert, datasets_dir):
    from conftest import prepare_run

    def key(*extra):
        cfg = make_cfg(tmp_path / "ws", datasets_dir["single_label"], tiny_bert, "single_label", "lora", list(extra))
        return prepare_run(cfg, *prepare(cfg, tiny_bert)).name

    base = key()
    assert key("training.timeout_s=999", "training.save_every_steps=3") == base
    for extra in (
        "training.learning_rate=0.001",
        "method.lora_r=4",
        "training.seed=1",
        "data.max_length=24",
        "training.effective_batch_size=4",
        "method.kind=full",
    ):
        assert key(extra) != base, extra


@pytest.mark.child
def test_train_model_end_to_end_in_child_with_oom_backoff(tmp_path, tiny_llama, datasets_dir, monkeypatch):
    """The child process trains; a simulated OOM at micro-batch 8 makes the stage retry at 4 x 2."""
    from conftest import train_model

    from tasks.files import read_json
    from tasks.model.loading import load_trained_model
    from tasks.plan import RunPlan

    monkeypatch.setenv("FINETUNE_SIMULATE_OOM_ABOVE", "4")
    cfg = make_cfg(
        tmp_path / "ws",
        datasets_dir["single_label"],
        tiny_llama,
        "single_label",
        "lora",
        ["training.epochs=2", "training.learning_rate=0.03"],
    )
    res = train_model(cfg, *prepare(cfg, tiny_llama))
    run = Path(res.path)
    assert (
        res.oom_backoffs and res.oom_backoffs[0]["from_micro_batch"] == 8 and res.oom_backoffs[0]["to_micro_batch"] == 4
    )
    summary = read_json(run / "training_summary.json")
    assert (summary["micro_batch_size"], summary["gradient_accumulation_steps"], summary["effective_batch_size"]) == (
        4,
        2,
        8,
    )
    assert "out of memory at micro-batch 8" in (run / "logs" / "attempt-1.log").read_text()
    plan = RunPlan.read(run)  # the plan as trained: the back-off's micro-batch
    assert plan.micro_batch_size == 4 and plan.learning_rate == 0.03 and plan.method == "lora"
    assert plan.problem_type == "single_label_classification" and plan.num_labels == 3
    build = read_json(run / "build.json")
    assert build["head_modules"] == ["score"] and set(build["target_modules"]) >= {"q_proj", "v_proj"}
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (run / "model" / name).exists(), name
    assert {
        "best_epoch",
        "best_step",
        "best_metric_name",
        "best_metric",
        "epochs_run",
        "stopped_early",
        "global_step",
        "seconds",
        "samples_per_second",
        "peak_rss_mb",
        "learning_rate",
        "effective_batch_size",
    } <= set(summary)
    kinds = {json.loads(ln)["type"] for ln in (run / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"step", "eval"}
    assert len(list((run / "checkpoints").glob("step-*"))) <= 3

    model, tok = load_trained_model(str(run))
    assert model.config.pad_token_id == tok.pad_token_id is not None
    batch = tok(["great good love", "bad awful"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)

    again = train_model(cfg, *prepare(cfg, tiny_llama))
    assert again.reused and again.path == res.path


def test_timeout_kills_the_training_child(tmp_path, tiny_llama, datasets_dir, monkeypatch):
    import os
    import time

    from conftest import prepare_run

    from tasks.files import read_json
    from tasks.training.launch import TrainingTimeout, launch_worker

    monkeypatch.setenv("FINETUNE_TEST_STEP_DELAY_S", "1")
    cfg = make_cfg(tmp_path / "ws", datasets_dir["single_label"], tiny_llama, "single_label", "lora")
    run = prepare_run(cfg, *prepare(cfg, tiny_llama))
    t0 = time.monotonic()
    with pytest.raises(TrainingTimeout, match=r"timeout_s \(4 s left for this attempt\) and was killed"):
        launch_worker(run, 1, timeout_s=4, attempt=1)
    assert time.monotonic() - t0 < 20
    with pytest.raises(ProcessLookupError):
        os.kill(read_json(run / "worker.json")["pid"], 0)
    assert not (run / "training_summary.json").exists()
