"""One object per training method, asked and never compared by name (DESIGN.md rule 5).

Each method answers how its model is loaded (4-bit or not), prepared, given an adapter, reloaded for inference,
which learning rates suit it, and how much memory its weights, gradients and optimizer state take. The training
loop, the planner, the export and the memory planner ask these objects; a new method (or a new model kind)
is one more class here, not a branch in every module.

Heavy imports (torch, transformers, peft, bitsandbytes) stay inside the methods that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

GB = 1024**3


@dataclass(frozen=True)
class ParameterCounts:
    """What the memory formulas need, counted on the meta device (nothing loaded)."""

    total: int  # every parameter
    head: int  # the classification head (trained and saved by every method)
    linear: int  # weights of the backbone's linear layers (what 4-bit quantizes)
    lora: int  # LoRA A+B parameters over the target modules at the configured rank
    dora_extra: int  # DoRA magnitude vectors
    biggest_target: int  # the largest targeted weight (DoRA materialises one at a time)


def dtype_of(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Method:
    """Full fine-tuning: every weight trains, in float32 (mixed precision on a GPU through autocast)."""

    name: ClassVar[str] = "full"
    adapter: ClassVar[bool] = False  # an adapter to merge at export
    quantized: ClassVar[bool] = False  # trained against a 4-bit base
    default_learning_rate: ClassVar[float] = 2e-5  # the seed article: full fine-tuning 1e-5..5e-5
    search_candidates: ClassVar[tuple[float, ...]] = (1e-5, 3e-5, 1e-4, 3e-4)
    settings: ClassVar[tuple[str, ...]] = ()  # method.* keys that apply to this method

    # ---- planning ----------------------------------------------------------------------------------
    def quantization(self, settings: dict, compute_dtype: str, skip_modules: list[str]) -> dict | None:
        return None

    def base_dtype(self, on_gpu: bool, precision: str) -> str:
        return "float32"

    def checkpointing_default(self, on_gpu: bool) -> bool:
        return False

    def memory(
        self, counts: ParameterCounts, on_gpu: bool, weight_bytes: float | None = None, trainable_bytes: float = 4.0
    ) -> dict[str, float]:
        """Bytes of weights, gradients and optimizer state in AdamW units (two fp32 moments, 8 bytes per trainable
        parameter; the memory planner rescales it per optimizer). `weight_bytes`: 4 (fp32, this project's full
        fine-tuning) unless told (2: pure bf16 training); on a GPU autocast also caches a 16-bit copy of every
        fp32 linear weight during the step. `trainable_bytes` does not apply: here the weights are what trains."""
        n, wb = counts.total, weight_bytes or 4.0
        cache = 2.0 * counts.linear if (on_gpu and wb == 4.0) else 0.0
        return {"weights": wb * n + cache, "gradients": wb * n, "optimizer": 8.0 * n}

    # ---- building ----------------------------------------------------------------------------------
    def load_base(
        self,
        base: str,
        config,
        *,
        auto_class,
        device: str,
        quantization: dict | None,
        trust_remote_code: bool,
        revision: str | None,
        base_dtype: str,
    ):
        """The pretrained backbone with its head, on `device`."""
        model = auto_class.from_pretrained(
            base, config=config, trust_remote_code=trust_remote_code, revision=revision, dtype=dtype_of(base_dtype)
        )
        return model.to(device)

    def prepare(self, model, *, gradient_checkpointing: bool, device: str) -> tuple[Any, list[str]]:
        """Make the loaded model trainable; returns (model, notes for the run record)."""
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, []

    def attach(
        self,
        model,
        *,
        settings: dict,
        targets: list[str],
        heads: list[str],
        task_type: str,
        gradient_checkpointing: bool,
    ):
        """Add the method's trainable parts (nothing for full fine-tuning)."""
        return model

    def load_trained(self, model_dir: str, *, load_base, auto_class, trust_remote_code: bool, device: str):
        """The trained model for inference from a run's model/ folder; `load_base(quantized)` gives the base."""
        model = auto_class.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        return model.to(device)


class LoRA(Method):
    """LoRA (Hu et al. 2021): a frozen base (16-bit on a GPU) and trained low-rank adapters + the head."""

    name = "lora"
    adapter = True
    default_learning_rate = 2e-4  # the seed article: LoRA 1e-4..3e-4
    search_candidates = (1e-4, 5e-4, 2e-3, 5e-3)
    settings = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
    use_dora: ClassVar[bool] = False

    def base_dtype(self, on_gpu: bool, precision: str) -> str:
        return "bfloat16" if (on_gpu and precision == "bf16") else "float32"

    def memory(
        self, counts: ParameterCounts, on_gpu: bool, weight_bytes: float | None = None, trainable_bytes: float = 4.0
    ) -> dict[str, float]:
        """A frozen base (16-bit on a GPU, fp32 on CPU, unless `weight_bytes`) and trained adapters + head in
        `trainable_bytes` (peft keeps adapters in fp32); the head is counted twice (modules_to_save copies it)."""
        trainable = counts.lora + counts.head
        base_bytes = weight_bytes or (2 if on_gpu else 4)
        return {
            "weights": base_bytes * counts.total + trainable_bytes * trainable,
            "gradients": trainable_bytes * trainable,
            "optimizer": 8.0 * trainable,
        }

    def prepare(self, model, *, gradient_checkpointing: bool, device: str):
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model, []

    def attach(
        self,
        model,
        *,
        settings: dict,
        targets: list[str],
        heads: list[str],
        task_type: str,
        gradient_checkpointing: bool,
    ):
        import torch
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type=task_type,
            r=int(settings.get("lora_r", 8)),
            lora_alpha=int(settings.get("lora_alpha", 16)),
            lora_dropout=float(settings.get("lora_dropout", 0.1)),
            target_modules=list(targets),
            modules_to_save=list(heads),
            use_dora=self.use_dora,  # peft extends the list in place
        )
        model = get_peft_model(model, lora)
        for p in model.parameters():  # the head and adapters train in fp32 even when the frozen base is 16-bit
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        return model

    def load_trained(self, model_dir: str, *, load_base, auto_class, trust_remote_code: bool, device: str):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(self.quantized), model_dir, is_trainable=False)


