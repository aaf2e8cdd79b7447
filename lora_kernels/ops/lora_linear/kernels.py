"""Triton kernels of the fused LoRA linear layer ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``.  Triton only: the
launchers that size, allocate and call these are in ``launch.py``, their tiles in ``tuning.py``.

Algorithm
---------
Forward, two launches:
  1. ``_lora_shrink_kernel``: t' = s/(1-p) · (m ⊙ x) Aᵀ, an N×r intermediate computed once per row block (not once
     per output tile).  The dropout mask m is drawn inside the kernel; no dropped copy of x exists.
  2. ``_lora_gemm_kernel``: y = x Wᵀ (+ b) + t' Bᵀ.  The LoRA term is a second, short K-loop of the same
     accumulator over r, so there is no separate full-size add pass and y is written once.
Backward (each output computed only when its input needs a gradient):
  3. gB' = s/(1-p) · g B (N×r) with the shrink kernel (no dropout).
  4. dX = g W + m ⊙ (gB' A) with the same GEMM kernel: the LoRA term again in the accumulator, the mask
     regenerated from the seed at output coordinates (row, col) of the N×in result (``EPI_DROPOUT``).
  5. dAᵀ = (m ⊙ x)ᵀ gB' and dB = gᵀ t' with ``_lora_wgrad_kernel``: a reduction over the N tokens, split across
     programs (fp32 partial sums, reduced by one ``sum``) so that a handful of r×in tiles still fills the GPU.

Dropout
-------
The keep decision for element (i, k) of the logical N×in input comes from Philox keyed by the seed, with the int64
linear index fed as two 32-bit counter words (so it works past 2³¹ elements with no 64-bit multiplies), one call
per 8 adjacent columns (16 bits per keep decision).  Forward, dX and dA call ``_dropout_keep`` with the same seed, so
they see the same mask;
nothing mask-sized is stored: backward keeps the seed, a CPU int64 scalar tensor.

Trade-offs taken (docs/design.md has the evidence and the predictions still to measure on a GPU)
-------------------------------------------------------------------------------------------------
* The base GEMM is a tiled ``tl.dot`` loop in grouped (L2-friendly) tile order, TMA-fed for aligned 16-bit shapes,
  with one-tile-per-program and persistent (one program per SM) grids.
* ``BASE_IN_C``: the base product is already in the output (cuBLAS wrote it, or a base-weight type computed it)
  and the kernel adds the LoRA term in place -- the "split" arrangement (``arrangement.py``).
* t' is stored in the input dtype, like PEFT's ``lora_B(lora_A(dropout(x)))``: it is what the LoRA K-loop and the
  dB reduction consume directly on the tensor cores.
* fp32 lora_A / lora_B on a 16-bit x, W, y (PEFT's default ``autocast_adapter_dtype``, docs/design.md decision 14):
  the LoRA branch stays in fp32 as in PEFT.  The shrink and the token reductions read the 16-bit operand, upcast it
  (exact) and run fp32 products (IEEE unless TF32 is allowed), so t', gB', dA and dB are fp32; the GEMM keeps its
  16-bit main loop and runs the LoRA K-loop over fp32 t' and l in tf32 with operands rounded to nearest
  (``_round_tf32``), into the same fp32 accumulator; y and dX are written in the 16-bit dtype.
"""

import triton
import triton.language as tl

# The run-time scalars that must not pick a compiled kernel.  Triton specialises an integer argument on its value
# (1 becomes a constant, a multiple of 16 is marked divisible, < 2³¹ is i32 and i64 above): a dropout seed
# (0..2⁶²) and threshold (⌊p·2¹⁶⌋) would then recompile every kernel for about one seed in 16 and give small seeds
# an i32 signature.  So they are ``do_not_specialize`` with a fixed type in the signature (``seed: tl.int64``,
# ``threshold: tl.uint32``), as is the GEMM's ``M_BUCKET`` (an autotune key only, never read):
# tests/ops/test_specialization.py checks one compiled kernel per kernel for any seed, threshold and bucket.
_SEED_ARGS = ("seed", "threshold")


