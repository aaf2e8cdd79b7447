"""Pure-PyTorch reference of the fused LoRA linear op, built from plain differentiable ops (what the tests compare
against in float64), and the dropout mask the op draws for a given seed."""

from __future__ import annotations

from typing import Tuple

import torch

from lora_kernels.ops.lora_linear import dispatch


def dropout_mask(seed: int, shape: Tuple[int, int], p: float, device, *, dtype: torch.dtype = torch.float32,
                 r: int = 1) -> torch.Tensor:
    """The boolean keep mask (True = kept) that ``lora_linear`` uses for an N×in input of ``dtype`` at rank ``r``
    with this seed: the kernels' Philox mask where they serve the call, torch's generator on the PyTorch path
    (float64, ranks above the kernels', CPU without the interpreter)."""
    return _op_mask(seed, shape, p, device, dtype, r)


def _op_mask(seed, shape, p, device, dtype, r) -> torch.Tensor:
    n, k = shape
    probe = torch.empty(0, device=device, dtype=dtype)
    return dispatch.backend(probe, r).keep_mask(int(seed), n, k, float(p), probe.device)


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, *, seed=None, dropout_mask=None,
                    upcast=False):
    """Reference of ``lora_linear`` with the same positional arguments.

    Dropout: ``dropout_mask`` (bool, broadcastable to x; True = kept) if given; else, with ``seed``, the very mask
    ``lora_linear(..., seed=seed)`` draws (so the two agree call for call); else ``torch.nn.functional.dropout``.
    ``upcast=True`` computes in float64 and returns float64.

    Adapters in another dtype than x (fp32 lora_A / lora_B on a 16-bit base) are composed as PEFT's
    ``lora.Linear.forward``: the base product in x's dtype, x cast to the adapters' dtype for the LoRA branch, the
    sum in the wider dtype, cast back to x's dtype.
    """
    if dropout_mask is None and seed is not None and dropout_p > 0.0:
        n_in = x.shape[-1]
        dropout_mask = _op_mask(seed, (x.numel() // max(n_in, 1), n_in), dropout_p, x.device, x.dtype,
                                lora_A.shape[0]).reshape(x.shape)
    if upcast:
        x, weight, lora_A, lora_B = (v.double() for v in (x, weight, lora_A, lora_B))
        bias = bias.double() if bias is not None else None
    xl = x if lora_A.dtype == x.dtype else x.to(lora_A.dtype)  # PEFT's _cast_input_dtype
    if dropout_mask is not None:
        xd = xl * dropout_mask.to(xl.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        xd = torch.nn.functional.dropout(xl, dropout_p, training=True)
    else:
        xd = xl
    y = torch.nn.functional.linear(x, weight, bias) + scale * ((xd @ lora_A.t()) @ lora_B.t())
    return y.to(x.dtype)
