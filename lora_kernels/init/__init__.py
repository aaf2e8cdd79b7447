"""Adapter initialisations from gradients or weights (LoRA-One, LoRA-GA, PiSSA) and the gradient collection."""

from lora_kernels.init.collect import collect_gradients
from lora_kernels.init.spectral import InitReport, LayerReport, lora_ga_init, lora_one_init, pissa_init

__all__ = ["InitReport", "LayerReport", "collect_gradients", "lora_ga_init", "lora_one_init", "pissa_init"]
