"""lora_kernels: fused GPU kernels for LoRA fine-tuning.

Public API: ``lora_linear`` / ``lora_linear_ref`` (functional), ``FusedLoRALinear`` (nn.Linear replacement),
``has_extension`` (whether the optional compiled extension ``lora_kernels._C`` is present).
"""

from lora_kernels._backend import logger
from lora_kernels.modules import FusedLoRALinear
from lora_kernels.ops import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_ref

try:  # the compiled extension is optional: everything works without it, more slowly.
    from lora_kernels import _C  # noqa: F401

    _HAS_EXTENSION = True
except ImportError:
    _HAS_EXTENSION = False


def has_extension() -> bool:
    """True when the compiled C++/CUDA extension ``lora_kernels._C`` was built and imports."""
    return _HAS_EXTENSION


__version__ = "0.1.0"
__all__ = ["FusedLoRALinear", "LoRALinearFunction", "dropout_mask", "has_extension", "lora_linear",
           "lora_linear_ref", "logger", "__version__"]