class DoRA(LoRA):
    """DoRA (Liu et al. 2024): LoRA with a learned magnitude per output feature."""

    name = "dora"
    use_dora = True

    def memory(
        self, counts: ParameterCounts, on_gpu: bool, weight_bytes: float | None = None, trainable_bytes: float = 4.0
    ) -> dict[str, float]:
        trainable = counts.lora + counts.head + counts.dora_extra
        base_bytes = weight_bytes or (2 if on_gpu else 4)
        return {
            "weights": base_bytes * counts.total + trainable_bytes * trainable,
            "gradients": trainable_bytes * trainable,
            "optimizer": 8.0 * trainable,
            "dora_weight_norm": 8.0 * counts.biggest_target,
        }


class QLoRA(LoRA):
    """QLoRA (Dettmers et al. 2023): LoRA on a 4-bit (NF4, double-quantized) base via bitsandbytes."""

    name = "qlora"
    quantized = True
    settings = LoRA.settings + ("quant_type", "double_quant", "compute_dtype")

    def quantization(self, settings: dict, compute_dtype: str, skip_modules: list[str]) -> dict | None:
        return {
            "load_in_4bit": True,
            "quant_type": settings.get("quant_type", "nf4"),
            "double_quant": bool(settings.get("double_quant", True)),
            "compute_dtype": compute_dtype,
            "skip_modules": list(skip_modules),
        }  # new heads stay out of quantization (DESIGN.md)

    def base_dtype(self, on_gpu: bool, precision: str) -> str:
        return "float32"  # non-quantized parts (embeddings, norms, head) in fp32 after k-bit preparation

    def checkpointing_default(self, on_gpu: bool) -> bool:
        return on_gpu

    # NF4 stores two 4-bit values per byte plus one absmax per block of 64 weights: fp32 (4/64 byte per weight),
    # or with double quantization an 8-bit absmax (1/64) and one fp32 constant per 256 blocks (4/16384).
    NF4_BYTES: ClassVar[dict[bool, float]] = {True: 0.5 + 1 / 64 + 4 / 16384, False: 0.5 + 4 / 64}

    def memory(
        self,
        counts: ParameterCounts,
        on_gpu: bool,
        weight_bytes: float | None = None,
        trainable_bytes: float = 4.0,
        double_quant: bool = True,
    ) -> dict[str, float]:
        """The backbone's linear layers in NF4; what bitsandbytes keeps out of 4-bit (embeddings, norms, the
        head, a language model's lm_head) in fp32 (prepare_model_for_kbit_training upcasts it) unless
        `weight_bytes`; adapters and head trained in `trainable_bytes`."""
        trainable = counts.lora + counts.head
        other = counts.total - counts.linear
        return {
            "weights": counts.linear * self.NF4_BYTES[bool(double_quant)]
            + (weight_bytes or 4.0) * other
            + trainable_bytes * counts.lora,
            "gradients": trainable_bytes * trainable,
            "optimizer": 8.0 * trainable,
        }

    def load_base(
        self,
        base: str,
        config,
        *,
        auto_class,
        device: str,
        quantization: dict | None,
        trust_remote_code: bool,
        revision: str | None,
        base_dtype: str,
    ):
        from transformers import BitsAndBytesConfig

        q = quantization or {}
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=q.get("double_quant", True),
            bnb_4bit_compute_dtype=dtype_of(q.get("compute_dtype", "float32")),
            llm_int8_skip_modules=list(q.get("skip_modules", [])),
        )
        model = auto_class.from_pretrained(
            base,
            config=config,
            trust_remote_code=trust_remote_code,
            revision=revision,
            dtype=dtype_of(base_dtype),
            quantization_config=bnb,
            device_map={"": device},
        )
        if device == "cpu":
            disable_cpu_bf16_packing(model)
        return model

    def prepare(self, model, *, gradient_checkpointing: bool, device: str):
        from peft import prepare_model_for_kbit_training

        # prepare_model_for_kbit_training turns checkpointing on unless told (2x step time on CPU): decided here
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        notes = []
        if device == "cpu":
            notes.append(f"avx512_bf16 weight packing disabled on {disable_cpu_bf16_packing(model)} Linear4bit layers")
        return model, notes


def disable_cpu_bf16_packing(model) -> int:
    """bitsandbytes repacks 4-bit weights for avx512_bf16 CPUs on the first eval forward, after which training
    fails; switch that path off on every Linear4bit (DESIGN.md environment facts)."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


METHODS: dict[str, Method] = {m.name: m for m in (Method(), LoRA(), QLoRA(), DoRA())}
# `method.kind: auto` prefers full fine-tuning for small models, then the cheapest adapter method that fits.
AUTO_PREFERENCE = ("full", "lora", "qlora")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown training method {name!r}; known: {', '.join(METHODS)} "
            "(resolve 'auto' in the plan before asking for a method)"
        ) from None
