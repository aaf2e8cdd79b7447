"""The pure-PyTorch backend: CPU without the interpreter, float64, machines without Triton, ranks above the kernels'.

Same entry points and signatures as ``launch`` (``keep_mask``, ``shrink``, ``gemm``, ``grad_A``, ``grad_B``), so the
autograd Function picks a backend in one place.  Same semantics; the dropout mask comes from torch's own generator
seeded with the call's seed, so its masks differ from the kernels' Philox masks (same distribution, and the same
seed gives the same mask within a backend).
"""

from __future__ import annotations

from typing import Optional

import torch

from lora_kernels.ops.lora_linear.base_weight import BaseWeight


def keep_mask(seed: int, n: int, k: int, p: float, device) -> torch.Tensor:
    """Boolean keep mask (True = kept) of an n×k input, from a generator on ``device`` seeded with ``seed``."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand((n, k), generator=gen, device=device) >= p


def _masked(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """m ⊙ x (no 1/(1-p): callers fold it into their scale, as the kernels do)."""
    if p == 0.0:
        return x2d
    return x2d * keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device).to(x2d.dtype)


def shrink(x2d: torch.Tensor, a: torch.Tensor, seed: int, p: float, out_scale: float) -> torch.Tensor:
    return (_masked(x2d, seed, p) @ a.t()).mul_(out_scale)


def gemm(a2d: torch.Tensor, base: BaseWeight, w_nk: bool, bias: Optional[torch.Tensor], t: torch.Tensor,
         l: torch.Tensor, seed: int, p: float, epi_dropout: bool) -> torch.Tensor:
    if w_nk:
        return base.linear(a2d, bias).addmm_(t, l)
    lora = t @ l
    if epi_dropout and p > 0.0:
        lora = lora * keep_mask(seed, a2d.shape[0], l.shape[1], p, a2d.device).to(lora.dtype)
    return base.grad_input(a2d).add_(lora)


def grad_A(x2d: torch.Tensor, gb: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    return (gb.t() @ _masked(x2d, seed, p)).to(dtype)


def grad_B(g2d: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (g2d.t() @ t).to(dtype)
