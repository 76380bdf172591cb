"""Resolving a RunPlan (tasks/plan.py) once, from the config, the prepared and tokenized data and the base model.

`plan_run(cfg, dataset, tokenized, ws)` returns the plan, resolved on the first call and read back from
`<workspace>/plans/<key>.json` afterwards: the key hashes the config sections the plan depends on, the dataset
fingerprint, the tokenized key, the base model's fingerprint (memoized by size and mtime, tasks/model/base.py),
the start adapter, and the hardware signature (CUDA present, CPU bf16 support) read without torch. A cached run
therefore resolves nothing and imports nothing heavy.
"""

from __future__ import annotations

import math
from pathlib import Path

from tasks.config import RunConfig
from tasks.files import sha256_json, sha256_tree
from tasks.model.base import hardware_signature, model_fingerprint, resolve_model
from tasks.model.methods import get_method
from tasks.optimizers import resolve_optimizer
from tasks.plan import PLAN_VERSION, RunPlan
from tasks.training.losses import METRICS_FOR_TASK, check_early_stopping_metric, resolve_loss
from tasks.workspace import DatasetFacts, TokenizedFacts, Workspace, read_facts

# What early stopping and the rate search select on by default: the evaluation's primary metric, computed on
# validation; for instruction tuning the validation loss on the response tokens (generation is too slow to run
# at every epoch and trial).
PRIMARY_METRIC = {"single_label": "f1_macro", "multi_label": "f1_micro", "regression": "r2", "sft": "val_loss"}
LOWER_IS_BETTER = {"loss", "val_loss", "mse", "mae", "rmse", "hamming_loss", "perplexity", "response_loss"}


def default_rungs(train_rows: int, effective_batch: int) -> list[int]:
    """Rung 1: 25 % of an epoch (8..60 steps); rung 2: four times that, at most one epoch (at least twice rung 1).

    Rung 2 ends where the real run is first evaluated (one epoch) when the epoch is short enough: an unstable
    rate needs steps at full rate to show (GoEmotions, QLoRA, after warmup at full rate: 5e-3 scored micro-F1
    0.304 at 28 steps, ahead of 2e-3, and 0.242 at 112 steps, behind 2e-3's 0.345)."""
    per_epoch = max(1, math.ceil(train_rows / max(1, effective_batch)))
    first = int(min(60, max(8, round(0.25 * per_epoch))))
    return [first, max(2 * first, min(per_epoch, 4 * first))]


def batch_plan(effective: int, processes: int, micro: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation steps): micro up to the per-process batch, capped at 32, dividing it evenly."""
    if micro is None:
        per_proc = max(1, effective // processes)
        micro = next(
            m for m in range(min(per_proc, 32), 0, -1) if per_proc % m == 0 and effective % (m * processes) == 0
        )
    return micro, max(1, effective // (micro * processes))


def early_stopping_metric(cfg: RunConfig, task: str) -> str:
    """training.early_stopping.metric, with auto = the evaluation's primary metric (f1_macro / f1_micro / r2)."""
    metric = cfg.training.early_stopping.metric
    if metric != "auto":
        return metric
    primary = cfg.evaluation.primary_metric
    return primary if primary in METRICS_FOR_TASK[task] else PRIMARY_METRIC[task]


# training.precision=auto on a CPU with native bf16 (avx512_bf16 / amx_bf16): bf16 autocast when True. Off until
# its quality and speed are measured against fp32 (benchmarks/RESULTS.md, [2-5]).
CPU_AUTO_BF16 = False


def _cpu_has_bf16() -> bool:
    hw = hardware_signature()
    return bool(hw["avx512_bf16"] or hw["amx_bf16"])


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _precision(setting: str, device: str) -> tuple[str, str | None]:
    """(precision, note). On CPU: bf16 autocast when asked for (slow on CPUs without native bf16: the note says
    so); fp16 has no fast CPU path, so it trains in fp32 with a note; auto stays fp32 (CPU_AUTO_BF16)."""
    if not device.startswith("cuda"):
        native = _cpu_has_bf16()
        if setting == "bf16" or (setting == "auto" and CPU_AUTO_BF16 and native):
            note = None if native else "bf16 on a CPU without avx512_bf16/amx_bf16: emulated, likely slower than fp32"
            return "bf16", note
        note = f"{setting} requested but training runs on CPU: fp32" if setting not in ("auto", "fp32") else None
        return "fp32", note
    if setting == "auto":
        import torch

        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
    return setting, None


