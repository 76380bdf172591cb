"""Compact word embeddings (tasks/training/compact_embedding.py): training only the rows the data uses gives the
same model as dense AdamW over the whole matrix, the model's parameters and state dict keep their names and
shapes, a checkpoint of dense training resumes exactly, and the cases the argument does not cover stay dense."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tasks.training.compact_embedding import compact_embedding
from tasks.training.optimization import make_optimizer

VOCAB, USED = 500, list(range(5, 60))  # the batches use 55 of 500 token ids (+ the pad id 0)


def _model(tie: bool = False):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,  # the two runs must see the same forward
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(cfg)


def _batches(n: int = 6):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.tensor(USED)[torch.randint(0, len(USED), (4, 12), generator=g)]
        ids[:, -3:] = 0  # padding at the end of every row
        mask = (ids != 0).long()
        out.append((ids, mask, torch.randint(0, 3, (4,), generator=g)))
    return out


def _train(model, optimizer, batches, compact=None):
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)  # the rate moves every step
    model.train()
    for ids, mask, y in batches:
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 0.5)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
    if compact:
        compact.sync()


def test_compact_rows_train_the_same_model_as_dense_adamw():
    dense, compact_model = _model(), _model()
    batches = _batches()
    opt_dense = make_optimizer(dense, 1e-2, 0.1)
    train_ids = [row.tolist() for ids, _, _ in batches for row in ids]
    compact = compact_embedding(compact_model, train_ids, [0], True, "adamw")
    assert compact is not None and len(compact.ids) == len(USED) + 1  # the used ids and the pad id
    opt = make_optimizer(compact_model, 1e-2, 0.1, "adamw", {compact.weight: compact.rows})
    compact.attach(opt)
    before = compact_model.get_input_embeddings().weight.detach().clone()
    _train(dense, opt_dense, batches)
    _train(compact_model, opt, batches, compact)

    got, want = compact_model.state_dict(), dense.state_dict()
    assert list(got) == list(want)  # same names, nothing added
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name
    emb = got["bert.embeddings.word_embeddings.weight"]
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[[0, *USED]] = False
    assert not torch.equal(emb[unused], before[unused])  # weight decay reached the rows no batch used
    assert torch.equal(emb[0], before[0])  # the padding row never moves (no gradient, and it is a used row)
    assert not torch.equal(emb[USED], before[USED])
    # the optimizer keeps moments for the used rows only
    assert opt.state[compact.rows]["exp_avg"].shape == (len(USED) + 1, 32)

    compact_model.eval()  # evaluation reads the full matrix, including ids training never saw
    probe = torch.tensor([[1, 5, 400, 499, 0]])
    with torch.no_grad():
        assert torch.allclose(compact_model(input_ids=probe).logits, dense.eval()(input_ids=probe).logits, atol=1e-5)


def test_a_dense_checkpoint_resumes_into_compact_rows():
    dense = _model()
    batches = _batches()
    opt_dense = make_optimizer(dense, 1e-2, 0.1)
    _train(dense, opt_dense, batches[:3])
    weights, opt_state = copy.deepcopy(dense.state_dict()), copy.deepcopy(opt_dense.state_dict())  # as if from files

    resumed = _model()
    train_ids = [row.tolist() for ids, _, _ in batches for row in ids]
    compact = compact_embedding(resumed, train_ids, [0], True, "adamw")
    opt = make_optimizer(resumed, 1e-2, 0.1, "adamw", {compact.weight: compact.rows})
    compact.attach(opt)
    resumed.load_state_dict(weights)
    opt.load_state_dict(opt_state)
    compact.refresh(opt)
    assert opt.state[compact.rows]["exp_avg"].shape == compact.rows.shape
    # the cut is exact: the dense moments of the rows no batch used were zero
    full = opt_state["state"][0]["exp_avg"]  # the word embeddings' moments, dense
    assert full.shape[0] == VOCAB and float(full[[i for i in range(VOCAB) if i not in {0, *USED}]].abs().max()) == 0.0

    _train(dense, opt_dense, batches[3:])
    _train(resumed, opt, batches[3:], compact)
    for name, want in dense.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], want, rtol=1e-5, atol=1e-6), name


def test_detach_gives_back_a_plain_embedding():
    model = _model()
    compact = compact_embedding(model, [USED], [0], True, "adamw")
    emb = model.get_input_embeddings()
    assert "forward" in emb.__dict__
    compact.detach()
    assert "forward" not in emb.__dict__ and type(emb).forward is torch.nn.Embedding.forward


@pytest.mark.parametrize("case", ["two_processes", "bnb_optimizer", "frozen", "most_rows_used", "tied"])
def test_cases_outside_the_argument_stay_dense(case):
    model = _model()
    ids, processes, optimizer = [USED], True, "adamw"
    if case == "two_processes":
        processes = False
    elif case == "bnb_optimizer":
        optimizer = "paged_adamw_8bit"
    elif case == "frozen":  # LoRA: the embeddings are not trained
        model.get_input_embeddings().weight.requires_grad_(False)
    elif case == "most_rows_used":
        ids = [list(np.arange(VOCAB))]
    elif case == "tied":  # a language model's output layer shares the matrix: every row gets a gradient
        model.get_output_embeddings = lambda: model.get_input_embeddings()
    assert compact_embedding(model, ids, [0], processes, optimizer) is None
