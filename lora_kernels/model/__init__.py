"""Model surgery (inject, find, count, merge, unload) and PEFT-format adapter files."""

from lora_kernels.model.adapter import load_adapter, save_adapter
from lora_kernels.model.inject import (TrainableSummary, inject_lora, lora_layers, merge_lora, named_lora_layers,
                                       trainable_parameters, unload_lora, unmerge_lora)

__all__ = ["TrainableSummary", "inject_lora", "load_adapter", "lora_layers", "merge_lora", "named_lora_layers",
           "save_adapter", "trainable_parameters", "unload_lora", "unmerge_lora"]
