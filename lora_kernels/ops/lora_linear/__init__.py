"""The fused LoRA linear op ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``, one module per responsibility:

| file             | owns                                                                                  |
|------------------|---------------------------------------------------------------------------------------|
| ``kernels.py``   | the Triton kernels (shrink, fused GEMM, token reduction, the dropout mask ``_dropout_keep``) |
| ``tuning.py``    | autotune candidates and pruning, pinned tiles, launch shapes, SM count                 |
| ``tuning_cache.py`` | autotune / arrangement choices on disk and across ranks; no tuning inside a capture  |
| ``launch.py``    | the kernel backend: launchers, TMA allocator, fused/split GEMM                          |
| ``arrangement.py`` | fused-vs-split measurement, its cache and report, the ``gemm_arrangement`` override  |
| ``torch_path.py``| the pure-PyTorch backend, same entry points as ``launch``                               |
| ``dispatch.py``  | which backend serves a call                                                            |
| ``base_weight.py`` | the frozen-W seam (``BaseWeight``, ``DenseWeight``)                                  |
| ``nf4_weight.py``  | ``NF4Weight``: a 4-bit NF4 W (QLoRA) through the same seam                           |
| ``nf4_kernels.py`` | Triton: NF4 dequantization, and the fused GEMM decoding W in its main loop            |
| ``nf4_launch.py``  | their launchers (the kernel backend's fused arrangement calls ``nf4_launch.gemm``)    |
| ``function.py``  | argument checks, ``torch.library`` custom ops, ``LoRALinearFunction``, ``lora_linear``  |
| ``reference.py`` | ``lora_linear_ref`` and ``dropout_mask``                                               |
"""

from lora_kernels.ops.lora_linear.arrangement import gemm_arrangement, gemm_arrangement_report
from lora_kernels.ops.lora_linear.base_weight import BaseWeight, DenseWeight
from lora_kernels.ops.lora_linear.dispatch import MAX_KERNEL_RANK
from lora_kernels.ops.lora_linear.function import LoRALinearFunction, lora_linear
from lora_kernels.ops.lora_linear.reference import dropout_mask, lora_linear_ref
from lora_kernels.settings import ARRANGEMENTS

__all__ = ["ARRANGEMENTS", "BaseWeight", "DenseWeight", "LoRALinearFunction", "MAX_KERNEL_RANK", "dropout_mask",
           "gemm_arrangement", "gemm_arrangement_report", "lora_linear", "lora_linear_ref"]