@triton.jit
def _dropout_keep(seed, rows, col_start, ROW_LEN, threshold, BLOCK_C: tl.constexpr):
    """Keep mask [len(rows), BLOCK_C] for columns col_start + [0, BLOCK_C) of a matrix with ROW_LEN columns.

    One Philox call per 8 adjacent columns, 16 bits of its 128-bit output per element: element (i, k) uses counter
    i·⌈ROW_LEN/8⌉ + ⌊k/8⌋ and, for lane l = k mod 8, bits 16·(l mod 2) .. +15 of output r_(l // 2) -- the lanes in
    the order lo(r0), hi(r0), lo(r1), hi(r1), ..., hi(r3).  col_start must be a multiple of 8 (every tile width is
    ≥ 16).  rows: int64 vector.  threshold: ⌊p·2¹⁶⌋ (< 2¹⁶), so P(keep) = 1 - threshold / 2¹⁶: p is resolved to
    2⁻¹⁶.  Half the Philox calls of one 32-bit draw per element (Philox is ~85 SASS instructions per call, and the
    mask is drawn three times per step: shrink, masked dgrad, dA).
    """
    cols8 = col_start // 8 + tl.arange(0, BLOCK_C // 8).to(tl.int64)
    offs = rows[:, None] * ((ROW_LEN + 7) // 8) + cols8[None, :]
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offs >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # 16-bit halves compared in place (the low half shifted up, so both compare against threshold << 16 with no mask)
    t = threshold << 16
    lo0, lo1, lo2, lo3 = (r0 << 16) >= t, (r1 << 16) >= t, (r2 << 16) >= t, (r3 << 16) >= t
    hi0, hi1, hi2, hi3 = r0 >= t, r1 >= t, r2 >= t, r3 >= t
    # [BR, BC/8, 2, 2, 2] -> [BR, BC] in the order lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3 along each group of 8
    lows = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))
    highs = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
    return tl.reshape(tl.join(lows, highs), (rows.shape[0], BLOCK_C))


