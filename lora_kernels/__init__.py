"""lora_kernels: fused GPU kernels for LoRA fine-tuning.

Public API: ``lora_linear`` / ``lora_linear_ref`` (functional), ``FusedLoRALinear`` (nn.Linear replacement),
``rsvd`` / ``rsvd_ref`` (batched randomized SVD), ``has_extension`` (whether the optional compiled extension
``lora_kernels._C`` is present).
"""

from lora_kernels import _extension
from lora_kernels._backend import logger
from lora_kernels.modules import FusedLoRALinear
from lora_kernels.ops import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_ref
from lora_kernels.ops.rsvd import rsvd, rsvd_ref
from lora_kernels.init import InitReport, lora_ga_init, lora_one_init, pissa_init
from lora_kernels.model import (inject_lora, load_adapter, merge_lora, save_adapter, trainable_parameters, unload_lora,
                                unmerge_lora)


def has_extension(device: str = "cpu") -> bool:
    """Whether the optional compiled extension ``lora_kernels._C`` serves ``device`` ("cpu" or "cuda").

    Without it everything still works: rsvd's batched k×k SVD falls back to torch.linalg (said once in the log).
    """
    return _extension.has_cuda() if str(device).startswith("cuda") else _extension.available()


__version__ = "0.1.0"
__all__ = ["FusedLoRALinear", "InitReport", "LoRALinearFunction", "dropout_mask", "has_extension", "inject_lora",
           "load_adapter", "lora_ga_init", "lora_linear", "lora_linear_ref", "lora_one_init", "logger", "merge_lora",
           "pissa_init", "rsvd", "rsvd_ref", "save_adapter", "trainable_parameters", "unload_lora", "unmerge_lora",
           "__version__"]
