"""training.optimizer: the catalogue (torch's AdamW, bitsandbytes' 8-bit and paged AdamW), what `auto` means per
method and device, and the state each keeps per trainable parameter. No heavy imports: the planner, the memory
estimate and the training loop (tasks/training/optimization.py builds the optimizer) all read it."""

from __future__ import annotations

# training.optimizer -> the bitsandbytes class; `adamw` is torch's own (fused) AdamW. Paged optimizers keep their state
# in CUDA unified memory, which the driver pages to CPU memory under pressure: they need a CUDA device.
BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}
PAGED = frozenset({"paged_adamw_8bit", "paged_adamw_32bit"})
# Optimizer state per trainable parameter, bytes (8-bit: two uint8 moments; bitsandbytes keeps tensors under 4096
# elements, and a block-wise absmax per 256 values, in 32-bit, which this leaves out). Paged state is the same size,
# but may spill to CPU memory.
STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "paged_adamw_32bit": 8.0}
# `auto` for a method trained against a quantized base on CUDA: paged AdamW with 32-bit state, the default of the
# QLoRA reference code (artidoro/qlora `--optim paged_adamw_32bit`). Only the adapters train, so 8-bit state would
# save little (2x4 bytes per adapter parameter), while paging absorbs the memory spikes of long sequences.
AUTO_QUANTIZED_CUDA = "paged_adamw_32bit"


def resolve_optimizer(setting: str, quantized: bool, device: str) -> str:
    """training.optimizer for this method and device: `auto` resolved; a paged optimizer off CUDA is an error."""
    on_cuda = str(device).startswith("cuda")
    if setting == "auto":
        return AUTO_QUANTIZED_CUDA if (quantized and on_cuda) else "adamw"
    if setting in PAGED and not on_cuda:
        raise ValueError(
            f"{setting} pages its state between GPU and CPU memory (CUDA unified memory), but this run trains on "
            f"{device}; fix: training.optimizer=adamw_8bit (8-bit state, works on CPU), adamw or auto"
        )
    if setting != "adamw" and setting not in BNB_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {setting!r}; known: auto, adamw, {', '.join(BNB_OPTIMIZERS)}")
    return setting