def _compute_dtype(setting: str, device: str) -> str:
    """QLoRA compute dtype: auto -> bfloat16 on a bf16-capable GPU, float32 otherwise (CPU included)."""
    if setting != "auto":
        return setting
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _estimate(cfg: RunConfig, base: str, micro: int, device: str, num_labels: int, task: str) -> dict:
    """The memory planner's figures for this run (tasks/model/memory.py): only the base's config.json is read."""
    from tasks.model.memory import estimate_memory

    t = cfg.training
    return estimate_memory(
        base,
        cfg.method.model_dump(mode="json"),
        micro_batch_size=micro,
        max_length=cfg.data.max_length,
        num_labels=num_labels,
        device=device,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        optimizer=getattr(t, "optimizer", "auto"),
        effective_batch_size=t.effective_batch_size,
        processes=t.processes,
        strategy=t.strategy,
        task="sft" if task == "sft" else "single_label",
        gradient_checkpointing=t.gradient_checkpointing,
    )


def _method(
    cfg: RunConfig, base: str, micro: int, device: str, num_labels: int, task: str = "single_label"
) -> tuple[str, str, dict | None]:
    """(method name, why, memory estimate or None); `auto` asks the memory planner."""
    if cfg.method.kind != "auto":
        return cfg.method.kind, "method.kind in the config", None
    from tasks.config import ConfigError

    est = _estimate(cfg, base, micro, device, num_labels, task)
    if est["choice"] is None:
        raise ConfigError([("method.kind", f"auto: {est['reason']}")])
    return est["choice"], f"auto: {est['reason']}", est


