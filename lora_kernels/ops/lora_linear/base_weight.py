"""The seam for the frozen base weight W of ``y = x Wᵀ + b + LoRA``.

Everything the LoRA layer needs from W goes through a ``BaseWeight``; a dense tensor is ``DenseWeight``.  A new
weight type (e.g. 4-bit NF4 codes with per-block scales) implements the same contract and every arrangement,
mode and dropout setting works with it unchanged.

Contract
--------
* ``out_features``, ``in_features``: W's logical shape (out × in); ``dtype``: the compute dtype of x, y and the
  products (for a quantized W, its compute dtype, not its storage dtype); ``device``.
* ``linear(x2d, bias)`` → x Wᵀ + b, [N, out] in ``dtype`` (bias may be None).  A fresh tensor the caller may
  modify in place: the split arrangement adds the LoRA term into it.
* ``grad_input(g2d)`` → g W, [N, in] in ``dtype``, fresh as above; ``add_grad_input_(out, g2d)`` → out += g W in
  place (default: adds ``grad_input``; a dense W accumulates with ``addmm_``).
* ``fused_operand()`` → the [out, in] strided tensor that the fused Triton GEMM's main loop reads (a dense W), or
  None when the type has no fused main loop yet: then the split arrangement is used (the base product from
  ``linear`` / ``grad_input``, the LoRA term added in place by our kernel).  A quantized type with its own fused
  main loop returns its operands here (NF4: the ``NF4Tensor``, served by ``nf4_launch.gemm``).
* ``with_dtype(dtype)`` → the same W computing in ``dtype`` (autocast).
* ``dense()`` → W as a dense [out, in] tensor (dequantized if need be), for merges, references and ∂L/∂W.  It may
  allocate: never called on the training hot path.
Nothing else is assumed: no ``requires_grad`` on W (a 4-bit W cannot have one), no particular storage dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class BaseWeight:
    """The frozen W, as the LoRA layer uses it (see the module docstring for the contract)."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    device: torch.device

    def linear(self, x2d: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def grad_input(self, g2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_grad_input_(self, out: torch.Tensor, g2d: torch.Tensor) -> torch.Tensor:
        """out += g W in place, returning out (g's dtype).  A type with an accumulating product overrides this."""
        return out.add_(self.grad_input(g2d))

    def fused_operand(self) -> Optional[torch.Tensor]:
        return None

    def with_dtype(self, dtype: torch.dtype) -> "BaseWeight":
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        raise NotImplementedError


class DenseWeight(BaseWeight):
    """A plain [out, in] tensor: cuBLAS for the split products, the tensor itself for the fused main loop."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def linear(self, x2d, bias):
        return F.linear(x2d, self.weight, bias)

    def grad_input(self, g2d):
        return g2d @ self.weight

    def add_grad_input_(self, out, g2d):
        return out.addmm_(g2d, self.weight)  # the GEMM accumulates into out: no second N×in buffer

    def fused_operand(self):
        return self.weight

    def with_dtype(self, dtype):
        return self if dtype == self.weight.dtype else DenseWeight(self.weight.to(dtype))

    def dense(self):
        return self.weight


def as_base_weight(weight) -> BaseWeight:
    """A ``BaseWeight`` for ``weight``: itself if it already is one, ``DenseWeight`` for a tensor, ``NF4Weight`` for
    an ``NF4Tensor`` (4-bit codes, ``lora_kernels.quant``)."""
    if isinstance(weight, BaseWeight):
        return weight
    if isinstance(weight, torch.Tensor):
        return DenseWeight(weight)
    from lora_kernels.quant.nf4 import NF4Tensor

    if isinstance(weight, NF4Tensor):
        from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight

        return NF4Weight(weight)
    raise TypeError(f"weight must be a torch.Tensor, an NF4Tensor or a BaseWeight, got {type(weight).__name__}")
