"""Kernels and their launchers, one op per file: ``lora_linear`` (fused LoRA linear layer)."""

from lora_kernels.ops.fused_lora_linear import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_ref

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear", "lora_linear_ref"]