@triton.jit(do_not_specialize=_SEED_ARGS)
def _dropout_mask_kernel(
    out_ptr,  # [M, K] bool (uint8)
    M, K,
    stride_om, stride_ok,
    seed: tl.int64, threshold: tl.uint32,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Materialises the keep mask the other kernels use.  For tests and debugging only."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, rows, tl.program_id(1).to(tl.int64) * BLOCK_K, K, threshold.to(tl.uint32),
                         BLOCK_K)
    msk = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok, keep.to(tl.uint8), mask=msk)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _lora_shrink_kernel(
    x_ptr,  # [M, K]  input rows (x, or g for gB = g B)
    a_ptr,  # [R, K]  down-projection (lora_A, or Bᵀ as a strided view)
    t_ptr,  # [M, R]  output: dtype of x, or fp32 (fp32 adapters: x upcast, UPCAST)
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_tm, stride_tr,
    seed: tl.int64, threshold: tl.uint32, out_scale,
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
def _round_tf32(v):
    """fp32 → the nearest tf32 value (10 explicit mantissa bits, ties away from zero: ``cvt.rna.tf32.f32``), still
    an fp32 tensor.  The tensor cores would truncate the low 13 bits instead (a bias of half a tf32 ulp, ~2⁻¹²
    relative, on every operand); rounded operands pass through them exactly, and the interpreter's fp32 product of
    the same values is what the GPU computes up to summation order."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x1000) >> 13) << 13
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _masked_dot_loop(x_ptr, y_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_xk, stride_yk, stride_yn,
                     acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                     ROUND_TF32: tl.constexpr):
    """acc + x[rows, :K] @ y[:K, cols] with pointer loads, masked on every edge, BLOCK_K at a time.  Serves
    the LoRA K-loop over r (x = t, y = l) and the pointer-load main loop over K (x = a, y = w).  ROUND_TF32: fp32
    operands rounded to nearest tf32 before a tf32 dot (the LoRA loop of fp32 adapters on a 16-bit base)."""
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
        if ROUND_TF32:
            x = _round_tf32(x)
            y = _round_tf32(y)
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
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_UPCAST: tl.constexpr, LORA_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, W_NK: tl.constexpr,
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
                               stride_ln, acc, LORA_UPCAST, LORA_PRECISION, BLOCK_R,
                               LORA_PRECISION == "tf32")
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
                               stride_wn, acc, UPCAST, INPUT_PRECISION, BLOCK_K, False)
    if HAS_LORA and not EPI_DROPOUT:
        acc = _masked_dot_loop(t_ptr, l_ptr, rows, cols, row_ok, col_ok, R, stride_tm, stride_tr, stride_lr,
                               stride_ln, acc, LORA_UPCAST, LORA_PRECISION, BLOCK_R,
                               LORA_PRECISION == "tf32")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if USE_TMA:
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))
    else:
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=_SEED_ARGS + ("M_BUCKET",))
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
    seed: tl.int64, threshold: tl.uint32,
    M_BUCKET: tl.int32,  # autotune key only: a new token count in the same bucket does not retune
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    EPI_DROPOUT: tl.constexpr,
    BASE_IN_C: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    LORA_UPCAST: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_NK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """c = a @ w (+ bias) + keep ⊙ (t @ l), fp32 accumulation, BLOCK_M×BLOCK_N output tiles.

    The LoRA scale (and 1/(1-p)) is already folded into t by the shrink kernel, so the LoRA term shares the
    base GEMM's accumulator: no second BLOCK_M×BLOCK_N fp32 tile (that one cost a 64 B spill at 128×128 on sm_90).
    keep[m, n] is the dropout mask at (m, n) of the M×N output (EPI_DROPOUT, used by dgrad, where the output
    is N_tokens × in, the same index space as the forward's x).  With the mask, the short LoRA product is
    computed first and masked, so the Philox registers are dead before the main loop starts.

    USE_TMA: the main loop and the store go through tensor descriptors (the copy engine computes addresses
    and zero-fills out-of-bounds rows, so no masks): 168 registers and no spill at 128×256 on sm_90 (LLaMA-7B
    shapes), where pointer loads take 188 registers on the same aligned operands and spill 904 B on unaligned ones.
    Needs unit inner strides and 16-byte aligned rows (the launcher checks).  W_NK: w's memory is [N, K] with unit
    stride along K (forward: W itself), so its tile is loaded as [BLOCK_N, BLOCK_K] and transposed; otherwise it is
    [K, N] (dgrad).

    PERSISTENT: the grid is at most one program per SM and each program walks the tiles
    pid, pid + grid, ... (grouped order), so one tile's epilogue and TMA store overlap the next tile's
    loads, and the grid has no partial last wave.  (``tl.range(..., flatten=True)`` produced byte-identical
    PTX for sm_90 with triton 3.6, so it is not offered.)  Otherwise one tile per program.

    BASE_IN_C: c already holds a @ w (+ bias), computed outside (cuBLAS, or a base-weight type's own product); the
    kernel adds keep ⊙ (t @ l) in place.
    This is the "split" arrangement the launcher falls back to where cuBLAS measures faster than our GEMM.

    LORA_UPCAST / LORA_PRECISION: the LoRA K-loop's own dot flags (UPCAST / INPUT_PRECISION serve the main loop).
    Equal to the main loop's when t and l are in a's dtype; fp32 t and l in a 16-bit GEMM (fp32 adapters) take
    LORA_PRECISION="tf32": with it the loop rounds its fp32 operands to nearest tf32 (``_round_tf32``) rather than
    letting the tensor cores truncate them.
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
    # The tile body is called twice on purpose: wrapping the one-tile form in a one-trip loop (so that one call
    # serves both) changed its sm_90 code -- +32 KiB of shared memory for the TMA tiles, an 8 B spill in fp32 (first
    # sm_90 report, every integer argument compiled as i32).
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _gemm_tile(pid_m, pid_n, a_ptr, w_ptr, bias_ptr, t_ptr, l_ptr, c_ptr, a_desc, w_desc, c_desc,
                       M, N, K, R, stride_am, stride_ak, stride_wk, stride_wn, stride_tm, stride_tr,
                       stride_lr, stride_ln, stride_cm, stride_cn, seed, threshold,
                       HAS_BIAS, HAS_LORA, EPI_DROPOUT, BASE_IN_C, UPCAST, INPUT_PRECISION, LORA_UPCAST,
                       LORA_PRECISION, USE_TMA, W_NK,
                       BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _gemm_tile(pid_m, pid_n, a_ptr, w_ptr, bias_ptr, t_ptr, l_ptr, c_ptr, a_desc, w_desc, c_desc,
                   M, N, K, R, stride_am, stride_ak, stride_wk, stride_wn, stride_tm, stride_tr,
                   stride_lr, stride_ln, stride_cm, stride_cn, seed, threshold,
                   HAS_BIAS, HAS_LORA, EPI_DROPOUT, BASE_IN_C, UPCAST, INPUT_PRECISION, LORA_UPCAST,
                   LORA_PRECISION, USE_TMA, W_NK,
                   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _lora_wgrad_kernel(
    l_ptr,  # [M, P]  left rows (x for dAᵀ, g for dB)
    r_ptr,  # [M, Q]  right rows (gB' for dAᵀ, t' for dB)
    c_ptr,  # [S, P, Q] fp32 partial sums, one slice per split of M
    M, P, Q, M_PER_SPLIT,
    stride_lm, stride_lp,
    stride_rm, stride_rq,
    stride_cs, stride_cp, stride_cq,
    seed: tl.int64, threshold: tl.uint32,
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
