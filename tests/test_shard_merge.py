"""The shard-wise merge (tasks/release/shard_merge.py): tiny random Llama and BERT bases saved in several shards, random
(non-zero) LoRA adapters saved by peft; the merged folder must load with transformers and equal peft's
merge_and_unload in float32, bfloat16 and float16, with heads copied and tied embeddings kept tied; a damaged adapter
is a clear error; the export stage takes this path and a failed verification leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export import TEXTS, make_config, make_eval, make_prepared, make_run

WORDS = 100


def _llama_base(path: Path, tied: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=WORDS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20KB")  # 6 shards + index
    return cfg


def _adapter(base_model, path: Path, **lora):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    model = get_peft_model(base_model, LoraConfig(**settings)).eval()
    model.save_pretrained(path)
    return model


def _meta(cls, cfg):
    import torch

    with torch.device("meta"):
        return cls(cfg)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("shard-llama")
    cfg = _llama_base(root / "base")
    peft_model = _adapter(LlamaForCausalLM.from_pretrained(root / "base"), root / "adapter")
    return root, cfg, peft_model


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-6), ("bfloat16", 0), ("float16", 0)])
def test_llama_merged_shard_by_shard_equals_peft_merge_and_unload(tmp_path, llama, dtype, atol):
    import torch
    from transformers import LlamaForCausalLM

    from tasks.release.merge import REL_TOLERANCE
    from tasks.release.shard_merge import shard_merge

    root, cfg, peft_model = llama
    assert len(list((root / "base").glob("model-*.safetensors"))) > 1
    figures = shard_merge(root / "base", root / "adapter", tmp_path, _meta(LlamaForCausalLM, cfg), dtype, 40_000)
    assert figures["lora_merged"] == 14 and figures["tied_written_once"] == ["lm_head.weight"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(figures["files"]) > 1 and set(index["weight_map"].values()) == set(figures["files"])
    assert "lm_head.weight" not in index["weight_map"]
    cfg.save_pretrained(tmp_path)
    merged = LlamaForCausalLM.from_pretrained(tmp_path, dtype=getattr(torch, dtype))
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    reference = _peft_merged(root, cfg)
    got = merged.state_dict()
    for name, want in reference.state_dict().items():
        want = want.to(getattr(torch, dtype))  # peft merges in float32; the export casts once at the end
        assert got[name].dtype == getattr(torch, dtype)
        assert torch.allclose(got[name].float(), want.float(), atol=atol, rtol=0), name
    ids = torch.randint(0, WORDS, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = peft_model(input_ids=ids).logits, merged.float()(input_ids=ids).logits
        base = _base(root)(input_ids=ids).logits
    rel = float((ref - out).abs().max() / ref.abs().max())
    assert rel < max(REL_TOLERANCE[dtype], 1e-5)  # what the export check allows for this dtype
    assert float((ref - base).abs().max()) > 0.05  # the adapter's effect is far larger than the check allows


def _base(root: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(root / "base").eval()


def _peft_merged(root: Path, cfg):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(root), root / "adapter").merge_and_unload(safe_merge=True)


def test_bert_heads_are_copied_and_the_prefixless_base_found(tmp_path, tiny_bert):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from tasks.release.shard_merge import shard_merge

    cfg = AutoConfig.from_pretrained(tiny_bert, num_labels=3)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, config=cfg)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    lora.modules_to_save = ["classifier", "pooler"]
    model = get_peft_model(base, lora).eval()
    with torch.no_grad():  # heads trained in full: change them so that a head left as the base's would show
        for p in model.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    figures = shard_merge(tiny_bert, tmp_path / "adapter", out, _meta(type(base), cfg), "float32", 10**9)
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= set(figures["copied_from_adapter"])
    assert figures["files"] == ["model.safetensors"]
    cfg.save_pretrained(out)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, merged(**enc).logits, atol=1e-5)


def test_a_damaged_adapter_key_is_named(tmp_path, llama):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    from tasks.release.errors import MergeError
    from tasks.release.shard_merge import shard_merge

    root, cfg, _ = llama
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((root / "adapter" / "adapter_config.json").read_text())
    weights = load_file(root / "adapter" / "adapter_model.safetensors")
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key.replace("q_proj", "qq_proj")] = weights.pop(key)
    save_file(weights, bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MergeError, match="q_proj.*lora_B but not both"):
        shard_merge(root / "base", bad, out, _meta(LlamaForCausalLM, cfg), "float32", 10**9)
    weights = load_file(root / "adapter" / "adapter_model.safetensors")
    weights["model.layers.0.stray"] = weights.pop(key)
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="'model.layers.0.stray' does not start with 'base_model.model.'"):
        shard_merge(root / "base", bad, out, _meta(LlamaForCausalLM, cfg), "float32", 10**9)
    assert list(out.iterdir()) == []


def test_dora_takes_the_in_memory_path(tmp_path, llama):
    from transformers import LlamaForCausalLM

    from tasks.release.errors import ShardMergeUnsupported
    from tasks.release.shard_merge import shard_merge

    root, cfg, _ = llama
    _adapter(LlamaForCausalLM.from_pretrained(root / "base"), tmp_path / "dora", use_dora=True)
    with pytest.raises(ShardMergeUnsupported, match="DoRA"):
        shard_merge(root / "base", tmp_path / "dora", tmp_path, _meta(LlamaForCausalLM, cfg), "float32", 10**9)


@pytest.fixture(scope="module")
def export_ws(tmp_path_factory, tiny_bert):
    ws = tmp_path_factory.mktemp("shard-export-ws")
    prepared = make_prepared(ws)
    return ws, make_run(ws, tiny_bert, prepared, "lora")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_export_merges_shard_wise_in_the_export_dtype(export_ws, dtype):
    import torch
    from safetensors import safe_open

    from tasks.release.export import export_run

    ws, run = export_ws
    result = export_run(make_config(ws, "lora", dtype=dtype), str(run), str(make_eval(ws, run, tag=dtype)))
    v = result.merge_verification
    assert v["passed"] and v["path"] == f"shard-wise ({dtype})" and v["shard_merge"]["lora_merged"] == 4
    assert v["merged_vs_adapter"]["changed_beyond_ties"] == 0
    assert v["merged_vs_adapter"]["max_abs_logit_diff"] < v["tolerance"] < v["adapter_effect_max_logit_diff"]
    with safe_open(str(Path(result.path) / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("classifier.weight").dtype == getattr(torch, dtype)
    assert json.loads((Path(result.path) / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]


def test_a_failed_verification_leaves_no_export(export_ws):
    """The merged weights are written into the export's temporary folder before the check: it must go."""
    from tasks.release.export import MergeError, export_run

    ws, run = export_ws
    before = sorted(p.name for p in (ws / "exports").iterdir()) if (ws / "exports").exists() else []
    cfg = make_config(ws, "lora", merge_tolerance=1e-12)  # the shard-wise path, float32
    with pytest.raises(MergeError, match="merge verification failed"):
        export_run(cfg, str(run), str(make_eval(ws, run, tag="strict")))
    after = sorted(p.name for p in (ws / "exports").iterdir()) if (ws / "exports").exists() else []
    assert after == before


def test_dora_exports_in_memory_in_bfloat16(export_ws, tiny_bert):
    """DoRA is merged by peft (the in-memory path), rounded to bfloat16, saved and checked in float32 all the same."""
    import torch
    from safetensors import safe_open

    from tasks.release.export import export_run

    ws, _ = export_ws
    run = make_run(ws, tiny_bert, make_prepared(ws), "dora", steps=20)
    result = export_run(make_config(ws, "dora", dtype="bfloat16"), str(run), str(make_eval(ws, run)))
    v = result.merge_verification
    assert v["passed"] and v["path"].startswith("in-memory") and "DoRA" in v["shard_merge_skipped"]
    assert v["saved_vs_in_memory"]["max_abs_logit_diff"] < 1e-5  # saved = the rounded model that was verified
    with safe_open(str(Path(result.path) / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("classifier.weight").dtype == torch.bfloat16
