"""The pure-PyTorch backend: CPU without the interpreter, float64, machines without Triton, ranks above the kernels'.

Same entry points and signatures as ``launch`` (``keep_mask``, ``shrink``, ``gemm``, ``grad_A``, ``grad_B``), so the
autograd Function picks a backend in one place, plus ``lora_bwd``: the whole backward in one call, so that the
dropout mask is drawn once for dX and dA (``function.lora_bwd`` hands the backward to a backend that has one).
Same semantics; the dropout mask comes from torch's own generator seeded with the call's seed, so its masks differ
from the kernels' Philox masks (same distribution, and the same seed gives the same mask within a backend).

fp32 adapters on a 16-bit base (PEFT's ``autocast_adapter_dtype``): as PEFT, the LoRA branch runs in fp32 (x and g
upcast, t' and gB' fp32, dA and dB from fp32 products); the forward adds the fp32 LoRA term to the 16-bit base
product and rounds once to x's dtype, the dgrad adds g W to the fp32 LoRA term and rounds once.

The mask of an n×k input is ``torch.rand((n, k), generator=<device generator seeded with seed>) >= p`` (fp32
uniforms: P(keep) = 1 - p up to the 2^-24 grid of the uniforms and p rounded to fp32).  It is never stored: the
forward draws it, the backward draws it again (once, for dX and dA together), and activation checkpointing's
recompute draws the same one.  Every user goes through ``_keep_mult``, the same draw and the same comparison as
``keep_mask`` (what ``dropout_mask`` reveals), written in place into the uniforms' buffer as 0/1 values.

Cost model (measured on CPU, ``bench/results/cpu_torch_path.md``): the large GEMMs are shared with nn.Linear; what a
LoRA step adds is the skinny rank-r products, every extra pass over (and allocation of) an N×in or N×out tensor, and
with dropout the mask draws (torch's CPU generator, mt19937, fills serially at ~2 ns per element: ~4 ms for
2048×1024, a tenth of nn.Linear's fwd+bwd on 2 cores).  So: the LoRA term goes into the base product's buffer with
``addmm_`` (no N×in temporary when p = 0), the mask is made in place (no bool → float conversion, no separate masked
copy) and multiplies the LoRA term in place, and the backward draws it once for dX and dA.  (Drawing row blocks on
helper threads measured 4.3 → 2.4 ms alone but no gain inside a step: OpenMP's workers spin on the other cores for
a few ms after every parallel op.)
"""

from __future__ import annotations

from typing import Optional

import torch

from lora_kernels.ops.lora_linear.base_weight import BaseWeight


def _uniforms(seed: int, n: int, k: int, device) -> torch.Tensor:
    """The n×k fp32 uniforms the mask of ``seed`` compares against p (a fresh tensor)."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand((n, k), generator=gen, device=device)


def keep_mask(seed: int, n: int, k: int, p: float, device) -> torch.Tensor:
    """Boolean keep mask (True = kept) of an n×k input, from a generator on ``device`` seeded with ``seed``."""
    return _uniforms(seed, n, k, device) >= p


def _keep_mult(seed: int, n: int, k: int, p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``keep_mask(seed, n, k, p, device)`` as 0/1 values of ``dtype``: a fresh tensor the caller may overwrite.
    fp32 reuses the uniforms' buffer (``ge_`` in place: one N×k allocation, one pass after the draw)."""
    keep = _uniforms(seed, n, k, device).ge_(p)
    return keep if dtype == torch.float32 else keep.to(dtype)


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t.mul_(s) if s != 1.0 else t


