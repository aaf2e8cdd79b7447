"""Launchers of the LoRA kernels: check layouts, allocate, pick tiles (``tuning``) and launch (``kernels``).

The four entry points -- ``keep_mask``, ``shrink``, ``gemm``, ``grad_A`` / ``grad_B`` -- have the same signatures as
those of ``torch_path``, so ``function.py`` switches backend in one place (``dispatch.backend``).  The frozen base
product comes from a ``BaseWeight`` (``base_weight.py``): the fused GEMM reads its dense operand, the split
arrangement asks it for x Wᵀ + b (or g W) and adds the LoRA term in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from lora_kernels import settings
from lora_kernels._backend import interpreter_enabled
from lora_kernels.ops.lora_linear import arrangement, tuning, tuning_cache
from lora_kernels.ops.lora_linear.base_weight import BaseWeight
from lora_kernels.ops.lora_linear.kernels import (_dropout_mask_kernel, _lora_gemm_kernel, _lora_shrink_kernel,
                                                  _lora_wgrad_kernel)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison it (NaN) and catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot returns garbage for bf16 operands (triton 3.6); fp32 operands are exact.
    return interpreter_enabled() and dtype == torch.bfloat16


def _input_precision(dtype: torch.dtype) -> str:
    # Match what nn.Linear does for fp32: IEEE unless the user allowed TF32 for matmuls.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dropout_threshold(p: float) -> int:
    """⌊p·2¹⁶⌋ clamped to 2¹⁶ − 1: ``_dropout_keep`` keeps an element whose 16-bit draw is ≥ this."""
    return min(int(p * 65536.0), 65535)


def _dot_flags(dtype: torch.dtype, other: Optional[torch.dtype] = None) -> dict:
    """UPCAST / INPUT_PRECISION of a product of a ``dtype`` operand with an ``other`` one (default: the same dtype).
    A 16-bit operand with an fp32 one (fp32 adapters on a 16-bit base: x or g with A, B, t' or gB') is an fp32
    product: the 16-bit operand is upcast exactly and the precision follows fp32's rule, as PEFT's fp32 lora_A /
    lora_B (cuBLAS: IEEE unless TF32 is allowed)."""
    if other is None or other == dtype:
        return dict(UPCAST=_upcast(dtype), INPUT_PRECISION=_input_precision(dtype))
    return dict(UPCAST=True, INPUT_PRECISION=_input_precision(torch.float32))


def lora_dtype(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the N×r intermediates t' and gB': the adapters' when they are wider than x (fp32 adapters on
    a 16-bit base keep the LoRA branch in fp32, as PEFT does), else x's."""
    return torch.promote_types(x_dtype, adapter_dtype)


def _lora_loop_flags(main_dtype: torch.dtype, lora: torch.dtype) -> dict:
    """LORA_UPCAST / LORA_PRECISION of the GEMM's LoRA K-loop (t' l, over r).  Same dtype as the main loop: its
    flags.  fp32 t' and l in a 16-bit GEMM: tf32 on the tensor cores, the operands rounded to nearest tf32 in the
    kernel (the output is 16-bit: that rounding, ≤ 2⁻¹¹ relative, is at or below the output's own; IEEE fp32
    would run on the FMA units and convert the accumulator out of the wgmma layout, docs/design.md decision 14)."""
    if lora == main_dtype:
        f = _dot_flags(main_dtype)
        return dict(LORA_UPCAST=f["UPCAST"], LORA_PRECISION=f["INPUT_PRECISION"])
    return dict(LORA_UPCAST=False, LORA_PRECISION="tf32")


def keep_mask(seed: int, n: int, k: int, p: float, device) -> torch.Tensor:
    """The kernels' boolean keep mask (True = kept) of an n×k input: what ``_dropout_keep`` draws in every kernel."""
    out = torch.empty((n, k), device=device, dtype=torch.uint8)
    if n and k:
        grid = (triton.cdiv(n, 32), triton.cdiv(k, 32))
        _dropout_mask_kernel[grid](out, n, k, out.stride(0), out.stride(1), seed, _dropout_threshold(p),
                                   BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def shrink(x2d: torch.Tensor, a: torch.Tensor, seed: int, p: float, out_scale: float) -> torch.Tensor:
    """t = out_scale · (m ⊙ x2d) aᵀ, a: [R, K] any strides.  The mask only (no 1/(1-p): fold it into out_scale).
    t is in ``lora_dtype``: fp32 for a 16-bit x with fp32 a (an fp32 product, x upcast in the kernel)."""
    m, k = x2d.shape
    r = a.shape[0]
    t = _empty((m, r), x2d.device, lora_dtype(x2d.dtype, a.dtype))  # fp32 with fp32 adapters: PEFT's precision
    if m == 0:
        return t
    meta = tuning.shrink_meta(r)
    _lora_shrink_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
        x2d, a, t, m, k, r,
        x2d.stride(0), x2d.stride(1), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        seed, _dropout_threshold(p), out_scale,
        HAS_DROPOUT=p > 0.0, **_dot_flags(x2d.dtype, a.dtype), **meta,
    )
    return t


