"""nn.Module adapters: they own parameters and call the functional ops."""

from lora_kernels.modules.lora_linear import FusedLoRALinear

__all__ = ["FusedLoRALinear"]