def _as(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v in ``dtype``: PEFT's ``_cast_input_dtype``, the 16-bit x (or g) upcast for fp32 adapters' LoRA branch."""
    return v if v.dtype == dtype else v.to(dtype)


def _masked_input(x2d: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """m ⊙ x2d in ``dtype`` (x2d's, or the fp32 of fp32 adapters), written into the mask's own buffer: no second
    N×in tensor, and the upcast rides on the multiply."""
    if p == 0.0:
        return _as(x2d, dtype)
    return _keep_mult(seed, x2d.shape[0], x2d.shape[1], p, dtype, x2d.device).mul_(x2d)


def shrink(x2d: torch.Tensor, a: torch.Tensor, seed: int, p: float, out_scale: float) -> torch.Tensor:
    """t = out_scale · (m ⊙ x2d) aᵀ (the mask only: callers fold 1/(1-p) into out_scale, as the kernels do).
    With a wider ``a`` (fp32 adapters on a 16-bit base) x2d is upcast first and t is in a's dtype, as PEFT does."""
    dtype = torch.promote_types(x2d.dtype, a.dtype)
    return _scaled(_masked_input(x2d, seed, p, dtype) @ _as(a, dtype).t(), out_scale)


def _dgrad(g2d: torch.Tensor, base: BaseWeight, gb: torch.Tensor, l: torch.Tensor,
           keep: Optional[torch.Tensor]) -> torch.Tensor:
    """dX = g W + keep ⊙ (gb l) with one N×in result buffer (plus the mask's, with dropout).  fp32 gb and l with a
    16-bit g (fp32 adapters): the LoRA term in fp32, g W added to it in fp32, one rounding to g's dtype."""
    if gb.dtype != g2d.dtype:
        lora = torch.mm(gb, l)
        if keep is not None:
            lora.mul_(keep)
        return lora.add_(base.grad_input(g2d)).to(g2d.dtype)
    if keep is None:
        return base.grad_input(g2d).addmm_(gb, l)  # rank-r update in place: no N×in temporary
    return base.add_grad_input_(torch.mm(gb, l).mul_(keep), g2d)  # g W accumulates into the masked LoRA term


def gemm(a2d: torch.Tensor, base: BaseWeight, w_nk: bool, bias: Optional[torch.Tensor], t: torch.Tensor,
         l: torch.Tensor, seed: int, p: float, epi_dropout: bool) -> torch.Tensor:
    if w_nk:
        y = base.linear(a2d, bias)
        if t.dtype != y.dtype:  # PEFT: result + lora_B(lora_A(x)) · s in fp32, then .to(result's dtype)
            return torch.addmm(y.to(t.dtype), t, l).to(y.dtype)
        return y.addmm_(t, l)
    keep = _keep_mult(seed, a2d.shape[0], l.shape[1], p, t.dtype, a2d.device) if epi_dropout and p > 0.0 else None
    return _dgrad(a2d, base, t, l, keep)


def grad_A(x2d: torch.Tensor, gb: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    return (gb.t() @ _masked_input(x2d, seed, p, gb.dtype)).to(dtype)


def grad_B(g2d: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (_as(g2d, t.dtype).t() @ t).to(dtype)


def lora_bwd(g2d: torch.Tensor, x2d: Optional[torch.Tensor], t: Optional[torch.Tensor], base: BaseWeight, lora_A,
             lora_B, scale: float, dropout_p: float, seed: int, *, need_dx: bool, need_dA: bool, need_dB: bool):
    """(dx2d, dA, dB) as ``function.lora_bwd``, the mask drawn once for dX and dA (their generic composition from
    ``gemm`` and ``grad_A`` would draw it twice in AB mode)."""
    dx = d_a = d_b = None
    if need_dx or need_dA:
        gb = shrink(g2d, lora_B.t(), 0, 0.0, scale / (1.0 - dropout_p))  # gB' = s/(1-p) · g B
        keep = (_keep_mult(seed, g2d.shape[0], lora_A.shape[1], dropout_p, gb.dtype, g2d.device)
                if dropout_p > 0.0 else None)
        if need_dx:
            dx = _dgrad(g2d, base, gb, lora_A, keep)
        if need_dA:
            xm = _as(x2d, gb.dtype) if keep is None else keep.mul_(x2d)  # dX is done with the mask: m ⊙ x in it
            d_a = (gb.t() @ xm).to(lora_A.dtype)
    if need_dB:
        d_b = grad_B(g2d, t, lora_B.dtype)
    return dx, d_a, d_b
