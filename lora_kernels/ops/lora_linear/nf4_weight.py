"""``NF4Weight``: the base-weight type (``base_weight.py``'s contract) of a 4-bit NF4 W in bitsandbytes' layout.

* ``fused_operand()`` is the ``NF4Tensor`` itself: the kernel backend's fused arrangement runs
  ``_lora_nf4_gemm_kernel`` (W decoded in the GEMM's main loop, no dequantized copy of W anywhere).
* ``linear`` / ``grad_input`` (the split arrangement, and the PyTorch path) dequantize W into a scratch buffer of
  the compute dtype (the Triton kernel, or ``dequantize_nf4_ref``), run the dense product and drop the buffer
  before returning: peak extra memory out·in·(2 or 4) bytes during the call, none after.
* ``dense()``: the same dequantization (for merges, references, ∂L/∂W).
Compute dtype: the ``NF4Tensor``'s (bitsandbytes' ``compute_dtype``); ``with_dtype`` gives the same codes under
another one (autocast).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lora_kernels._backend import use_triton
from lora_kernels.ops.lora_linear.base_weight import BaseWeight
from lora_kernels.quant.nf4 import NF4Tensor, dequantize_nf4_ref


def dequantize(q: NF4Tensor, like: torch.Tensor = None, dtype: torch.dtype = None) -> torch.Tensor:
    """Dense W in ``dtype`` (default the compute dtype), with the Triton kernel where the kernels serve ``like``
    (default: the codes' device), else the PyTorch reference: the same values either way."""
    dtype = dtype or q.dtype
    like = like if like is not None else q.packed
    if dtype != torch.float64 and use_triton(like):
        from lora_kernels.ops.lora_linear import nf4_launch

        return nf4_launch.dequantize(q, dtype)
    return dequantize_nf4_ref(q, dtype)


class NF4Weight(BaseWeight):
    __slots__ = ("q",)

    def __init__(self, q: NF4Tensor):
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"NF4Weight needs an NF4Tensor, got {type(q).__name__}")
        self.q = q

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def with_dtype(self, dtype: torch.dtype) -> "NF4Weight":
        return self if dtype == self.q.dtype else NF4Weight(dataclasses.replace(self.q, dtype=dtype))

    def linear(self, x2d, bias):
        return F.linear(x2d, dequantize(self.q, x2d), bias)

    def grad_input(self, g2d):
        return g2d @ dequantize(self.q, g2d)

    def add_grad_input_(self, out, g2d):
        return out.addmm_(g2d, dequantize(self.q, g2d))

    def fused_operand(self):
        return self.q

    def dense(self):
        return dequantize(self.q)
