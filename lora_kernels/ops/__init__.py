"""Kernels and their launchers, one op per package or file: ``lora_linear`` (the fused LoRA linear layer, a
package by responsibility) and ``rsvd`` (batched randomized SVD)."""

from lora_kernels.ops.lora_linear import (ARRANGEMENTS, BaseWeight, DenseWeight, LoRALinearFunction, dropout_mask,
                                          gemm_arrangement, gemm_arrangement_report, lora_linear, lora_linear_ref)

__all__ = ["ARRANGEMENTS", "BaseWeight", "DenseWeight", "LoRALinearFunction", "dropout_mask", "gemm_arrangement",
           "gemm_arrangement_report", "lora_linear", "lora_linear_ref"]