# --------------------------------------------------------------------------------------------------------------
# Tensor descriptors (TMA)
# --------------------------------------------------------------------------------------------------------------

def _tma_aligned(*mats: torch.Tensor) -> bool:
    """Tensor-descriptor rules: unit inner stride, 16-byte aligned base and row stride, rows that neither overlap
    nor repeat (a broadcast gradient has row stride 0)."""
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               and (t.shape[0] == 1 or t.stride(0) >= t.shape[1]) for t in mats)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device=torch.device("cuda", torch.cuda.current_device()), dtype=torch.int8)


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator.  Triton keeps it in a ContextVar, which a new
    thread (autograd runs CUDA backward on its own worker thread) does not inherit: check on every launch."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return  # someone (us on this thread, or the user / inductor) already set one
    except (ImportError, AttributeError):  # internals moved: setting it is always safe
        pass
    triton.set_allocator(_tma_scratch)


def _use_tma(a2d, w, c) -> bool:
    # 16-bit only: IEEE fp32 runs on the FMA units, where the transposed TMA tile spills 272 B (sm_90 report).
    if (not settings.get().tma or a2d.dtype not in (torch.float16, torch.bfloat16)
            or not _tma_aligned(a2d, w, c)):
        return False
    if interpreter_enabled():
        return True
    if torch.cuda.get_device_capability(a2d.device)[0] < 9:
        return False
    _ensure_tma_allocator()
    return True


# --------------------------------------------------------------------------------------------------------------
# The GEMM: c = base product + keep ⊙ (t @ l), fused or split
# --------------------------------------------------------------------------------------------------------------

def _gemm_launch(a2d, w, w_nk, bias, t, l, c, seed, p, epi_dropout, base_in_c):
    """Launches ``_lora_gemm_kernel`` into c [M, N].  base_in_c: c already holds the base product (+ bias), and w
    is unused (a2d is passed in its place).  l: the [R, N] view of the LoRA up-projection."""
    m, k = a2d.shape
    n = c.shape[1]
    r = t.shape[1]
    if base_in_c:
        w, w_strides = a2d, (0, 0)
    else:
        w_strides = (w.stride(1), w.stride(0)) if w_nk else (w.stride(0), w.stride(1))
    has_bias = bias is not None and not base_in_c
    if has_bias:
        bias = bias.contiguous()  # the kernel reads it with unit stride
    args = (
        a2d, w, bias if has_bias else a2d, t, l, c,
        m, n, k, r,
        a2d.stride(0), a2d.stride(1), w_strides[0], w_strides[1], t.stride(0), t.stride(1),
        l.stride(0), l.stride(1), c.stride(0), c.stride(1),
        seed, _dropout_threshold(p), min(triton.next_power_of_2(m), 16384) // 64,
    )
    flags = dict(HAS_BIAS=has_bias, HAS_LORA=r > 0, EPI_DROPOUT=epi_dropout and p > 0.0, BASE_IN_C=base_in_c,
                 BLOCK_R=tuning.block_r(r), USE_TMA=not base_in_c and _use_tma(a2d, w, c), W_NK=w_nk,
                 **_dot_flags(a2d.dtype), **_lora_loop_flags(a2d.dtype, t.dtype))
    if autotune_enabled() and not base_in_c:
        grid = lambda meta: (tuning.grid_size(m, n, meta, a2d.device),)  # noqa: E731
        # False only inside a CUDA graph capture, for a key not tuned yet: the pinned tile below (said once).
        if tuning_cache.launch_tuned(tuning._lora_gemm_kernel_tuned, grid, args, flags):
            return c
    meta = tuning.pinned_gemm_meta(a2d.dtype, base_in_c)
    _lora_gemm_kernel[(tuning.grid_size(m, n, meta, a2d.device),)](*args, **flags, **meta)
    return c


def autotune_enabled() -> bool:
    return not interpreter_enabled() and settings.get().autotune


def _base_product(a2d, base: BaseWeight, w_nk: bool, bias):
    return base.linear(a2d, bias) if w_nk else base.grad_input(a2d)


def _gemm_fused(a2d, base, w_nk, bias, t, l, seed, p, epi_dropout):
    n = base.out_features if w_nk else base.in_features
    c = _empty((a2d.shape[0], n), a2d.device, a2d.dtype)
    w = base.fused_operand()
    if not isinstance(w, torch.Tensor):  # a quantized W with its own main loop (today: NF4 codes)
        from lora_kernels.ops.lora_linear import nf4_launch

        return nf4_launch.gemm(a2d, w, w_nk, bias, t, l, c, seed, p, epi_dropout)
    return _gemm_launch(a2d, w, w_nk, bias, t, l, c, seed, p, epi_dropout, False)


