"""Model-aware heads: mean pooling for sentence-transformers checkpoints, loadable after export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.model.heads import pooling_mode, resolve_head


def st_copy(src: Path, dst: Path, mode: str = "mean") -> Path:
    """A copy of a model folder that says it is a sentence-transformers checkpoint with `mode` pooling."""
    shutil.copytree(src, dst)
    (dst / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": mode == "cls",
                "pooling_mode_mean_tokens": mode == "mean",
                "pooling_mode_max_tokens": False,
            }
        )
    )
    return dst


def test_pooling_detection(tmp_path, tiny_bert):
    assert pooling_mode(tiny_bert) is None
    assert resolve_head("auto", tiny_bert)[0] == "pooler"
    assert resolve_head("auto", st_copy(tiny_bert, tmp_path / "st"))[0] == "mean"
    assert resolve_head("auto", st_copy(tiny_bert, tmp_path / "cls", "cls"))[0] == "pooler"
    assert resolve_head("mean", tiny_bert)[0] == "mean" and resolve_head("pooler", tmp_path / "st")[0] == "pooler"
    with pytest.raises(ValueError):
        resolve_head("max", tiny_bert)


def test_hub_id_is_detected_from_the_hugging_face_cache(tmp_path, tiny_bert):
    """A Hub id (not a local folder) is read through huggingface_hub: here offline, from a cache laid out
    as hf_hub_download leaves it, so the mean-pooling checkpoint is recognised without a network."""
    cache = tmp_path / "hub"
    for repo, mode in (("org/st-mean", "mean"), ("org/st-cls", "cls"), ("org/plain", None)):
        snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("a" * 40)
        if mode:
            st_copy(tiny_bert, snap, mode)
        else:
            shutil.copytree(tiny_bert, snap)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    code = (
        "import json; from tasks.model.heads import pooling_mode, resolve_head; "
        "print(json.dumps([[pooling_mode(r), resolve_head('auto', r)] for r in "
        "('org/st-mean', 'org/st-cls', 'org/plain', 'org/not-cached')]))"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    (m_mode, m_head), (c_mode, c_head), (p_mode, p_head), (n_mode, n_head) = json.loads(
        out.stdout.strip().splitlines()[-1]
    )
    assert (m_mode, m_head[0]) == ("mean", "mean") and "mean pooling" in m_head[1]
    assert (c_mode, c_head[0]) == ("cls", "pooler") and "cls pooling" in c_head[1]
    assert (p_mode, p_head[0]) == (None, "pooler") and (n_mode, n_head[0]) == (None, "pooler")


def test_bundled_minilm_is_detected_as_mean_pooling():
    from tasks.config import ModelConfig
    from tasks.model.base import resolve_model

    try:
        base = resolve_model(ModelConfig())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bundled model not installed: {exc}")
    assert resolve_head("auto", base) == ("mean", resolve_head("auto", base)[1]) and pooling_mode(base) == "mean"


def _mean_model(tiny_bert):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tasks.model.heads import wrap_config

    cfg = wrap_config(
        AutoConfig.from_pretrained(tiny_bert),
        num_labels=3,
        problem_type="single_label_classification",
        id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), config=cfg).eval()


def test_head_reads_masked_mean_and_keeps_the_encoder_weights(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = _mean_model(tiny_bert)
    assert type(model).__name__ == "MeanPoolingForSequenceClassification" and model.encoder.pooler is None
    ref = AutoModel.from_pretrained(str(tiny_bert))
    assert torch.equal(ref.embeddings.word_embeddings.weight, model.encoder.embeddings.word_embeddings.weight)
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    alone = tok(["good day"], return_tensors="pt")
    padded = tok(["good day", "a much longer sentence with many more words in it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = model(**alone).logits[0], model(**padded).logits[0]
        hidden = ref(**alone).last_hidden_state.mean(dim=1)
        expected = model.classifier(hidden)[0]
    assert torch.allclose(a, b, atol=1e-5)  # padding does not move the mean
    assert torch.allclose(a, expected, atol=1e-5)  # the head reads the mean of the encoder's token states


LOAD = """
import json, sys
from transformers import pipeline, AutoModelForSequenceClassification
m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
p = pipeline("text-classification", model=sys.argv[1], trust_remote_code=True, top_k=None)
print(json.dumps({"cls": type(m).__name__, "out": p(["good day"])[0]}))
"""


def test_saved_model_loads_through_pipeline_fresh_process_and_registered(tmp_path, tiny_bert):
    import torch
    from transformers import AutoTokenizer, pipeline

    model = _mean_model(tiny_bert)
    folder = tmp_path / "export"
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "mean_pooling_classifier" and "AutoModelForSequenceClassification" in cfg["auto_map"]
    assert (folder / "modeling_mean_pooling.py").is_file()
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(str(folder))(["good day"], return_tensors="pt")).logits[0]
    probs = {lab: float(p) for lab, p in zip(("neg", "neu", "pos"), torch.softmax(logits, -1), strict=False)}

    # a fresh process outside the repository, without this package on the path: remote code
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cls"] == "MeanPoolingForSequenceClassification"
    assert {d["label"]: d["score"] for d in got["out"]} == pytest.approx(probs, abs=1e-5)

    # in this process: the registered loader, no trust_remote_code
    import tasks.model.heads

    tasks.model.heads.register()
    p = pipeline("text-classification", model=str(folder), top_k=None)
    assert type(p.model).__module__ == "tasks.model.modeling_mean_pooling"
    assert {d["label"]: d["score"] for d in p(["good day"])[0]} == pytest.approx(probs, abs=1e-5)


@pytest.mark.child
def test_lora_mean_head_trains_merges_exports_and_loads(tmp_path, tiny_bert):
    """head auto on a mean-pooling sentence-transformers checkpoint: LoRA run with the head trainable and
    saved, merged export (+ ONNX) that loads through pipeline in a fresh process with trust_remote_code."""
    from conftest import toy_rows, train_model, write_csv
    from safetensors import safe_open

    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.evaluation.evaluate import evaluate_run
    from tasks.model.loading import load_trained_model
    from tasks.release.export import export_run

    base = st_copy(tiny_bert, tmp_path / "st-model")
    data = write_csv(tmp_path / "train.csv", toy_rows(90))
    cfg = load_config(
        None,
        [
            f"workspace={tmp_path / 'ws'}",
            f"data.source={data}",
            f"model.name_or_path={base}",
            "method.kind=lora",
            "training.learning_rate=0.01",
            "training.epochs=1",
            "data.max_length=32",
            "training.effective_batch_size=8",
            "export.onnx=true",
            "registry.name=toy",
        ],
    )
    prep = prepare_dataset(cfg)
    tok = tokenize_dataset(prep.path, str(base), cfg)
    run = Path(train_model(cfg, prep.path, tok.path).path)
    plan, build = json.loads((run / "plan.json").read_text()), json.loads((run / "build.json").read_text())
    assert plan["head"] == "mean" and build["head_modules"] == ["classifier"]
    with safe_open(str(run / "model" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("classifier" in k for k in keys) and not any("pooler" in k for k in keys)
    model, _ = load_trained_model(str(run))
    assert type(model.get_base_model()).__name__ == "MeanPoolingForSequenceClassification"

    ev = evaluate_run(cfg, str(run))
    exp = export_run(cfg, str(run), ev.path)
    folder = Path(exp.path)
    assert exp.merge_verification["passed"] and exp.onnx
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mean_pooling_classifier"
    assert (folder / "modeling_mean_pooling.py").is_file() and "trust_remote_code=True" in (
        folder / "README.md"
    ).read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cls"] == "MeanPoolingForSequenceClassification" and len(got["out"]) == 3


def test_qlora_mean_head_quantizes_the_encoder_and_keeps_the_head_trainable(tiny_bert):
    import torch
    from conftest import tiny_plan

    from tasks.model.build import build_model, head_module_names, meta_model, model_config

    skip = head_module_names(meta_model(model_config(str(tiny_bert), "single_label", ["a", "b"], head="mean")))
    plan = tiny_plan(
        tiny_bert, "single_label", ["a", "b"], "qlora", method_settings={"lora_r": 4}, head="mean", skip_modules=skip
    )
    built = build_model(plan)
    base = built.model.get_base_model()
    assert type(base).__name__ == "MeanPoolingForSequenceClassification"
    assert built.head_modules == ["classifier"] and plan.quantization["skip_modules"] == ["classifier"]
    assert type(base.encoder.encoder.layer[0].attention.self.query.base_layer).__name__ == "Linear4bit"
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("encoder.embeddings" in n for n in trainable)
    ids = torch.randint(5, 50, (2, 7))
    built.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
