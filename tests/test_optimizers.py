"""training.optimizer: torch's AdamW and bitsandbytes' 8-bit / paged AdamW. Each optimizer the CPU supports trains a
tiny model and resumes from a checkpoint exactly where an uninterrupted run goes; `auto` resolves per method and
device in the plan; a paged optimizer off CUDA is a configuration error naming the setting and the fix; the plan
records the optimizer and its keys change with it. Also `method.target_modules: all-linear` for every adapter method.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import plan_for, prepare_run, tiny_plan
from test_train import make_cfg, prepare, step_losses, task_rows, write_rows

CPU_OPTIMIZERS = ("adamw", "adamw_8bit")  # bitsandbytes 0.50 runs 8-bit AdamW on CPU; paged needs CUDA


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("optim-data") / "single", task_rows("single_label"))


def _evals(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]


def _quant_state_dtypes(optimizer_file: Path) -> set:
    """dtypes of the moments in a saved optimizer state (bitsandbytes wraps them in a nested dict)."""
    import torch

    state = torch.load(optimizer_file, weights_only=True)["state"]  # what resume does: weights_only=True
    out = set()
    for per_param in state.values():
        inner = per_param.get("__bnb_optimizer_quant_state__", per_param)
        out |= {v.dtype for k, v in inner.items() if k in ("state1", "state2", "exp_avg", "exp_avg_sq")}
    return out


@pytest.mark.parametrize("kind", CPU_OPTIMIZERS)
def test_cpu_optimizer_trains_and_resumes_where_an_uninterrupted_run_goes(tmp_path, tiny_llama, source, kind):
    import torch

    from tasks.training import loop

    extra = [
        f"training.optimizer={kind}",
        "training.learning_rate=0.003",
        "training.epochs=2",
        "training.save_every_steps=2",
        "training.weight_decay=0.01",
    ]
    cfg = make_cfg(tmp_path / "ws", source, tiny_llama, "single_label", "full", extra)
    run = prepare_run(cfg, *prepare(cfg, tiny_llama))
    _, model = loop.run(str(run), return_model=True)
    assert json.loads((run / "plan.json").read_text())["optimizer"] == kind

    losses = step_losses(run)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"{kind}: training loss did not go down: {first:.4f} -> {last:.4f}"

    kept = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    total = kept[-1]
    assert total == len(losses) and kept[-2] < total
    dtypes = _quant_state_dtypes(run / "checkpoints" / f"step-{total}" / "optimizer.pt")
    # 8-bit: the moments of tensors of 4096+ values (the embeddings here) are stored as uint8, the rest as fp32
    assert (torch.uint8 in dtypes) == (kind == "adamw_8bit") and torch.float32 in dtypes
    reference = {
        "losses": losses,
        "evals": _evals(run),
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
    }

    # interrupt after the previous checkpoint: drop the last one and the finished model, then run again
    shutil.rmtree(run / "checkpoints" / f"step-{total}")
    shutil.rmtree(run / "model")
    (run / "training_summary.json").unlink()
    summary, resumed = loop.run(str(run), return_model=True)
    assert summary["resumed_from_step"] == kept[-2]
    assert step_losses(run) == pytest.approx(reference["losses"], rel=1e-6, abs=1e-7)
    assert [e["val_loss"] for e in _evals(run)] == pytest.approx([e["val_loss"] for e in reference["evals"]], rel=1e-6)
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, reference["weights"][name], rtol=1e-5, atol=1e-6), name


def test_auto_resolves_per_method_and_device():
    from tasks.model.methods import METHODS
    from tasks.optimizers import resolve_optimizer

    for name, method in METHODS.items():
        for device in ("cpu", "cuda", "cuda:1"):
            want = "paged_adamw_32bit" if (method.quantized and device.startswith("cuda")) else "adamw"
            assert resolve_optimizer("auto", method.quantized, device) == want, (name, device)
            for explicit in ("adamw", "adamw_8bit"):  # an explicit choice stands, on any device
                assert resolve_optimizer(explicit, method.quantized, device) == explicit
            if device.startswith("cuda"):
                assert resolve_optimizer("paged_adamw_8bit", method.quantized, device) == "paged_adamw_8bit"


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_plan_records_the_optimizer_auto_on_cpu_and_on_cuda(tmp_path, tiny_llama, source, method):
    from tasks.training.planner import resolve_plan
    from tasks.workspace import Workspace

    cfg = make_cfg(tmp_path / "ws", source, tiny_llama, "single_label", method)
    prepared, tokenized = prepare(cfg, tiny_llama)
    assert plan_for(cfg, prepared, tokenized).optimizer == "adamw"  # this machine has no GPU
    ws = Workspace.at(cfg.workspace)
    on_cuda = resolve_plan(cfg, Workspace.read_dataset(prepared), Workspace.read_tokenized(tokenized), ws, "cuda")
    assert on_cuda.optimizer == ("paged_adamw_32bit" if method == "qlora" else "adamw")


def test_paged_optimizer_on_cpu_is_a_config_error_naming_the_setting_and_the_fix(tmp_path, tiny_llama, source):
    from tasks.config import ConfigError

    for kind in ("paged_adamw_8bit", "paged_adamw_32bit"):
        cfg = make_cfg(tmp_path / kind, source, tiny_llama, "single_label", "qlora", [f"training.optimizer={kind}"])
        with pytest.raises(ConfigError) as err:
            plan_for(cfg, *prepare(cfg, tiny_llama))
        assert err.value.problems[0][0] == "training.optimizer"
        assert "cpu" in str(err.value) and "fix: training.optimizer=adamw_8bit" in str(err.value)


def test_unknown_optimizer_is_rejected_by_the_config(tmp_path):
    from tasks.config import ConfigError
    from tasks.config_loading import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [f"workspace={tmp_path}", "training.optimizer=sgd"])
    assert "training.optimizer" in str(err.value) and "paged_adamw_8bit" in str(err.value)


def test_optimizer_is_part_of_the_run_trial_and_search_keys(tiny_llama):
    plan = tiny_plan(tiny_llama)
    assert plan.optimizer == "adamw"
    other = dataclasses.replace(plan, optimizer="adamw_8bit")
    assert other.run_key() != plan.run_key()
    assert other.trial_key(1e-3, 10) != plan.trial_key(1e-3, 10)
    assert other.search_key() != plan.search_key()


def test_make_optimizer_builds_each_kind_with_the_weight_decay_groups(tiny_llama):
    import bitsandbytes as bnb
    import torch

    from tasks.model.build import build_model
    from tasks.optimizers import BNB_OPTIMIZERS
    from tasks.training.optimization import make_optimizer

    model = build_model(tiny_plan(tiny_llama, method="lora")).model
    for kind in ("adamw", *BNB_OPTIMIZERS):
        opt = make_optimizer(model, 1e-3, 0.05, kind)
        expected = torch.optim.AdamW if kind == "adamw" else getattr(bnb.optim, BNB_OPTIMIZERS[kind])
        assert type(opt) is expected
        decay = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in opt.param_groups}
        assert decay[0.05] == {2} and all(n < 2 for n in decay.get(0.0, {1}))
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(model, 1e-3, 0.0, "sgd")


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_all_linear_targets_every_linear_layer_of_the_body_for_each_adapter_method(tiny_llama, method):
    from tasks.config_loading import load_config
    from tasks.model.build import build_model

    cfg = load_config(None, [f"method.kind={method}", "method.target_modules=all-linear"])
    assert cfg.method.target_modules == "all-linear"
    plan = tiny_plan(
        tiny_llama, method=method, method_settings={"target_modules": "all-linear"}, skip_modules=["score"]
    )
    built = build_model(plan)
    assert set(built.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapted = {n.rsplit(".", 1)[-1] for n, m in built.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(built.target_modules)  # the MLP too; never the head (`score`)


def test_memory_estimate_counts_the_optimizers_state(tiny_llama):
    from tasks.model.memory import estimate_memory

    def est(optimizer: str, device: str = "cpu") -> dict:
        kw = {"micro_batch_size": 2, "max_length": 32, "device": device, "optimizer": optimizer}
        return estimate_memory(tiny_llama, {"target_modules": "all-linear"}, **kw)

    adamw, eight = est("adamw"), est("adamw_8bit")
    for kind in ("full", "lora", "qlora"):
        a, b = adamw["methods"][kind]["bytes"], eight["methods"][kind]["bytes"]
        assert b["optimizer"] == pytest.approx(a["optimizer"] / 4, rel=1e-6)  # two uint8 moments, not two fp32
        assert a["weights"] == b["weights"] and a["total"] - b["total"] == a["optimizer"] - b["optimizer"]
        assert eight["methods"][kind]["optimizer_kind"] == "adamw_8bit"
    paged = est("paged_adamw_8bit")  # cannot run on this CPU: nothing fits, and the estimate says why
    assert all(not m["fits"] and m["optimizer_kind"] is None for m in paged["methods"].values())
    assert paged["choice"] is None and "training.optimizer: paged_adamw_8bit" in paged["reason"]


def test_auto_targets_mean_all_linear_and_attention_keeps_the_projections(tiny_llama, tiny_bert):
    from transformers import AutoConfig

    from tasks.model.build import find_target_modules, head_module_names, meta_model, resolve_targets

    for base, heads in ((tiny_llama, ["score"]), (tiny_bert, None)):
        meta = meta_model(AutoConfig.from_pretrained(base))
        heads = heads or head_module_names(meta)
        assert resolve_targets(meta, heads, "auto") == resolve_targets(meta, heads, "all-linear")
        assert resolve_targets(meta, heads, "attention") == find_target_modules(meta, heads)
        assert set(resolve_targets(meta, heads, "attention")) < set(resolve_targets(meta, heads, "auto"))
