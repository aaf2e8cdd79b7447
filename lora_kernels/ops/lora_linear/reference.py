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
    """
    if dropout_mask is None and seed is not None and dropout_p > 0.0:
        n_in = x.shape[-1]
        dropout_mask = _op_mask(seed, (x.numel() // max(n_in, 1), n_in), dropout_p, x.device, x.dtype,
                                lora_A.shape[0]).reshape(x.shape)
    if upcast:
        x, weight, lora_A, lora_B = (v.double() for v in (x, weight, lora_A, lora_B))
        bias = bias.double() if bias is not None else None
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        xd = torch.nn.functional.dropout(x, dropout_p, training=True)
    else:
        xd = x
    return torch.nn.functional.linear(x, weight, bias) + scale * ((xd @ lora_A.t()) @ lora_B.t())
