"""fastlora: fused Triton kernels for LoRA layers, single-adapter and grouped multi-adapter."""

from fastlora import reference
from fastlora.adapters import add_adapters, load_adapter, load_adapters_grouped, remove_adapters, save_adapter
from fastlora.convert import from_peft
from fastlora.dora import DoraCaching
from fastlora.functional import dropout_mask, grouped_lora_linear, lora_linear, lora_linear_4bit, lora_linear_fp8
from fastlora.grouping import AdapterBatch
from fastlora.linear4bit import Linear4bit
from fastlora.linear_fp8 import LinearFP8
from fastlora.model import inject, merge, unmerge
from fastlora.modules import GroupedLinear, Linear, use_adapters
from fastlora.moe import Experts

__version__ = "0.1.0"

__all__ = [
    "AdapterBatch",
    "DoraCaching",
    "Experts",
    "GroupedLinear",
    "Linear",
    "Linear4bit",
    "LinearFP8",
    "add_adapters",
    "dropout_mask",
    "from_peft",
    "grouped_lora_linear",
    "inject",
    "load_adapter",
    "load_adapters_grouped",
    "lora_linear",
    "lora_linear_4bit",
    "lora_linear_fp8",
    "merge",
    "reference",
    "remove_adapters",
    "save_adapter",
    "unmerge",
    "use_adapters",
]