def _memory_batch(cfg: RunConfig, method_name: str, estimate: dict, micro: int, accum: int) -> tuple[int, int, bool]:
    """On a GPU with training.micro_batch_size unset: the largest micro-batch the memory planner found to fit (and
    whether it needs gradient checkpointing); the OOM back-off starts from it. Elsewhere: the plan as configured."""
    row = estimate["methods"].get(method_name) or {}
    if cfg.training.micro_batch_size is not None or not row.get("fits"):
        return micro, accum, False
    m = int(row["micro_batch_size"])
    return (
        m,
        max(1, cfg.training.effective_batch_size // (m * cfg.training.processes)),
        bool(row["gradient_checkpointing"]),
    )


def _optimizer(setting: str, quantized: bool, device: str) -> str:
    """training.optimizer resolved for the method and device (tasks/optimizers.py); errors name the field."""
    from tasks.config import ConfigError

    try:
        return resolve_optimizer(setting, quantized, device)
    except ValueError as exc:
        raise ConfigError([("training.optimizer", str(exc))]) from None


def _optimizer_and_strategy(t, quantized: bool, device: str) -> dict:
    optimizer = _optimizer(t.optimizer, quantized, device)
    return {"optimizer": optimizer, "strategy": _strategy(t.strategy, t.processes, quantized, optimizer)}


def _strategy(setting: str, processes: int, quantized: bool, optimizer: str) -> str:
    """training.strategy resolved: single with one process, else ddp (auto) or fsdp where it can run."""
    from tasks.config import ConfigError

    if processes == 1:
        return "single"
    if setting != "fsdp":
        return "ddp"
    if quantized:  # bitsandbytes' packed 4-bit weights are not plain tensors FSDP can shard
        raise ConfigError([("training.strategy", "fsdp cannot shard a 4-bit (qlora) base; fix: ddp, or lora")])
    if optimizer != "adamw":
        raise ConfigError(
            [("training.strategy", f"fsdp runs with training.optimizer=adamw, not {optimizer}; fix: adamw, or ddp")]
        )
    return "fsdp"


def _head_modules(plan_fields: dict) -> list[str]:
    """Modules kept out of 4-bit: the classification head (new, trained), or a language model's output layer."""
    from tasks.model.build import head_module_names, meta_model, model_config

    config = model_config(
        plan_fields["base_model"],
        plan_fields["task"],
        plan_fields["labels"],
        trust_remote_code=plan_fields["trust_remote_code"],
        revision=plan_fields["revision"],
        target_name=plan_fields["target_name"],
        head=plan_fields["head"],
    )
    meta = meta_model(config, plan_fields["trust_remote_code"], plan_fields["task"])
    if plan_fields["task"] == "sft":
        out = meta.get_output_embeddings()
        return [n for n, m in meta.named_modules() if out is not None and m is out]
    return head_module_names(meta, plan_fields["task"])


def start_adapter(cfg: RunConfig, ws: Workspace) -> Path | None:
    """retrain.start_from=production: the production version's adapter folder (None: nothing in production yet,
    or production is a full fine-tune)."""
    if cfg.retrain.start_from != "production":
        return None
    version = ws.production_version(cfg.registry.name)
    if version is None:
        return None
    adapter = ws.version_dir(cfg.registry.name, version) / "model" / "adapter"
    return adapter if (adapter / "adapter_config.json").is_file() else None


def learning_rate_for(cfg: RunConfig, method_name: str) -> tuple[float | None, str]:
    setting = cfg.training.learning_rate
    if setting == "auto":
        return None, "search pending"
    if setting == "default":
        return get_method(method_name).default_learning_rate, f"method default for {method_name}"
    return float(setting), "config"


def _search(cfg: RunConfig, method_name: str, task: str, train_rows: int) -> dict:
    s = cfg.training.search
    metric = PRIMARY_METRIC["sft"] if task == "sft" else (cfg.evaluation.primary_metric or PRIMARY_METRIC[task])
    return {
        "candidates": [float(c) for c in (s.candidates or get_method(method_name).search_candidates)],
        "rungs": [int(r) for r in (s.rung_steps or default_rungs(train_rows, cfg.training.effective_batch_size))],
        "keep": s.keep,
        "max_parallel": s.max_parallel,
        "metric": metric,
        "higher_is_better": metric not in LOWER_IS_BETTER,
    }


def resolve_plan(
    cfg: RunConfig, dataset: DatasetFacts, tokenized: TokenizedFacts, ws: Workspace, device: str | None = None
) -> RunPlan:
    """Every setting of the run, resolved here and nowhere else."""
    t, task = cfg.training, dataset.task
    base = resolve_model(cfg.model, ws.root)
    device = device or _device()
    micro, accum = batch_plan(t.effective_batch_size, t.processes, t.micro_batch_size)
    num_labels = 1 if task == "regression" else len(dataset.labels)
    method_name, method_reason, estimate = _method(cfg, base, micro, device, num_labels, task)
    method = get_method(method_name)
    precision, precision_note = _precision(t.precision, device)
    on_gpu = device.startswith("cuda")
    needs_checkpointing = False
    from tasks.model.memory import device_memory_known

    if on_gpu and device_memory_known(device):  # the first micro-batch comes from the memory planner's figures
        estimate = estimate or _estimate(cfg, base, micro, device, num_labels, task)
        micro, accum, needs_checkpointing = _memory_batch(cfg, method_name, estimate, micro, accum)
    from tasks.model.heads import resolve_head

    if task == "sft":
        head, head_reason = "lm_head", "instruction tuning: the language model's own output layer"
    else:
        head, head_reason = resolve_head(cfg.model.head, base, cfg.model.revision)
    rate, rate_source = learning_rate_for(cfg, method_name)
    adapter = start_adapter(cfg, ws) if method.adapter else None
    fields = dict(
        task=task,
        labels=list(dataset.labels),
        target_name=dataset.target_name,
        dataset_fingerprint=dataset.fingerprint,
        prepared_path=str(Path(dataset.path).resolve()),
        tokenized_key=tokenized.key,
        tokenized_path=str(Path(tokenized.path).resolve()),
        max_length=cfg.data.max_length,
        base_model=base,
        base_model_name=cfg.model.name_or_path,
        base_model_fingerprint=model_fingerprint(cfg.model, memo_dir=ws.fingerprints, workspace=ws.root),
        tokenizer_path=tokenized.tokenizer,
        head=head,
        head_reason=head_reason,
        method=method_name,
        method_reason=method_reason,
        method_settings={k: v for k, v in cfg.method.model_dump(mode="json").items() if k in method.settings},
        quantization=None,
        learning_rate=rate,
        learning_rate_source=rate_source,
        epochs=t.epochs,
        effective_batch_size=t.effective_batch_size,
        micro_batch_size=micro,
        gradient_accumulation_steps=accum,
        processes=t.processes,
        warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_every_epochs=t.eval_every_epochs,
        group_by_length=t.group_by_length,
        seed=t.seed,
        loss=resolve_loss(task, t.loss),
        early_stopping_metric=check_early_stopping_metric(task, early_stopping_metric(cfg, task)),
        patience=t.early_stopping.patience,
        min_delta=t.early_stopping.min_delta,
        device=device,
        precision=precision,
        base_dtype=method.base_dtype(on_gpu, precision),
        gradient_checkpointing=bool(t.gradient_checkpointing)
        if t.gradient_checkpointing is not None
        else (method.checkpointing_default(on_gpu) or needs_checkpointing),
        timeout_s=t.timeout_s,
        save_every_steps=t.save_every_steps,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        start_adapter=str(adapter) if adapter else None,
        start_adapter_fingerprint=sha256_tree(adapter)[:20] if adapter else None,
        search=_search(cfg, method_name, task, dataset.rows.get("train", 0)),
        precision_note=precision_note,
        memory_estimate=estimate,
        packing=bool(cfg.data.packing) if task == "sft" else False,
        **_optimizer_and_strategy(t, method.quantized, device),
    )
    if method.quantized:
        compute = _compute_dtype(str(cfg.method.compute_dtype), device)
        fields["quantization"] = method.quantization(fields["method_settings"], compute, _head_modules(fields))
    return RunPlan(**fields)


def plan_key(cfg: RunConfig, dataset_fingerprint: str, tokenized_key: str, ws: Workspace) -> str:
    """Everything a plan depends on, cheap to compute: no rows read, no weights hashed twice, no torch."""
    adapter = start_adapter(cfg, ws) if cfg.retrain.start_from == "production" else None
    return sha256_json(
        {
            "data": {"max_length": cfg.data.max_length},
            "model": cfg.model.model_dump(mode="json"),
            "method": cfg.method.model_dump(mode="json"),
            "training": cfg.training.model_dump(mode="json"),
            "primary_metric": cfg.evaluation.primary_metric,
            "start_from": cfg.retrain.start_from,
            "start_adapter": str(adapter) if adapter else None,
            "start_adapter_version": str(adapter.parents[1].name) if adapter else None,
            "dataset": dataset_fingerprint,
            "tokenized": tokenized_key,
            "base_model": model_fingerprint(cfg.model, memo_dir=ws.fingerprints, workspace=ws.root),
            "hardware": hardware_signature(),
            "plan_version": PLAN_VERSION,
        }
    )[:20]


def plan_run(
    cfg: RunConfig, prepared_path: str | Path, tokenized_path: str | Path, ws: Workspace | None = None
) -> RunPlan:
    """The run's plan: read from `<workspace>/plans/<key>.json` when resolved before, resolved and written otherwise."""
    ws = ws or Workspace.at(cfg.workspace)
    dataset, tokenized = Workspace.read_dataset(prepared_path), Workspace.read_tokenized(tokenized_path)
    path = ws.plan_file(plan_key(cfg, dataset.fingerprint, tokenized.key, ws))
    if path.is_file():
        try:
            return RunPlan.from_json(read_facts(path, "run plan"), path)
        except ValueError:
            path.unlink(missing_ok=True)  # damaged or outdated: resolve it again
    plan = resolve_plan(cfg, dataset, tokenized, ws)
    from tasks.files import write_json

    write_json(path, plan.to_json())
    return plan
