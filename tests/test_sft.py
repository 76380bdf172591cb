"""Instruction tuning on a tiny random Llama built here with a chat tokenizer trained here: formats, validation,
masking (prompt tokens never reach the loss), packing (no attention across examples), chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_csv

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = (
    "extract the order id from message answer json intent billing shipping refund product hub bulb cam "
    "yes no what is the colour of sky blue green red one two three four five six seven eight nine ten"
).split()


def _chat_tokenizer(path: Path, template: str | None = CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(WORDS)] * 5 + [str(i) for i in range(200)] + ['{ " : } , null']
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>", model_max_length=512
    )
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def chat_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer has ChatML special tokens and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("chat-llama")
    tok = _chat_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _tok(path):
    from tasks.model.base import load_tokenizer

    return load_tokenizer(str(path))


TWO_TURNS = [
    {"role": "user", "content": "what is the colour of sky"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "extract the order id"},
    {"role": "assistant", "content": "one two three"},
]


# ---- formats and validation --------------------------------------------------------------------------------


def test_every_common_shape_becomes_a_conversation():
    from tasks.data.chat import detect_format, to_messages

    assert detect_format(["prompt", "response"]) == "prompt_response"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["messages"]) == "messages" and detect_format(["conversations"]) == "sharegpt"
    msgs, problem = to_messages({"instruction": "extract", "input": "order 7", "output": "7"}, "alpaca")
    assert problem is None and msgs == [
        {"role": "user", "content": "extract\n\norder 7"},
        {"role": "assistant", "content": "7"},
    ]
    msgs, problem = to_messages(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"
    )
    assert problem is None and [m["role"] for m in msgs] == ["user", "assistant"]
    msgs, problem = to_messages({"messages": json.dumps(TWO_TURNS)}, "messages")  # a CSV cell holding JSON
    assert problem is None and len(msgs) == 4


@pytest.mark.parametrize(
    "row, fmt, needle",
    [
        ({"prompt": "q", "response": "  "}, "prompt_response", "empty assistant response"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
            "messages",
            "unknown role",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "and?"},
                ]
            },
            "messages",
            "ends with a 'user' turn",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn"),
        ({"messages": "not json"}, "messages", "not a list of messages"),
    ],
)
def test_bad_rows_are_named(row, fmt, needle):
    from tasks.data.chat import to_messages

    _, problem = to_messages(row, fmt)
    assert problem and needle in problem


def test_the_data_stage_reports_every_bad_row_with_file_and_row(tmp_path):
    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.sources import DataError

    rows = [{"prompt": f"what is {i}", "response": str(i)} for i in range(30)]
    rows[3]["response"] = ""
    rows[7]["prompt"] = ""
    src = write_csv(tmp_path / "sft.csv", rows)
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}", f"data.source={src}", "data.task=sft"])
    with pytest.raises(DataError) as err:
        prepare_dataset(cfg)
    text = str(err.value)
    assert "2 problems" in text and "sft.csv row 4" in text and "empty assistant response" in text
    assert "sft.csv row 8" in text and "empty prompt" in text
    assert not (tmp_path / "ws" / "datasets").exists() or not list((tmp_path / "ws" / "datasets").iterdir())


def test_a_prompt_that_leaves_no_room_for_the_answer_is_an_error(tmp_path, chat_llama):
    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.sources import DataError
    from tasks.data.tokenize import tokenize_dataset

    rows = [
        {"prompt": f"what is the colour of sky {i} " + "blue " * (60 if i == 5 else 0), "response": "blue"}
        for i in range(30)
    ]
    src = write_csv(tmp_path / "long.csv", rows)
    cfg = load_config(
        None, [f"workspace={tmp_path / 'ws'}", f"data.source={src}", "data.task=sft", "data.max_length=48"]
    )
    prepared = prepare_dataset(cfg)
    with pytest.raises(DataError, match="leaves no room for the answer within data.max_length=48"):
        tokenize_dataset(prepared.path, str(chat_llama), cfg)


# ---- masking ---------------------------------------------------------------------------------------------------


def test_labels_cover_every_assistant_turn_and_nothing_else(chat_llama):
    from tasks.data.sft_tokens import IGNORE, encode

    tok = _tok(chat_llama)
    e = encode(tok, TWO_TURNS, 256)
    trained = tok.decode([i for i, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE])
    assert "blue" in trained and "one two three" in trained and trained.count("<|im_end|>") == 2
    assert "colour" not in trained and "extract" not in trained and "user" not in trained


def test_the_response_loss_is_transformers_causal_lm_loss_summed():
    """causal_lm_loss shifts the labels instead of copying the logits; it must stay the loss transformers trains its
    causal LMs with (ForCausalLMLoss), summed over the target tokens."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from tasks.data.sft_rows import causal_lm_loss
    from tasks.data.sft_tokens import IGNORE

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 17)
    labels = torch.randint(0, 17, (3, 9))
    labels[:, :4] = IGNORE  # the prompt
    labels[2, 7:] = IGNORE  # padding
    ours = causal_lm_loss(logits, labels)
    theirs = ForCausalLMLoss(logits, labels, vocab_size=17, num_items_in_batch=torch.tensor(1))
    assert torch.allclose(ours, theirs, rtol=1e-6)
    assert ours.requires_grad is False and ours.ndim == 0


