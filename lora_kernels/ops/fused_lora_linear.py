"""Fused LoRA linear: ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with W, b frozen.

Algorithm
---------
Forward, two launches:
  1. ``_lora_shrink_kernel``: t = dropout(x) Aᵀ / (1 - p), an N×r intermediate computed once per row block
     (not once per output tile).  The dropout mask is drawn inside the kernel; no dropped copy of x exists.
  2. ``_lora_gemm_kernel``: y = x Wᵀ (+ b) + s · t Bᵀ.  The LoRA term is a second, short K-loop of the same
     accumulator over r (the "epilogue"), so there is no separate full-size add pass and y is written once.
Backward (each output computed only when its input needs a gradient):
  3. gB = g B (N×r) with the shrink kernel (no dropout).
  4. dX = g W + s · (m ⊙ (gB A)) / (1 - p) with the same GEMM kernel: the LoRA term again in the epilogue,
     the mask m regenerated from the seed at output coordinates (row, col) of the N×in result.
  5. dA = s/(1-p) · gBᵀ (m ⊙ x) and dB = s · gᵀ t with ``_lora_wgrad_kernel``: a reduction over the N
     tokens, split across programs (fp32 partial sums, reduced by one ``sum``) so that a handful of
     r×in tiles still fills the GPU.

Dropout
-------
The keep decision for element (i, k) of the logical N×in input is ``philox(seed, i·in + k) ≥ ⌊p·2³²⌋``: the
int64 linear index is fed to 32-bit Philox as two counter words, so it works past 2³¹ elements and costs
no 64-bit multiplies.  Forward, dX and dA all call ``_dropout_keep`` with the same seed, so they see the same
mask; only the seed (a Python int) is kept for backward.

Trade-offs taken (no GPU was available when this was written; see docs/design.md for what to measure)
------------------------------------------------------------------------------------------------
* The base GEMM is a tiled ``tl.dot`` loop in grouped (L2-friendly) tile order, TMA-fed for aligned 16-bit shapes,
  autotuned per shape bucket over one-tile-per-program and persistent (one program per SM) grids.
* Where cuBLAS beats our GEMM, the "split" arrangement runs the base product in cuBLAS and adds the LoRA term in
  place with the same kernel (``BASE_IN_C``).  ``LORA_KERNELS_GEMM=auto`` (default) measures both per shape bucket
  on the first call and keeps the faster: the fused kernel is used only where it measures at least as fast.
* t is stored in the input dtype, like PEFT's ``lora_B(lora_A(dropout(x)))``: it is what the epilogue dot and
  the dB reduction consume directly on the tensor cores.
* fp64 is served by the PyTorch path (for gradcheck); the kernels serve fp32 / fp16 / bf16.

Pure-PyTorch mirrors of each launcher (``_torch_*``) serve CPU without the interpreter and float64; they use
torch's own generator for the dropout mask, so their masks differ from the kernels' (same distribution,
same seed → same mask within a backend).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Optional, Tuple

import torch

from lora_kernels._backend import HAS_TRITON, interpreter_enabled, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    # ------------------------------------------------------------------------------------------------------
    # Kernels
    # ------------------------------------------------------------------------------------------------------

    @triton.jit
    def _dropout_keep(seed, rows, col_start, ROW_LEN, threshold, BLOCK_C: tl.constexpr):
        """Keep mask [len(rows), BLOCK_C] for columns col_start + [0, BLOCK_C) of a matrix with ROW_LEN columns.

        One Philox call per 4 adjacent columns (its four 32-bit outputs are the four lanes): element (i, k) uses
        counter i·⌈ROW_LEN/4⌉ + ⌊k/4⌋ and lane k mod 4.  col_start must be a multiple of 4 (every tile width
        is ≥ 16).  rows: int64 vector.  threshold: ⌊p·2³²⌋ as uint32, so P(keep) = 1 - threshold / 2³².
        """
        cols4 = col_start // 4 + tl.arange(0, BLOCK_C // 4).to(tl.int64)
        offs = rows[:, None] * ((ROW_LEN + 3) // 4) + cols4[None, :]
        c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((offs >> 32) & 0xFFFFFFFF).to(tl.uint32)
        zero = tl.zeros_like(c0)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
        # [BR, BC/4, 2, 2] -> [BR, BC] in the order r0, r1, r2, r3 along each group of 4 columns
        r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_C))
        return r >= threshold

    @triton.jit
    def _dropout_mask_kernel(
        out_ptr,  # [M, K] bool (uint8)
        M, K,
        stride_om, stride_ok,
        seed, threshold,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Materialises the keep mask the other kernels use.  For tests and debugging only."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        keep = _dropout_keep(seed, rows, tl.program_id(1).to(tl.int64) * BLOCK_K, K, threshold.to(tl.uint32),
                             BLOCK_K)
        msk = (rows < M)[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok, keep.to(tl.uint8), mask=msk)

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr,  # [M, K]  input rows (x, or g for gB = g B)
        a_ptr,  # [R, K]  down-projection (lora_A, or Bᵀ as a strided view)
        t_ptr,  # [M, R]  output, dtype of x
        M, K, R,
        stride_xm, stride_xk,
        stride_ar, stride_ak,
        stride_tm, stride_tr,
        seed, threshold, out_scale,
        HAS_DROPOUT: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """t[m, r] = out_scale · Σ_k keep[m, k] · x[m, k] · a[r, k], one program per BLOCK_M rows, all of r.

        fp32 accumulation; keep ≡ 1 without dropout.  BLOCK_R ≥ R (r ≤ 256), so x is read exactly once.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        r_ok = rr < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            col_ok = cols < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rows, k0, K, threshold.to(tl.uint32), BLOCK_K)
                x = tl.where(keep, x, tl.zeros_like(x))
            a = tl.load(a_ptr + rr[None, :] * stride_ar + cols[:, None] * stride_ak,
                        mask=r_ok[None, :] & col_ok[:, None], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, a, acc, input_precision=INPUT_PRECISION)
        acc = acc * out_scale
        tl.store(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr,
                 acc.to(t_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _masked_dot_loop(x_ptr, y_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_xk, stride_yk, stride_yn,
                         acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc + x[rows, :K] @ y[:K, cols] with pointer loads, masked on every edge, BLOCK_K at a time.  Serves
        the LoRA K-loop over r (x = t, y = l) and the pointer-load main loop over K (x = a, y = w)."""
        kk = tl.arange(0, BLOCK_K).to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + kk
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(y_ptr + ks[:, None] * stride_yk + cols[None, :] * stride_yn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of output tile ``tile_id`` in grouped order: GROUP_M row blocks sweep the columns
        together, so the W tiles they share stay in L2."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _gemm_tile(
        pid_m, pid_n,
        a_ptr, w_ptr, bias_ptr, t_ptr, l_ptr, c_ptr,
        a_desc, w_desc, c_desc,
        M, N, K, R,
        stride_am, stride_ak,
        stride_wk, stride_wn,
        stride_tm, stride_tr,
        stride_lr, stride_ln,
        stride_cm, stride_cn,
        seed, threshold,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EPI_DROPOUT: tl.constexpr, BASE_IN_C: tl.constexpr,
        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, W_NK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """One BLOCK_M×BLOCK_N output tile of ``_lora_gemm_kernel`` (see there)."""
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA and EPI_DROPOUT:
            acc = _masked_dot_loop(t_ptr, l_ptr, rows, cols, row_ok, col_ok, R, stride_tm, stride_tr, stride_lr,
                                   stride_ln, acc, UPCAST, INPUT_PRECISION, BLOCK_R)
            keep = _dropout_keep(seed, rows, pid_n.to(tl.int64) * BLOCK_N, N, threshold.to(tl.uint32), BLOCK_N)
            acc = tl.where(keep, acc, tl.zeros_like(acc))
        if BASE_IN_C:
            # The base product is already in c (cuBLAS wrote it): read it instead of the main loop.
            c_in = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += c_in.to(tl.float32)
        elif USE_TMA:
            row0 = pid_m * BLOCK_M
            col0 = pid_n * BLOCK_N
            for k0 in range(0, K, BLOCK_K):
                a = a_desc.load([row0, k0])
                if W_NK:
                    w = w_desc.load([col0, k0]).T
                else:
                    w = w_desc.load([k0, col0])
                if UPCAST:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        else:
            acc = _masked_dot_loop(a_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_am, stride_ak, stride_wk,
                                   stride_wn, acc, UPCAST, INPUT_PRECISION, BLOCK_K)
        if HAS_LORA and not EPI_DROPOUT:
            acc = _masked_dot_loop(t_ptr, l_ptr, rows, cols, row_ok, col_ok, R, stride_tm, stride_tr, stride_lr,
                                   stride_ln, acc, UPCAST, INPUT_PRECISION, BLOCK_R)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if USE_TMA:
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))
        else:
            tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                     acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _lora_gemm_kernel(
        a_ptr,     # [M, K]  x (forward) or g (dgrad)
        w_ptr,     # [K, N]  as strides: Wᵀ (forward) or W (dgrad)
        bias_ptr,  # [N]     (forward only)
        t_ptr,     # [M, R]  t (forward) or gB (dgrad)
        l_ptr,     # [R, N]  as strides: Bᵀ (forward) or A (dgrad)
        c_ptr,     # [M, N]  output (and input, with BASE_IN_C)
        M, N, K, R,
        stride_am, stride_ak,
        stride_wk, stride_wn,
        stride_tm, stride_tr,
        stride_lr, stride_ln,
        stride_cm, stride_cn,
        seed, threshold,
        M_BUCKET,  # autotune key only: a new token count in the same bucket does not retune
        HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr,
        EPI_DROPOUT: tl.constexpr,
        BASE_IN_C: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        USE_TMA: tl.constexpr,
        W_NK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
        PERSISTENT: tl.constexpr,
    ):
        """c = a @ w (+ bias) + keep ⊙ (t @ l), fp32 accumulation, BLOCK_M×BLOCK_N output tiles.

        The LoRA scale (and 1/(1-p)) is already folded into t by the shrink kernel, so the LoRA term shares the
        base GEMM's accumulator: no second BLOCK_M×BLOCK_N fp32 tile (that one cost a spill at 128×128 on sm_90).
        keep[m, n] is the dropout mask at (m, n) of the M×N output (EPI_DROPOUT, used by dgrad, where the output
        is N_tokens × in, the same index space as the forward's x).  With the mask, the short LoRA product is
        computed first and masked, so the Philox registers are dead before the main loop starts.

        USE_TMA: the main loop and the store go through tensor descriptors (the copy engine computes addresses
        and zero-fills out-of-bounds rows, so no masks): 154 registers and no spill at 128×256 on sm_90, where
        pointer loads need 255 registers and a 544-byte stack.  Needs unit inner strides and 16-byte aligned
        rows (the launcher checks).  W_NK: w's memory is [N, K] with unit stride along K (forward: W itself),
        so its tile is loaded as [BLOCK_N, BLOCK_K] and transposed; otherwise it is [K, N] (dgrad).

        PERSISTENT: the grid is at most one program per SM and each program walks the tiles
        pid, pid + grid, ... (grouped order), so one tile's epilogue and TMA store overlap the next tile's
        loads, and the grid has no partial last wave.  (``tl.range(..., flatten=True)`` produced byte-identical
        PTX for sm_90 with triton 3.6, so it is not offered.)  Otherwise one tile per program.

        BASE_IN_C: c already holds a @ w (+ bias), computed by cuBLAS; the kernel adds keep ⊙ (t @ l) in place.
        This is the "split" arrangement the launcher falls back to where cuBLAS measures faster than our GEMM.
        """
        if USE_TMA:
            a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
            if W_NK:
                w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                                   block_shape=[BLOCK_N, BLOCK_K])
            else:
                w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                                   block_shape=[BLOCK_K, BLOCK_N])
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])
        else:
            a_desc = 0
            w_desc = 0
            c_desc = 0
        if PERSISTENT:
            num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
            for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
                _gemm_tile(pid_m, pid_n, a_ptr, w_ptr, bias_ptr, t_ptr, l_ptr, c_ptr, a_desc, w_desc, c_desc,
                           M, N, K, R, stride_am, stride_ak, stride_wk, stride_wn, stride_tm, stride_tr,
                           stride_lr, stride_ln, stride_cm, stride_cn, seed, threshold,
                           HAS_BIAS, HAS_LORA, EPI_DROPOUT, BASE_IN_C, UPCAST, INPUT_PRECISION, USE_TMA, W_NK,
                           BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        else:
            pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _gemm_tile(pid_m, pid_n, a_ptr, w_ptr, bias_ptr, t_ptr, l_ptr, c_ptr, a_desc, w_desc, c_desc,
                       M, N, K, R, stride_am, stride_ak, stride_wk, stride_wn, stride_tm, stride_tr,
                       stride_lr, stride_ln, stride_cm, stride_cn, seed, threshold,
                       HAS_BIAS, HAS_LORA, EPI_DROPOUT, BASE_IN_C, UPCAST, INPUT_PRECISION, USE_TMA, W_NK,
                       BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)

    @triton.jit
    def _lora_wgrad_kernel(
        l_ptr,  # [M, P]  left rows (x for dAᵀ, g for dB)
        r_ptr,  # [M, Q]  right rows (gB' for dAᵀ, t' for dB)
        c_ptr,  # [S, P, Q] fp32 partial sums, one slice per split of M
        M, P, Q, M_PER_SPLIT,
        stride_lm, stride_lp,
        stride_rm, stride_rq,
        stride_cs, stride_cp, stride_cq,
        seed, threshold,
        HAS_DROPOUT: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """c[s, p, q] = Σ_{m in split s} keep[m, p] · l[m, p] · r[m, q]  (keep: mask of the M×P left operand).

        The wide dimension (in, or out) is P, the dot's M side, so a 64-wide P tile runs on wgmma even when
        r = 16; dA is produced transposed (in × r) for that reason.
        """
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        pid_s = tl.program_id(2)
        ps = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        qs = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        p_ok = ps < P
        q_ok = qs < Q
        m_start = pid_s.to(tl.int64) * M_PER_SPLIT
        m_end = min(m_start + M_PER_SPLIT, M)
        mm = tl.arange(0, BLOCK_M).to(tl.int64)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            ms = m0 + mm
            m_ok = ms < m_end
            lt = tl.load(l_ptr + ms[:, None] * stride_lm + ps[None, :] * stride_lp,
                         mask=m_ok[:, None] & p_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_P]
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, ms, pid_p.to(tl.int64) * BLOCK_P, P, threshold.to(tl.uint32), BLOCK_P)
                lt = tl.where(keep, lt, tl.zeros_like(lt))
            rt = tl.load(r_ptr + ms[:, None] * stride_rm + qs[None, :] * stride_rq,
                         mask=m_ok[:, None] & q_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_Q]
            if UPCAST:
                lt = lt.to(tl.float32)
                rt = rt.to(tl.float32)
            acc = tl.dot(tl.trans(lt), rt, acc, input_precision=INPUT_PRECISION)
        tl.store(c_ptr + pid_s.to(tl.int64) * stride_cs + ps[:, None] * stride_cp + qs[None, :] * stride_cq,
                 acc, mask=p_ok[:, None] & q_ok[None, :])

    # ------------------------------------------------------------------------------------------------------
    # Autotuning
    # ------------------------------------------------------------------------------------------------------

    # IEEE fp32 runs on the FMA units: small tiles only (the 16-bit ones spill or exceed shared memory there).
    _FP32_TILES = {(64, 64, 32), (128, 64, 32), (64, 128, 32)}
    # Persistent candidates (TMA only): the large tiles, where one program fills an SM's shared memory anyway.
    _PERSISTENT_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]

    def get_gemm_configs():
        """Candidate tiles for the fused GEMM on Hopper/Ampere; pruned per shape by ``_prune_gemm_configs``.

        Each 16-bit tile comes one-tile-per-program and, for the large TMA tiles, persistent (one program per SM
        walking the tiles); the autotuner measures both per shape bucket."""
        def cfg(bm, bn, bk, warps, stages, persistent=False):
            return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": persistent},
                                 num_warps=warps, num_stages=stages)

        configs = [cfg(bm, bn, bk, 4, 3) for bm, bn, bk in sorted(_FP32_TILES)]
        for bm, bn, bk, warps, stages in [
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
        ]:
            configs.append(cfg(bm, bn, bk, warps, stages))
        for bm, bn, bk, warps, stages in _PERSISTENT_TILES:
            configs.append(cfg(bm, bn, bk, warps, stages, persistent=True))
        return configs

    # Tiles whose pointer-load form spills on sm_90 (lora_kernels.ops.aot): used only with TMA.
    _TMA_ONLY_TILES = {(128, 256), (256, 128), (64, 128)}

    def _prune_gemm_configs(configs, named_args, **kwargs):
        """Drop tiles larger than the problem, and tiles that spill on sm_90 for this variant (aot report):
        pointer loads at the TMA-only tiles or at 128×128 with 4 warps; the masked dgrad (Philox in the
        epilogue) above 64 accumulator elements per thread.  Persistent tiles only with TMA, and only when
        there are more tiles than SMs (otherwise they are the same launch with a loop around it)."""
        def flag(name):
            return kwargs.get(name, named_args.get(name, False))

        m, n = named_args["M"], named_args["N"]
        use_tma, masked = flag("USE_TMA"), flag("EPI_DROPOUT")
        a = named_args.get("a_ptr")
        fp32 = getattr(a, "dtype", None) == torch.float32 and flag("INPUT_PRECISION") == "ieee"
        num_sms = _sm_count(a.device) if getattr(a, "is_cuda", False) else 132  # (132: the H100 SXM, for aot)
        keep = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if fp32 != ((bm, bn, c.kwargs["BLOCK_K"]) in _FP32_TILES and c.num_warps == 4 and c.num_stages == 3):
                continue
            per_thread = bm * bn // (32 * c.num_warps)
            if bm > max(64, triton.next_power_of_2(m)) or bn > max(64, triton.next_power_of_2(n)):
                continue
            if not use_tma and ((bm, bn) in _TMA_ONLY_TILES or (c.num_warps == 4 and bm * bn >= 128 * 128)):
                continue
            if c.kwargs["PERSISTENT"] and (not use_tma or triton.cdiv(m, bm) * triton.cdiv(n, bn) <= num_sms):
                continue
            if masked and per_thread > 64:
                continue
            keep.append(c)
        return keep or [c for c in configs if not c.kwargs["PERSISTENT"]][-1:]

    _lora_gemm_kernel_tuned = triton.autotune(
        configs=get_gemm_configs(),
        key=["M_BUCKET", "N", "K", "R", "HAS_LORA", "EPI_DROPOUT", "HAS_BIAS", "BASE_IN_C", "USE_TMA", "W_NK",
             "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_gemm_configs},
    )(_lora_gemm_kernel)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

# Pinned tiles: used under the interpreter (small, so odd test shapes cross several tiles) and on the GPU
# when autotuning is switched off with LORA_KERNELS_AUTOTUNE=0 (tests).
_ONE_TILE = dict(PERSISTENT=False)
_PINNED_INTERPRET = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, **_ONE_TILE)
_PINNED_GPU = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, **_ONE_TILE)
# IEEE fp32 runs on the FMA units, not the tensor cores: the 16-bit tile above needs a 6.8 KB stack there
# (offline sm_90 compile report), so fp32 gets a smaller one.
_PINNED_GPU_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, **_ONE_TILE)
# The split arrangement's LoRA pass (BASE_IN_C: no main loop, memory-bound): 8 warps (4 spilled 128 B on sm_90),
# the masked-epilogue budget.  BLOCK_K is unused there.
_PINNED_SPLIT_GPU = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2, **_ONE_TILE)
# Persistent grid under the interpreter: fewer programs than tiles, so each walks several, unevenly.
_INTERPRET_PROGRAMS = 3


def _pinned_gpu(dtype: torch.dtype) -> dict:
    return _PINNED_GPU_FP32 if dtype == torch.float32 else _PINNED_GPU


def _empty(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison it (NaN) and catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


def _autotune_enabled() -> bool:
    return not interpreter_enabled() and os.environ.get("LORA_KERNELS_AUTOTUNE", "1") != "0"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot returns garbage for bf16 operands (triton 3.6); fp32 operands are exact.
    return interpreter_enabled() and dtype == torch.bfloat16


def _input_precision(dtype: torch.dtype) -> str:
    # Match what nn.Linear does for fp32: IEEE unless the user allowed TF32 for matmuls.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block_r(r: int) -> int:
    # tl.dot needs every block dim ≥ 16 on the GPU; the epilogue loops over r in chunks of at most 64.
    return max(16, min(64, triton.next_power_of_2(r)))


def _dropout_threshold(p: float) -> int:
    return min(int(p * 2.0**32), 2**32 - 1)


def dropout_mask(seed: int, shape: Tuple[int, int], p: float, device) -> torch.Tensor:
    """The boolean keep mask (True = kept) that the kernels, or the PyTorch path, use for an N×in input.

    Exposed so tests can compare against a float64 reference with the very same mask.
    """
    n, k = shape
    probe = torch.empty(0, device=device, dtype=torch.float32)
    if not use_triton(probe):  # (callers with r > MAX_KERNEL_RANK use the PyTorch mask: pass device="cpu" there)
        return _torch_keep_mask(seed, n, k, p, torch.device(device))
    out = torch.empty((n, k), device=device, dtype=torch.uint8)
    if n and k:
        grid = (triton.cdiv(n, 32), triton.cdiv(k, 32))
        _dropout_mask_kernel[grid](out, n, k, out.stride(0), out.stride(1), seed, _dropout_threshold(p),
                                   BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def _shrink_meta(block_r: int):
    """(BLOCK_M, BLOCK_K, num_warps) of the shrink kernel on a GPU: the whole of r in one tile, x read once."""
    if block_r <= 64:
        return 64, 64, 4
    return (64, 64, 8) if block_r <= 128 else (64, 32, 8)  # BLOCK_M ≥ 64 keeps wgmma (sm_90 report)


def _shrink(x2d: torch.Tensor, a: torch.Tensor, seed: int, p: float, out_scale: float) -> torch.Tensor:
    """t = out_scale · dropout_p(x2d) aᵀ (mask only, no 1/(1-p): fold that into out_scale), a: [R, K] any strides."""
    m, k = x2d.shape
    r = a.shape[0]
    t = _empty((m, r), x2d.device, x2d.dtype)
    if m == 0:
        return t
    block_r = max(16, triton.next_power_of_2(r))
    if interpreter_enabled():
        meta = dict(BLOCK_M=32, BLOCK_K=32)
    else:
        block_m, block_k, warps = _shrink_meta(block_r)
        meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=3)
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    _lora_shrink_kernel[grid](
        x2d, a, t, m, k, r,
        x2d.stride(0), x2d.stride(1), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        seed, _dropout_threshold(p), out_scale,
        HAS_DROPOUT=p > 0.0, UPCAST=_upcast(x2d.dtype), INPUT_PRECISION=_input_precision(x2d.dtype),
        BLOCK_R=block_r, **meta,
    )
    return t


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
    # 16-bit only: IEEE fp32 runs on the FMA units, where the transposed TMA tile spilled 264 B (aot report).
    if (os.environ.get("LORA_KERNELS_TMA", "1") == "0" or a2d.dtype not in (torch.float16, torch.bfloat16)
            or not _tma_aligned(a2d, w, c)):
        return False
    if interpreter_enabled():
        return True
    if torch.cuda.get_device_capability(a2d.device)[0] < 9:
        return False
    _ensure_tma_allocator()
    return True


def _grid_size(m: int, n: int, meta: dict, device: torch.device) -> int:
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    if not meta["PERSISTENT"]:
        return tiles
    return min(tiles, _INTERPRET_PROGRAMS if interpreter_enabled() else _sm_count(device))


def _gemm_launch(a2d, w, w_nk, bias, t, l, l_strides, c, seed, p, epi_dropout, base_in_c):
    """Launches ``_lora_gemm_kernel`` into c [M, N].  base_in_c: c already holds a2d @ w (+ bias)."""
    m, k = a2d.shape
    n = c.shape[1]
    r = t.shape[1]
    w_strides = (w.stride(1), w.stride(0)) if w_nk else (w.stride(0), w.stride(1))
    has_bias = bias is not None and not base_in_c
    if has_bias:
        bias = bias.contiguous()  # the kernel reads it with unit stride
    args = (
        a2d, w, bias if has_bias else a2d, t, l, c,
        m, n, k, r,
        a2d.stride(0), a2d.stride(1), w_strides[0], w_strides[1], t.stride(0), t.stride(1),
        l_strides[0], l_strides[1], c.stride(0), c.stride(1),
        seed, _dropout_threshold(p), min(triton.next_power_of_2(m), 16384) // 64,
    )
    flags = dict(HAS_BIAS=has_bias, HAS_LORA=r > 0, EPI_DROPOUT=epi_dropout and p > 0.0, BASE_IN_C=base_in_c,
                 UPCAST=_upcast(a2d.dtype), INPUT_PRECISION=_input_precision(a2d.dtype), BLOCK_R=_block_r(r),
                 USE_TMA=not base_in_c and _use_tma(a2d, w, c), W_NK=w_nk)
    if _autotune_enabled() and not base_in_c:
        grid = lambda meta: (_grid_size(m, n, meta, a2d.device),)  # noqa: E731
        _lora_gemm_kernel_tuned[grid](*args, **flags)
    else:
        if interpreter_enabled():
            meta = _PINNED_INTERPRET
        else:
            meta = _PINNED_SPLIT_GPU if base_in_c else _pinned_gpu(a2d.dtype)
        _lora_gemm_kernel[(_grid_size(m, n, meta, a2d.device),)](*args, **flags, **meta)
    return c


def _gemm_fused(a2d, w, w_nk, bias, t, l, l_strides, n, seed, p, epi_dropout):
    c = _empty((a2d.shape[0], n), a2d.device, a2d.dtype)
    return _gemm_launch(a2d, w, w_nk, bias, t, l, l_strides, c, seed, p, epi_dropout, False)


def _gemm_split(a2d, w, w_nk, bias, t, l, l_strides, n, seed, p, epi_dropout):
    """The base product by cuBLAS (addmm, bias included), then the LoRA term added in place by our kernel."""
    c = torch.nn.functional.linear(a2d, w, bias) if w_nk else a2d @ w
    return _gemm_launch(a2d, w, w_nk, bias, t, l, l_strides, c, seed, p, epi_dropout, True)


# ----------------------------------------------------------------------------------------------------------
# GEMM arrangement: fused (one kernel) or split (cuBLAS + in-place LoRA pass), measured per shape bucket
# ----------------------------------------------------------------------------------------------------------

ARRANGEMENTS = ("fused", "split")
_ARRANGEMENT_ENV = "LORA_KERNELS_GEMM"
_forced_arrangement: Optional[str] = None
_measured: Dict[tuple, dict] = {}


def _arrangement_setting() -> str:
    if _forced_arrangement is not None:
        return _forced_arrangement
    value = os.environ.get(_ARRANGEMENT_ENV, "auto")
    if value not in ARRANGEMENTS + ("auto",):
        raise ValueError(f"{_ARRANGEMENT_ENV} must be 'auto', 'fused' or 'split', got {value!r}")
    return value


@contextlib.contextmanager
def gemm_arrangement(name: str):
    """Force the GEMM arrangement inside a ``with`` block: "fused" (our kernel does the base GEMM and the LoRA
    term), "split" (cuBLAS does the base GEMM, our kernel adds the LoRA term in place) or "auto" (the default:
    measured once per shape bucket on CUDA, fused elsewhere).  The environment variable LORA_KERNELS_GEMM sets
    the same thing process-wide.

    The setting is process-wide (not per thread) and is read when each GEMM launches: wrap the backward pass too
    (``loss.backward()`` inside the block) to force it there.  Under ``torch.compile`` set the environment variable
    instead.  The two arrangements round differently (split rounds the base product to the output dtype before
    adding the LoRA term), so for bit-reproducible runs across processes pin one of them."""
    global _forced_arrangement
    if name not in ARRANGEMENTS + ("auto",):
        raise ValueError(f"gemm_arrangement name must be 'auto', 'fused' or 'split', got {name!r}")
    previous, _forced_arrangement = _forced_arrangement, name
    try:
        yield
    finally:
        _forced_arrangement = previous


def gemm_arrangement_report() -> Dict[tuple, dict]:
    """What "auto" measured: {(pass, device, dtype, M bucket, N, K, r, bias, dropout, tma, input precision,
    autotune): {"choice", "fused_ms", "split_ms"}} for every GEMM shape met so far in this process."""
    return {k: dict(v) for k, v in _measured.items()}


def _time_ms(fn) -> float:
    import triton.testing

    # do_bench runs fn once before its estimate, so compilation and autotuning stay outside the measurement.
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _choose(key: tuple, candidates: Dict[str, object]) -> str:
    """The faster arrangement for ``key``, timed once per process (do_bench medians, as the autotuner does)."""
    hit = _measured.get(key)
    if hit is not None:
        return hit["choice"]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "fused"  # no timing inside a CUDA graph capture; not cached, so a later eager call measures
    try:
        times = {name: _time_ms(fn) for name, fn in candidates.items()}
    except torch.cuda.OutOfMemoryError:
        # Timing needs extra outputs and do_bench's 256 MB L2-flush buffer; a run near full memory must not fail
        # for that: keep the fused arrangement for this key (no extra memory) and record why.
        torch.cuda.empty_cache()
        _measured[key] = dict(choice="fused", fused_ms=float("nan"), split_ms=float("nan"), note="out of memory")
        return "fused"
    choice = min(times, key=times.get)
    _measured[key] = dict(choice=choice, **{f"{name}_ms": ms for name, ms in times.items()})
    return choice


def _gemm(a2d, w, w_nk, bias, t, l, l_strides, n, seed, p, epi_dropout):
    """c[M, n] = a2d @ w (+ bias) + keep ⊙ (t @ l); keep only if epi_dropout.

    w is W itself: read as Wᵀ ([K, N] view of an [N, K] tensor) when w_nk (forward), as W ([K, N]) otherwise.
    l is given as (tensor, strides of its [R, N] view).  The arrangement (fused / split) follows
    ``_arrangement_setting``; "auto" measures both on first use of each shape bucket on CUDA.
    """
    m = a2d.shape[0]
    if m == 0 or n == 0:
        return _empty((m, n), a2d.device, a2d.dtype)
    call = (a2d, w, w_nk, bias, t, l, l_strides, n, seed, p, epi_dropout)
    setting = _arrangement_setting()
    if setting == "auto":
        if interpreter_enabled() or not a2d.is_cuda:
            setting = "fused"
        else:
            key = ("fwd" if w_nk else "dgrad", a2d.device.index, str(a2d.dtype).replace("torch.", ""),
                   min(triton.next_power_of_2(m), 16384), n, a2d.shape[1], t.shape[1], bias is not None,
                   epi_dropout and p > 0.0, (n * a2d.element_size()) % 16 == 0 and _use_tma(a2d, w, a2d),
                   _input_precision(a2d.dtype), _autotune_enabled())
            setting = _choose(key, {"fused": lambda: _gemm_fused(*call), "split": lambda: _gemm_split(*call)})
    return _gemm_fused(*call) if setting == "fused" else _gemm_split(*call)


def _wgrad_meta(pdim: int, q: int, dropout: bool, dtype: torch.dtype):
    """(BLOCK_P, BLOCK_Q, BLOCK_M, num_warps) of the token reduction on a GPU."""
    bp = 64 if pdim > 32 else max(16, triton.next_power_of_2(pdim))
    bq = 64 if q > 32 else max(16, triton.next_power_of_2(q))
    bm = 32 if dtype == torch.float32 else 64
    # A 64×64 fp32 accumulator plus in-kernel Philox spilled 216 B at 4 warps (sm_90 report): 8 warps there.
    return bp, bq, bm, (8 if bp * bq >= 64 * 64 else 4)


def _wgrad(left: torch.Tensor, right: torch.Tensor, seed: int, p: float, splits: Optional[int] = None):
    """Σ_m (keep ⊙ left)ᵀ[:, m] right[m, :] in fp32, shape [P, Q]; keep only when p > 0 (left is then x)."""
    m, pdim = left.shape
    q = right.shape[1]
    if m == 0:
        return torch.zeros((pdim, q), device=left.device, dtype=torch.float32)
    if interpreter_enabled():
        bp, bq, bm, meta = 32, 32, 32, {}
    else:
        bp, bq, bm, warps = _wgrad_meta(pdim, q, p > 0.0, left.dtype)
        meta = dict(num_warps=warps, num_stages=3)
    tiles = triton.cdiv(pdim, bp) * triton.cdiv(q, bq)
    if splits is None:
        target = 4 if interpreter_enabled() else 4 * _sm_count(left.device)
        splits = max(1, min(triton.cdiv(target, tiles), triton.cdiv(m, 4 * bm)))
    m_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, m_per_split)
    partial = _empty((splits, pdim, q), left.device, torch.float32)
    grid = (triton.cdiv(pdim, bp), triton.cdiv(q, bq), splits)
    _lora_wgrad_kernel[grid](
        left, right, partial, m, pdim, q, m_per_split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        seed, _dropout_threshold(p),
        HAS_DROPOUT=p > 0.0, UPCAST=_upcast(left.dtype), INPUT_PRECISION=_input_precision(left.dtype),
        BLOCK_P=bp, BLOCK_Q=bq, BLOCK_M=bm, **meta,
    )
    return partial[0] if splits == 1 else partial.sum(0)


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# ----------------------------------------------------------------------------------------------------------
# Pure-PyTorch path (CPU without the interpreter, float64, machines without Triton)
# ----------------------------------------------------------------------------------------------------------

def _torch_keep_mask(seed: int, n: int, k: int, p: float, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand((n, k), generator=gen, device=device) >= p


def _torch_masked(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """m ⊙ x (no 1/(1-p): callers fold it into their scale, as the kernels do)."""
    if p == 0.0:
        return x2d
    keep = _torch_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return x2d * keep.to(x2d.dtype)


# ----------------------------------------------------------------------------------------------------------
# Forward / backward entry points (backend dispatch)
# ----------------------------------------------------------------------------------------------------------

MAX_KERNEL_RANK = 256  # the shrink kernel holds all of r in one tile; larger ranks take the PyTorch path


def _kernels_for(x: torch.Tensor, r: int) -> bool:
    return r <= MAX_KERNEL_RANK and use_triton(x)


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' device (e.g. device_map="auto")."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def lora_fwd(x2d, weight, bias, lora_A, lora_B, scale: float, dropout_p: float, seed: int):
    """Returns (y2d [N, out], t [N, r]) with t = s · dropout(x) Aᵀ (scale folded in).  x2d: [N, in], any strides."""
    with _on_device(x2d):
        return _lora_fwd_impl(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def _lora_fwd_impl(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    if _kernels_for(x2d, lora_A.shape[0]):
        t = _shrink(x2d, lora_A, seed, dropout_p, scale / (1.0 - dropout_p))
        y = _gemm(x2d, weight, True, bias, t,
                  lora_B, (lora_B.stride(1), lora_B.stride(0)), weight.shape[0], seed, 0.0, False)
        return y, t
    t = (_torch_masked(x2d, seed, dropout_p) @ lora_A.t()).mul_(scale / (1.0 - dropout_p))
    y = torch.nn.functional.linear(x2d, weight, bias)
    return y.addmm_(t, lora_B.t()), t


def lora_bwd(g2d, x2d, t, weight, lora_A, lora_B, scale: float, dropout_p: float, seed: int,
             need_dx: bool, need_dA: bool, need_dB: bool, n_in: int):
    """Returns (dx2d, dA, dB); entries not asked for are None.  x2d is needed only for dA, t only for dB."""
    with _on_device(g2d):
        return _lora_bwd_impl(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB,
                              n_in)


def _lora_bwd_impl(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB, n_in):
    dx = d_a = d_b = None
    gscale = scale / (1.0 - dropout_p)  # gB' = s/(1-p) · g B serves both dX and dA
    if _kernels_for(g2d, lora_A.shape[0]):
        gb = _shrink(g2d, lora_B.t(), 0, 0.0, gscale) if (need_dx or need_dA) else None
        if need_dx:
            dx = _gemm(g2d, weight, False, None, gb,
                       lora_A, (lora_A.stride(0), lora_A.stride(1)), n_in, seed, dropout_p, True)
        if need_dA:
            d_a = _wgrad(x2d, gb, seed, dropout_p).t().to(lora_A.dtype).contiguous()  # r×in, contiguous
        if need_dB:
            d_b = _wgrad(g2d, t, 0, 0.0).to(lora_B.dtype)
        return dx, d_a, d_b
    gb = (g2d @ lora_B).mul_(gscale) if (need_dx or need_dA) else None
    if need_dx:
        lora_dx = gb @ lora_A
        if dropout_p > 0.0:
            keep = _torch_keep_mask(seed, g2d.shape[0], n_in, dropout_p, g2d.device)
            lora_dx = lora_dx * keep.to(lora_dx.dtype)
        dx = (g2d @ weight).add_(lora_dx)
    if need_dA:
        d_a = gb.t() @ _torch_masked(x2d, seed, dropout_p)
    if need_dB:
        d_b = g2d.t() @ t
    return dx, d_a, d_b


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (what torch.compile sees) and the eager/compiled switch
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_fwd", mutates_args=())
def _lora_fwd_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y2d, t') of the fused forward; ``seed`` is a CPU int64 scalar tensor (no .item() on a traced path)."""
    return lora_fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, int(seed))


@_lora_fwd_op.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    n = x2d.shape[0]
    return x2d.new_empty((n, weight.shape[0])), x2d.new_empty((n, lora_A.shape[0]))


@torch.library.custom_op("lora_kernels::lora_bwd", mutates_args=())
def _lora_bwd_op(g2d: torch.Tensor, x2d: Optional[torch.Tensor], t: Optional[torch.Tensor], weight: torch.Tensor,
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor,
                 need_dx: bool, need_dA: bool, need_dB: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx2d, dA, dB); an output not asked for is an empty tensor (custom ops cannot return None)."""
    dx, d_a, d_b = lora_bwd(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, int(seed), need_dx, need_dA,
                            need_dB, weight.shape[1])
    return (dx if dx is not None else g2d.new_empty(0), d_a if d_a is not None else lora_A.new_empty(0),
            d_b if d_b is not None else lora_B.new_empty(0))


@_lora_bwd_op.register_fake
def _(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB):
    n, n_in = g2d.shape[0], weight.shape[1]
    return (g2d.new_empty((n, n_in) if need_dx else (0,)), lora_A.new_empty(lora_A.shape if need_dA else (0,)),
            lora_B.new_empty(lora_B.shape if need_dB else (0,)))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed_t):
    # Eager calls skip the dispatcher (tens of µs per op); torch.compile traces the custom op and its fake.
    if _compiling():
        return torch.ops.lora_kernels.lora_fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed_t)
    return lora_fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, int(seed_t))


def _bwd(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed_t, need_dx, need_da, need_db):
    if _compiling():
        dx, d_a, d_b = torch.ops.lora_kernels.lora_bwd(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p,
                                                      seed_t, need_dx, need_da, need_db)
        return (dx if need_dx else None, d_a if need_da else None, d_b if need_db else None)
    return lora_bwd(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, int(seed_t), need_dx, need_da, need_db,
                    weight.shape[1])


def _seed_tensor(seed) -> torch.Tensor:
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)  # torch's CPU generator; traceable, no .item()
    if isinstance(seed, torch.Tensor):
        return seed.to(device="cpu", dtype=torch.int64).reshape(())
    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**63):
        raise ValueError(f"seed must be a non-negative int below 2**63, got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# Autograd Function and functional API
# ----------------------------------------------------------------------------------------------------------

class LoRALinearFunction(torch.autograd.Function):
    r"""y = x Wᵀ + b + s · (m ⊙ x / (1-p)) Aᵀ Bᵀ, with t = (m ⊙ x / (1-p)) Aᵀ (N×r) and g = ∂L/∂y.

    Chain rule, writing x̃ = m ⊙ x / (1-p) (m the dropout keep mask, all-ones when p = 0):
      ∂L/∂t  = s · g B                         (N×r; computed as gB = g B, scaled later)
      ∂L/∂B  = s · gᵀ t                        (out×r)           -- needs t, never x
      ∂L/∂A  = (∂L/∂t)ᵀ x̃ = s · (gB)ᵀ x̃        (r×in)            -- needs x (mask regenerated from the seed)
      ∂L/∂x  = g W + m ⊙ ((∂L/∂t) A) / (1-p)  = g W + s/(1-p) · m ⊙ (gB A)
      ∂L/∂W  = gᵀ x,  ∂L/∂b = Σ_rows g        (only if the caller made W or b trainable)

    The kernels fold the scales into the N×r intermediates (t' = s·t, gB' = s/(1-p)·g B), so that the LoRA term
    shares the base GEMM's accumulator and dB = gᵀ t', dA = gB'ᵀ (m ⊙ x), dX = g W + m ⊙ (gB' A) need no
    further scaling.

    Saved for backward: B-only (A frozen) keeps t' and the seed (a CPU int64 scalar), never x; AB and A-only keep x itself (same
    storage, no copy) and the seed, plus t when B needs a gradient.  W, A, B are parameters, saved by
    reference.  The dropout mask is never stored: every kernel regenerates it from the seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        n_in = x.shape[-1]
        x2d = x.reshape(-1, n_in)
        y2d, t = _fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        keep_x = need_da or need_dw
        ctx.save_for_backward(x if keep_x else None, t if need_dbb else None, weight, lora_A, lora_B, seed)
        ctx.scale, ctx.dropout_p, ctx.n_in = scale, dropout_p, n_in
        ctx.x_shape = x.shape
        return y2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, t, weight, lora_A, lora_B, seed = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        g2d = grad_y.reshape(-1, weight.shape[0])
        x2d = x.reshape(-1, ctx.n_in) if x is not None else None
        dx, d_a, d_b = _bwd(g2d, x2d, t, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p, seed,
                            need_dx, need_da, need_dbb)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        d_w = (g2d.t() @ x2d).to(weight.dtype) if need_dw else None
        d_bias = g2d.sum(0) if need_db else None
        return dx, d_w, d_bias, d_a, d_b, None, None, None


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_args(x, weight, bias, lora_A, lora_B, scale, dropout_p):
    for name, ten in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(ten, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ten).__name__}")
        if ten.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {ten.dtype}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects {in_f}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must have shape (r, {in_f}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError("lora_A has rank r = 0; r must be ≥ 1")
    if lora_B.dim() != 2 or lora_B.shape != (out_f, r):
        raise ValueError(f"lora_B must have shape ({out_f}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)] + ([("bias", bias)] if bias is not None else [])
    for name, ten in named:
        if ten.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {ten.dtype} but x has {x.dtype}; all operands must share one dtype")
        if ten.device != x.device:
            raise ValueError(f"{name} is on {ten.device} but x is on {x.device}")
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python float, not a tensor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, *, seed=None):
    """y = x Wᵀ + b + scale · (dropout(x) lora_Aᵀ) lora_Bᵀ, differentiable in x, lora_A, lora_B (and W, b if
    they require grad).  Dropout (inverted, as nn.Dropout) acts on the LoRA branch only.

    ``seed`` (int or CPU int64 scalar tensor) fixes the dropout mask; by default it is drawn from torch's CPU
    generator, so ``torch.manual_seed`` reproduces runs and activation checkpointing regenerates the same mask.
    Under ``torch.compile`` the kernels are the custom ops ``torch.ops.lora_kernels.lora_fwd`` / ``lora_bwd``.  Triton kernels serve CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``); any
    other case runs the pure-PyTorch path with the same semantics.
    """
    _check_args(x, weight, bias, lora_A, lora_B, scale, dropout_p)
    scale, dropout_p = float(scale), float(dropout_p)
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        # Under autocast (e.g. HF Trainer bf16=True with fp32 parameters) run in the autocast dtype, as
        # nn.Linear would; the casts are differentiable, so fp32 parameters receive fp32 gradients.
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_A, lora_B = (v.to(dt) for v in (x, weight, lora_A, lora_B))
        bias = bias.to(dt) if bias is not None else None
    seed = _seed_tensor(seed if (seed is not None or dropout_p > 0.0) else 0)
    needs_grad = torch.is_grad_enabled() and any(
        ten is not None and ten.requires_grad for ten in (x, weight, bias, lora_A, lora_B))
    if needs_grad:
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    # Inference: no autograd node, no saved state.
    n_in = x.shape[-1]
    y2d, _ = _fwd(x.reshape(-1, n_in), weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, *, dropout_mask=None, upcast=False):
    """Pure-PyTorch reference of ``lora_linear``, built from plain differentiable ops.

    ``dropout_mask`` (bool, broadcastable to x; True = kept) replaces random dropout so a test can feed the
    kernels' own mask; without it, ``dropout_p > 0`` uses ``torch.nn.functional.dropout``.  ``upcast=True``
    computes in float64 and returns float64.
    """
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
