"""Former home of the fused LoRA linear op, kept so existing imports work: the op now lives in the package
``lora_kernels.ops.lora_linear`` (one module per responsibility)."""

from lora_kernels.ops.lora_linear import (ARRANGEMENTS, MAX_KERNEL_RANK, LoRALinearFunction, dropout_mask,  # noqa: F401
                                          gemm_arrangement, gemm_arrangement_report, lora_linear, lora_linear_ref)
