"""Optimizers for LoRA factors: r×r-preconditioned AdamW and SGD."""

from lora_kernels.optim.preconditioned import PreconditionedAdamW, PreconditionedSGD, lora_pairs

__all__ = ["PreconditionedAdamW", "PreconditionedSGD", "lora_pairs"]