def _gemm_split(a2d, base, w_nk, bias, t, l, seed, p, epi_dropout):
    """The base product outside our GEMM (cuBLAS, bias included), then the LoRA term added in place."""
    c = _base_product(a2d, base, w_nk, bias)
    return _gemm_launch(a2d, None, w_nk, bias, t, l, c, seed, p, epi_dropout, True)


def _times_arrangement(a2d: torch.Tensor) -> bool:
    """Whether "auto" measures the arrangements for this call (CUDA, not the interpreter); fused otherwise."""
    return a2d.is_cuda and not interpreter_enabled()


def gemm(a2d: torch.Tensor, base: BaseWeight, w_nk: bool, bias: Optional[torch.Tensor], t: torch.Tensor,
         l: torch.Tensor, seed: int, p: float, epi_dropout: bool) -> torch.Tensor:
    """c = a2d Wᵀ + bias + t l (w_nk: the forward) or c = a2d W + keep ⊙ (t l) (the dgrad, keep if epi_dropout).

    l is the [R, N] view of the up-projection (Bᵀ forward, A in dgrad).  The arrangement (fused / split) follows
    the ``gemm`` setting; "auto" measures both on first use of each shape bucket on CUDA (``arrangement``).  A base
    weight without a dense operand (``fused_operand() is None``) always takes the split arrangement.
    """
    m = a2d.shape[0]
    n = base.out_features if w_nk else base.in_features
    if m == 0 or n == 0:
        return _empty((m, n), a2d.device, a2d.dtype)
    call = (a2d, base, w_nk, bias, t, l, seed, p, epi_dropout)
    w = base.fused_operand()
    dense = isinstance(w, torch.Tensor)
    setting = settings.get().gemm if w is not None else "split"
    if setting == "auto":
        if not _times_arrangement(a2d):
            setting = "fused"
        else:
            # The LoRA operands' dtype and the weight's kind go last: readers of gemm_arrangement_report() zip the
            # leading fields.
            key = ("fwd" if w_nk else "dgrad", a2d.device.index, str(a2d.dtype).replace("torch.", ""),
                   min(triton.next_power_of_2(m), 16384), n, a2d.shape[1], t.shape[1], bias is not None,
                   epi_dropout and p > 0.0,
                   dense and (n * a2d.element_size()) % 16 == 0 and _use_tma(a2d, w, a2d),
                   _input_precision(a2d.dtype), autotune_enabled(), str(t.dtype).replace("torch.", ""),
                   "dense" if dense else type(w).__name__)
            setting = arrangement.choose(key, {"fused": lambda: _gemm_fused(*call),
                                               "split": lambda: _gemm_split(*call)})
    return _gemm_fused(*call) if setting == "fused" else _gemm_split(*call)


# --------------------------------------------------------------------------------------------------------------
# Token reductions: dA and dB
# --------------------------------------------------------------------------------------------------------------

def _wgrad(left: torch.Tensor, right: torch.Tensor, seed: int, p: float, splits: Optional[int] = None):
    """Σ_m (keep ⊙ left)ᵀ[:, m] right[m, :] in fp32, shape [P, Q]; keep only when p > 0 (left is then x).  left
    16-bit with right fp32 (t' or gB' of fp32 adapters): an fp32 product, left upcast in the kernel."""
    m, pdim = left.shape
    q = right.shape[1]
    if m == 0:
        return torch.zeros((pdim, q), device=left.device, dtype=torch.float32)
    meta = tuning.wgrad_meta(pdim, q, torch.promote_types(left.dtype, right.dtype))
    bp, bq, bm = meta["BLOCK_P"], meta["BLOCK_Q"], meta["BLOCK_M"]
    if splits is None:
        splits = tuning.wgrad_splits(m, triton.cdiv(pdim, bp) * triton.cdiv(q, bq), bm, left.device)
    m_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, m_per_split)
    partial = _empty((splits, pdim, q), left.device, torch.float32)
    _lora_wgrad_kernel[(triton.cdiv(pdim, bp), triton.cdiv(q, bq), splits)](
        left, right, partial, m, pdim, q, m_per_split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        seed, _dropout_threshold(p),
        HAS_DROPOUT=p > 0.0, **_dot_flags(left.dtype, right.dtype), **meta,
    )
    return partial[0] if splits == 1 else partial.sum(0)


def grad_A(x2d: torch.Tensor, gb: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """dA = gB'ᵀ (m ⊙ x), [r, in] contiguous in ``dtype``; computed transposed (the wide dim on the dot's M side)."""
    return _wgrad(x2d, gb, seed, p).t().to(dtype).contiguous()


def grad_B(g2d: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dB = gᵀ t', [out, r] in ``dtype``."""
    return _wgrad(g2d, t, 0, 0.0).to(dtype)
