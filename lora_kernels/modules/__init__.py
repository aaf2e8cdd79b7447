"""nn.Module adapters: they own parameters and call the functional ops."""

from lora_kernels.modules.lora_linear import FusedLoRALinear
from lora_kernels.modules.lora_linear_4bit import FusedLoRALinear4bit

__all__ = ["FusedLoRALinear", "FusedLoRALinear4bit"]
