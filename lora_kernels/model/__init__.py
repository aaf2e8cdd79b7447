"""Model surgery (inject, count, merge, unload) and PEFT-format adapter files."""

from lora_kernels.model.adapter import load_adapter, save_adapter
from lora_kernels.model.inject import (TrainableSummary, inject_lora, merge_lora, trainable_parameters, unload_lora,
                                       unmerge_lora)

__all__ = ["TrainableSummary", "inject_lora", "load_adapter", "merge_lora", "save_adapter", "trainable_parameters",
           "unload_lora", "unmerge_lora"]
