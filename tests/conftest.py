"""Shared test fixtures: an isolated environment, tiny random models (BERT, Llama) with tokenizers
trained in the test, saved with save_pretrained and reloaded through the real loading code."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

# Isolate every cache before anything imports transformers, datasets or prefect.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="finetune-tests-"))
for var, sub in (("HF_HOME", "hf"), ("PREFECT_HOME", "prefect"), ("XDG_CACHE_HOME", "cache"), ("MPLCONFIGDIR", "mpl")):
    os.environ[var] = str(_SESSION_TMP / sub)
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    DO_NOT_TRACK="1",
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

WORDS = {
    "pos": "great good excellent love wonderful happy superb fine nice amazing".split(),
    "neg": "bad awful terrible hate poor sad horrible worst ugly boring".split(),
    "neu": "table chair window paper green blue seven river stone cloud".split(),
}


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} is absent (expected beside the repository in ../shared/data)")
    return p


def toy_rows(n: int = 120, classes: tuple[str, ...] = ("pos", "neg", "neu"), seed: int = 0) -> list[dict]:
    """A learnable toy set: each class has its own vocabulary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = classes[i % len(classes)]
        words = rng.choices(WORDS[c], k=rng.randint(3, 9)) + rng.choices(WORDS["neu"], k=rng.randint(0, 2))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": c})
    return rows


def _corpus() -> list[str]:
    return [" ".join(v) for v in WORDS.values()] * 5 + [str(i) for i in range(1000)]


def _bert_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # An explicit vocabulary, not WordPieceTrainer: the trainer breaks frequency ties differently in every process
    # (the vocabulary's hash changed run to run), so token ids, and with them whether a tiny model learns the toy
    # task in a few steps, varied between CI runs.
    chars = sorted(set("".join(_corpus())))
    pieces = [*chars, *(f"##{c}" for c in chars), *(w for ws in WORDS.values() for w in ws), *map(str, range(100))]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    fast.save_pretrained(path)
    return fast


def _llama_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    fast.save_pretrained(path)  # no pad token on purpose: decoders ship without one
    return fast


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT encoder folder (config, safetensors weights, tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = _bert_tokenizer(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama decoder folder (no pad token in its tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = _llama_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    import csv

    columns = columns or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


# ---- training helpers shared by the training tests ------------------------------------------------------------


def plan_for(cfg, prepared, tokenized):
    """The resolved RunPlan of `cfg` on prepared/tokenized folders (the rate must not be `auto`)."""
    from tasks.training.planner import plan_run

    plan = plan_run(cfg, prepared, tokenized)
    assert plan.learning_rate is not None, "set training.learning_rate to a number or 'default' in this test"
    return plan


def prepare_run(cfg, prepared, tokenized) -> Path:
    """The run folder of cfg's plan with its plan.json, nothing launched (tests then run the loop in-process)."""
    from tasks.training.launch import prepare_run as prepare
    from tasks.workspace import Workspace

    return prepare(plan_for(cfg, prepared, tokenized), Workspace.at(cfg.workspace))


def train_model(cfg, prepared, tokenized):
    """Plan, search when the rate is auto, train in the child process: the `finetune train` path."""
    from tasks.training.recipe import train_from_config

    return train_from_config(cfg, prepared, tokenized)


def tiny_plan(base, task: str = "single_label", labels=("neg", "neu", "pos"), method: str = "full", **fields):
    """A RunPlan built by hand for unit tests of the builder and loaders (no dataset folders needed)."""
    from tasks.model.methods import get_method
    from tasks.plan import RunPlan

    m = get_method(method)
    settings = {k: v for k, v in fields.pop("method_settings", {}).items() if k in m.settings}
    quantization = m.quantization(
        {**{"quant_type": "nf4", "double_quant": True}, **settings}, "float32", fields.pop("skip_modules", [])
    )
    plan = dict(
        task=task,
        labels=list(labels) if task != "regression" else [],
        target_name="target",
        dataset_fingerprint="d",
        prepared_path="",
        tokenized_key="t",
        tokenized_path="",
        max_length=32,
        base_model=str(base),
        base_model_name=str(base),
        base_model_fingerprint="b",
        tokenizer_path=str(base),
        head="pooler",
        head_reason="test",
        method=method,
        method_reason="test",
        method_settings=settings,
        quantization=quantization,
        learning_rate=1e-3,
        learning_rate_source="config",
        epochs=1,
        effective_batch_size=8,
        micro_batch_size=8,
        gradient_accumulation_steps=1,
        processes=1,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_every_epochs=1,
        group_by_length=True,
        seed=42,
        loss="cross_entropy",
        early_stopping_metric="val_loss",
        patience=2,
        min_delta=0.0,
        device="cpu",
        precision="fp32",
        base_dtype="float32",
        gradient_checkpointing=False,
        timeout_s=600,
        save_every_steps=None,
    )
    plan.update(fields)
    return RunPlan(**plan)
