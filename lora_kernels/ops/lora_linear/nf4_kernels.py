"""Triton kernels for an NF4 (4-bit, bitsandbytes layout) frozen base weight: ``lora_kernels/quant/nf4.py`` has the
layout, ``nf4_weight.py`` the launchers.  Triton only.

Algorithm
---------
* ``_nf4_dequant_kernel``: W (out×in) into a dense scratch buffer of the compute dtype, for the "scratch"
  arrangement (dequantize, cuBLAS for the base product, then our in-place LoRA pass: ``BASE_IN_C``).
* ``_lora_nf4_gemm_kernel``: the fused arrangement.  Same product as ``_lora_gemm_kernel`` (c = a·w + bias +
  keep ⊙ (t·l)), but each w tile is decoded in the main loop from the packed codes: one byte load and a nibble
  select per element, the level from the 16-entry code table, times the block's fp32 scale, rounded once to the
  compute dtype -- the same fp32 product and rounding as bitsandbytes' ``dequantize_4bit``, so both arrangements
  see bit-identical W values.  No dequantized W exists outside registers.
The block scales reach both kernels as fp32 (double-quantized scales are decoded first, per call, by the launcher:
n_blocks·4 bytes = numel/16 bytes, an eighth of the packed weight, freed after the call).  Decoding them here would
let the compiler contract ``code2[q]·absmax2 + offset`` into one FMA, which rounds differently from bitsandbytes.

Element f of W (flat, row-major) sits at w tile coordinates (k, n) through f = k·stride_wk + n·stride_wn (forward:
k = input feature, n = output feature, strides (1, in); dgrad: k = output feature, n = input feature, strides
(in, 1)).  Byte f >> 1, high nibble for even f; scale f >> log2(blocksize) (bitsandbytes' block sizes are powers
of two).  Any in_features works (blocks and bytes may straddle rows).

Trade-off (predictions in docs/design.md, "QLoRA"): the decode is ~10 integer/fp instructions per W element per row
block of tokens; at 8192 tokens with 128-row tiles W is decoded 64 times, so at large token counts the scratch
arrangement (decode once, cuBLAS) is expected to win and at small ones the fused one; the dispatcher measures both.
"""

import triton
import triton.language as tl

from lora_kernels.ops.lora_linear.kernels import _SEED_ARGS, _dropout_keep, _masked_dot_loop, _tile_coords


