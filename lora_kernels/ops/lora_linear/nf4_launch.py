"""Launchers of the NF4 kernels (``nf4_kernels.py``): the dequantization into a scratch buffer and the fused GEMM
with W decoded in its main loop.  Same conventions as ``launch`` (outputs through ``launch._empty``, the same dot
and dropout flags), which calls ``gemm`` for an NF4 base in the fused arrangement.
"""

from __future__ import annotations

import torch
import triton

from lora_kernels._backend import interpreter_enabled
from lora_kernels.ops.lora_linear import launch
from lora_kernels.ops.lora_linear.nf4_kernels import _lora_nf4_gemm_kernel, _nf4_dequant_kernel
from lora_kernels.quant.nf4 import NF4Tensor

_DEQUANT_BLOCK = 1024
# One tile per program, pointer loads, the W tile decoded in registers each K step.  Offline sm_90 report (the JIT's
# specialisation, LLaMA-7B shapes): 128×128×32 / 8 warps / 3 stages compiles to 197-255 registers, no stack, wgmma,
# 96 KiB of shared memory (8 B of stack at most on unaligned shapes).  Against it: BLOCK_K = 64 spills 64 B in the
# masked dgrad (312 B unaligned), 64×128 with 4 warps 24 B (80-88 B unaligned), 2 stages 56 B unaligned, 4 stages
# spill nothing more but take 139 KiB.  fp32 (FMA units): the dense fp32 tile with one stage, 16 B at most (two or
# three stages spill 536-640 B, up to 3 KB unaligned).  Unmeasured on a GPU: docs/design.md, "QLoRA".
_PINNED_GPU = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
_PINNED_GPU_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
_PINNED_INTERPRET = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def _log2(blocksize: int) -> int:
    if blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"the NF4 kernels need a power-of-two blocksize (bitsandbytes' are), got {blocksize}")
    return blocksize.bit_length() - 1


def gemm_meta(dtype: torch.dtype) -> dict:
    if interpreter_enabled():
        return _PINNED_INTERPRET
    return _PINNED_GPU_FP32 if dtype == torch.float32 else _PINNED_GPU


def dequantize(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense out×in tensor of ``dtype`` (fp32, fp16 or bf16), bit-identical to ``dequantize_nf4_ref``."""
    out = launch._empty(q.shape, q.device, dtype)
    scales = q.block_scales()
    bf16 = dtype == torch.bfloat16
    dst = out.view(torch.int16) if bf16 else out  # bf16 stored through its bits: see _round_bf16
    _nf4_dequant_kernel[(triton.cdiv(q.numel, _DEQUANT_BLOCK),)](
        q.packed, scales, q.code, dst, q.numel, _log2(q.blocksize), ROUND_BF16=bf16, BLOCK=_DEQUANT_BLOCK)
    return out


def gemm(a2d: torch.Tensor, q: NF4Tensor, w_nk: bool, bias, t: torch.Tensor, l: torch.Tensor, c: torch.Tensor,
         seed: int, p: float, epi_dropout: bool) -> torch.Tensor:
    """c = a2d Wᵀ + bias + t l (w_nk, the forward) or a2d W + keep ⊙ (t l) (dgrad), W decoded in the main loop."""
    m, k = a2d.shape
    n = c.shape[1]
    r = t.shape[1]
    n_in = q.shape[1]
    stride_wk, stride_wn = (1, n_in) if w_nk else (n_in, 1)
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else a2d
    meta = gemm_meta(a2d.dtype)
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _lora_nf4_gemm_kernel[grid](
        a2d, q.packed, q.block_scales(), q.code, bias, t, l, c,
        m, n, k, r, _log2(q.blocksize),
        a2d.stride(0), a2d.stride(1), stride_wk, stride_wn, t.stride(0), t.stride(1),
        l.stride(0), l.stride(1), c.stride(0), c.stride(1),
        seed, launch._dropout_threshold(p),
        HAS_BIAS=has_bias, HAS_LORA=r > 0, EPI_DROPOUT=epi_dropout and p > 0.0,
        ROUND_BF16=a2d.dtype == torch.bfloat16, BLOCK_R=launch.tuning.block_r(r),
        **launch._dot_flags(a2d.dtype), **launch._lora_loop_flags(a2d.dtype, t.dtype), **meta,
    )
    return c