def test_prompt_tokens_never_reach_the_loss_or_the_gradients(chat_llama):
    """Change the target of a prompt position: the loss and every gradient stay exactly the same; change an
    answer token's target and the loss moves (the test would notice a mask that leaks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.data.sft_rows import causal_lm_loss
    from tasks.data.sft_tokens import IGNORE, encode

    tok = _tok(chat_llama)
    e = encode(tok, TWO_TURNS, 256)
    model = AutoModelForCausalLM.from_pretrained(chat_llama)
    ids = torch.tensor([e.input_ids])
    mask = torch.tensor([[lab != IGNORE for lab in e.labels]])

    def loss_and_grads(targets):
        model.zero_grad()
        labels = torch.where(mask, torch.tensor([targets]), torch.full_like(ids, IGNORE))
        loss = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, labels)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    base_loss, base_grads = loss_and_grads(list(e.input_ids))
    prompt_pos = next(i for i in range(2, len(e.labels)) if e.labels[i] == IGNORE)
    changed = list(e.input_ids)
    changed[prompt_pos] = (changed[prompt_pos] + 7) % len(tok)
    loss, grads = loss_and_grads(changed)
    assert loss == base_loss and all(torch.equal(a, b) for a, b in zip(grads, base_grads, strict=True))
    answer_pos = next(i for i in range(1, len(e.labels)) if e.labels[i] != IGNORE)
    changed = list(e.input_ids)
    changed[answer_pos] = (changed[answer_pos] + 7) % len(tok)
    assert loss_and_grads(changed)[0] != base_loss


# ---- packing -----------------------------------------------------------------------------------------------------


def test_a_packed_example_gets_the_logits_it_gets_alone(tmp_path, chat_llama):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.data.sft_rows import TokenRows
    from tasks.data.sft_tokens import encode

    tok = _tok(chat_llama)
    convs = [
        [{"role": "user", "content": f"what is {w}"}, {"role": "assistant", "content": w}]
        for w in ("one", "two three", "four five six", "seven")
    ]
    enc = [encode(tok, c, 256) for c in convs]
    split = tmp_path / "train"
    datasets.Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in enc],
            "labels": [e.labels for e in enc],
            "length": [len(e.input_ids) for e in enc],
        }
    ).save_to_disk(str(split))
    packed = TokenRows(str(split), tok.pad_token_id, packing=True, max_length=64)
    assert len(packed) < len(enc)  # examples share rows
    model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    with torch.no_grad():
        for unit, members in enumerate(packed.units):
            batch, _ = packed.collate([unit], "cpu")
            logits = model(**batch).logits[0]
            start = 0
            for i in members:
                n = len(enc[i].input_ids)
                alone = model(input_ids=torch.tensor([enc[i].input_ids]), use_cache=False).logits[0]
                assert torch.allclose(logits[start : start + n], alone, atol=1e-5), (unit, i)
                start += n
    assert packed.total_weight == TokenRows(str(split), tok.pad_token_id).total_weight  # the same answer tokens


# ---- chat templates ----------------------------------------------------------------------------------------------


def test_a_tokenizer_without_a_template_gets_the_named_fallback(tmp_path):
    from tasks.data.sft_tokens import FALLBACK_NAME, IGNORE, encode, template_of

    tok = _chat_tokenizer(tmp_path / "plain", template=None)
    template, name = template_of(tok)
    assert name == FALLBACK_NAME and template
    e = encode(tok, TWO_TURNS, 256, template)
    assert "blue" in tok.decode([i for i, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE])


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template whose rendering of a prefix is not a prefix of the whole (here: it numbers the turns from the
    end) would put the loss on the wrong tokens; it is refused with a clear error."""
    from tasks.data.sft_tokens import TemplateError, encode

    odd = (
        "{% for message in messages %}{{ '<|im_start|>' + (messages|length - loop.index)|string + message['role'] "
        "+ '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tok = _chat_tokenizer(tmp_path / "odd", template=odd)
    with pytest.raises(TemplateError, match="prefix"):
        encode(tok, TWO_TURNS, 256)


# ---- training, merge and export round trip (tiny model) -----------------------------------------------------------


def _sft_rows(n: int = 60) -> list[dict]:
    import random

    rng = random.Random(0)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = []
    for i in range(n):
        w = rng.choice(words)
        rows.append({"prompt": f"what is {w} {i}", "response": f"{w} yes"})
    return rows


@pytest.mark.child
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_export_loads_in_a_text_generation_pipeline_and_the_adapter_alone_in_peft(tmp_path, chat_llama, method):
    """Train (child process), evaluate against the base model, merge (verified on answer-token logits and greedy
    answers) and export; the export answers through pipeline("text-generation") like the adapter model, and the
    adapter alone loads with PeftModel."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, pipeline

    from tasks.config_loading import load_config
    from tasks.data.prepare import prepare_dataset
    from tasks.data.tokenize import tokenize_dataset
    from tasks.evaluation.evaluate import evaluate_run
    from tasks.model.loading import load_trained_model
    from tasks.release.export import export_run
    from tasks.training.recipe import train_from_config

    src = write_csv(tmp_path / "sft.csv", _sft_rows())
    cfg = load_config(
        None,
        [
            f"workspace={tmp_path / 'ws'}",
            f"data.source={src}",
            f"model.name_or_path={chat_llama}",
            "data.task=sft",
            f"method.kind={method}",
            "method.target_modules=all-linear",
            "training.learning_rate=0.01",
            "training.epochs=2",
            "data.max_length=48",
            "training.effective_batch_size=8",
            "evaluation.generation_samples=6",
            "evaluation.max_new_tokens=4",
            "data.packing=true",
        ],
    )
    prepared = prepare_dataset(cfg)
    tokenized = tokenize_dataset(prepared.path, str(chat_llama), cfg)
    assert json.loads((Path(tokenized.path) / "tokenized.json").read_text())["chat_template"].startswith("the token")
    run = train_from_config(cfg, prepared.path, tokenized.path)
    build = json.loads((Path(run.path) / "build.json").read_text())
    assert set(build["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ev = evaluate_run(cfg, run.path)
    m = json.loads((Path(ev.path) / "metrics.json").read_text())
    assert m["task"] == "sft" and {"response_loss", "perplexity", "exact_match", "rouge_l"} <= set(m["metrics"])
    assert m["metrics"]["response_loss"] < m["baselines"]["base"]["metrics"]["response_loss"]  # it learned
    assert m["forgetting"]["before"] > 0 and len(json.loads((Path(ev.path) / "samples.json").read_text())) == 6
    exported = export_run(cfg, run.path, ev.path)
    v = exported.merge_verification
    assert v["passed"] and v["merged_vs_adapter"]["max_abs_logit_diff"] < 1e-4 and v["greedy_identical"] == 4
    if method == "qlora":
        assert v["quantized_reference"] and v["merged_vs_quantized"]["identical_prediction_share"] >= 0.9
    folder = Path(exported.path)
    assert (folder / "chat_template.jinja").exists() or "chat_template" in (
        folder / "tokenizer_config.json"
    ).read_text()
    gen = pipeline("text-generation", model=str(folder), device="cpu")
    question = [{"role": "user", "content": "what is two 3"}]
    answer = gen(question, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]["content"]
    model, tok = load_trained_model(run.path, "cpu")
    from tasks.evaluation.sft_eval import generate

    assert answer.strip() == generate(model, tok, [question], 4)[0]  # the export answers as the trained model
    if method == "lora":  # the adapter alone, on the base, with peft
        base = AutoModelForCausalLM.from_pretrained(chat_llama)
        peft_model = PeftModel.from_pretrained(base, folder / "adapter").eval()
        ids = tok.apply_chat_template(question, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            a = peft_model(**ids).logits
            b = model(**ids).logits
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_real_smollm2_learns_a_few_rows_through_the_cli(tmp_path):
    """The bundled SmolLM2-135M-Instruct (GGUF, converted once into the workspace) through `finetune run` on a few
    rows of the SFT demo: every stage runs, the export loads through pipeline("text-generation")."""
    import subprocess
    import sys

    from conftest import REPO

    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "tasks.cli",
        "run",
        "configs/sft-demo.yaml",
        "--summary-json",
        str(summary),
        "--set",
        f"workspace={tmp_path / 'ws'}",
        "--set",
        "data.max_rows=40",
        "--set",
        "training.epochs=1",
        "--set",
        "evaluation.generation_samples=3",
        "--set",
        "evaluation.max_new_tokens=24",
        "--set",
        "evaluation.forgetting_reference=null",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["state"] == "Completed" and {"response_loss", "exact_match"} <= set(s["metrics"])
    assert s["metrics"]["response_loss"] < s["baselines"]["base"]["response_loss"]
    models = list((tmp_path / "ws" / "models").glob("smollm2-135m-instruct-*/model.safetensors"))
    assert len(models) == 1  # converted once, into the workspace
    code = (
        "import sys, json\nfrom transformers import pipeline\ng = pipeline('text-generation', model=sys.argv[1])\n"
        "print(json.dumps(g([{'role': 'user', 'content': 'Hi'}], max_new_tokens=5)[0]['generated_text'][-1]))"
    )
    out = subprocess.run([sys.executable, "-c", code, s["export"]], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and '"assistant"' in out.stdout.splitlines()[-1], out.stderr[-2000:]


def test_the_demo_instruction_set_is_what_its_script_writes_and_its_answers_follow_the_rules(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "sft.jsonl"
    subprocess.run(
        [sys.executable, str(repo / "data/demo/make_sft_demo.py"), "--out", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes() == (repo / "data/demo/sft.jsonl").read_bytes(), "run data/demo/make_sft_demo.py"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [json.loads(r["response"]) for r in rows]
    assert all(set(a) == {"intent", "product", "order"} for a in answers)
    for r, a in zip(rows, answers, strict=True):
        message = r["prompt"].split("\n", 1)[1]
        if a["order"] is not None:  # the six digits appear in the message, however they were written
            assert a["order"] in message and len(a["order"]) == 6
        if a["product"] is not None:
            assert a["product"].lower() in message.lower()
    assert 0.1 < sum(a["order"] is not None for a in answers) / len(answers) < 0.9
    assert 0.1 < sum(a["product"] is not None for a in answers) / len(answers) < 0.9