@triton.jit
def _round_bf16(v):
    """fp32 → the nearest bf16 value (ties to even), still fp32: the GPU's conversion, written out because the
    interpreter's fp32 → bf16 cast truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nf4_decode(q_ptr, scale_ptr, code_ptr, base, local, ok, LOG2_BLOCKSIZE):
    """fp32 W values at flat indices base + local, 0 where not ``ok``: code[nibble] · scale[block].

    base: an int64 scalar (the tile's first element); local: int32 offsets within the tile.  Only the scalar part is
    64-bit: byte (base + local) >> 1 and block (base + local) >> log2(blocksize) are split into a scalar base and an
    int32 remainder, which halves the index registers of a tile (the 64-bit form spilled at every 16-bit tile).
    """
    lo = (base & 1).to(tl.int32) + local
    byte = tl.load(q_ptr + (base >> 1) + (lo >> 1), mask=ok, other=0)
    nib = tl.where((lo & 1) == 0, byte >> 4, byte & 0xF)
    level = tl.load(code_ptr + nib.to(tl.int32))  # nib ∈ [0, 16): always in the table
    rem = (base & ((1 << LOG2_BLOCKSIZE) - 1)).to(tl.int32) + local
    scale = tl.load(scale_ptr + (base >> LOG2_BLOCKSIZE) + (rem >> LOG2_BLOCKSIZE), mask=ok, other=0.0)
    return level * scale


@triton.jit
def _nf4_dequant_kernel(
    q_ptr,      # [⌈numel/2⌉] uint8 packed codes
    scale_ptr,  # [n_blocks] fp32 block scales
    code_ptr,   # [16] fp32 levels
    out_ptr,    # [numel] output, compute dtype (bf16 stored through its uint16 bits)
    NUMEL, LOG2_BLOCKSIZE,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[f] = code[nibble(f)] · scale[f >> LOG2_BLOCKSIZE], rounded once to out's dtype."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    flat = base + local
    ok = flat < NUMEL
    w = _nf4_decode(q_ptr, scale_ptr, code_ptr, base, local, ok, LOG2_BLOCKSIZE)
    if ROUND_BF16:
        tl.store(out_ptr + flat, (_round_bf16(w).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16), mask=ok)
    else:
        tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_SEED_ARGS)  # one compiled kernel for every seed: see kernels._SEED_ARGS
def _lora_nf4_gemm_kernel(
    a_ptr,      # [M, K]  x (forward) or g (dgrad)
    q_ptr,      # packed W codes (uint8), read through stride_wk / stride_wn in elements
    scale_ptr,  # [n_blocks] fp32 block scales
    code_ptr,   # [16] fp32 levels
    bias_ptr,   # [N]     (forward only)
    t_ptr,      # [M, R]  t' (forward) or gB' (dgrad)
    l_ptr,      # [R, N]  as strides: Bᵀ (forward) or A (dgrad)
    c_ptr,      # [M, N]  output
    M, N, K, R, LOG2_BLOCKSIZE,
    stride_am, stride_ak,
    stride_wk, stride_wn,
    stride_tm, stride_tr,
    stride_lr, stride_ln,
    stride_cm, stride_cn,
    seed: tl.int64, threshold: tl.uint32,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EPI_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_UPCAST: tl.constexpr, LORA_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c = a @ dequant(w) (+ bias) + keep ⊙ (t @ l), one BLOCK_M×BLOCK_N tile per program, grouped order.

    As ``_lora_gemm_kernel`` with pointer loads (no TMA: the packed operand has no 16-bit tile to describe), the
    w tile decoded in registers.  UPCAST (the interpreter's bf16): the decoded values are rounded to bf16 by hand
    (``ROUND_BF16``) and kept in fp32, so the interpreter multiplies exactly the values the GPU does.
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA and EPI_DROPOUT:  # masked LoRA term first, so the Philox registers are dead before the main loop
        acc = _masked_dot_loop(t_ptr, l_ptr, rows, cols, row_ok, col_ok, R, stride_tm, stride_tr, stride_lr,
                               stride_ln, acc, LORA_UPCAST, LORA_PRECISION, BLOCK_R, LORA_PRECISION == "tf32")
        keep = _dropout_keep(seed, rows, pid_n.to(tl.int64) * BLOCK_N, N, threshold.to(tl.uint32), BLOCK_N)
        acc = tl.where(keep, acc, tl.zeros_like(acc))
    kk = tl.arange(0, BLOCK_K)
    # W tile offsets within the tile (int32), the tile's first element added as a 64-bit scalar per step.
    w_local = kk[:, None] * stride_wk + tl.arange(0, BLOCK_N)[None, :] * stride_wn
    col0 = pid_n.to(tl.int64) * BLOCK_N
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk.to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _nf4_decode(q_ptr, scale_ptr, code_ptr, k0 * stride_wk + col0 * stride_wn, w_local,
                        k_ok[:, None] & col_ok[None, :], LOG2_BLOCKSIZE)
        if UPCAST:
            a = a.to(tl.float32)
            if ROUND_BF16:
                w = _round_bf16(w)
        else:
            w = w.to(a_ptr.dtype.element_ty)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    if HAS_LORA and not EPI_DROPOUT:
        acc = _masked_dot_loop(t_ptr, l_ptr, rows, cols, row_ok, col_ok, R, stride_tm, stride_tr, stride_lr,
                               stride_ln, acc, LORA_UPCAST, LORA_PRECISION, BLOCK_R, LORA_PRECISION == "tf32")
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
