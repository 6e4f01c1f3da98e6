"""fastlora: fused Triton kernels for LoRA layers, single-adapter and grouped multi-adapter."""

from fastlora import reference
from fastlora.functional import dropout_mask, grouped_lora_linear, lora_linear
from fastlora.grouping import AdapterBatch
from fastlora.modules import GroupedLinear, Linear, use_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterBatch",
    "GroupedLinear",
    "Linear",
    "dropout_mask",
    "grouped_lora_linear",
    "lora_linear",
    "reference",
    "use_adapters",
]
