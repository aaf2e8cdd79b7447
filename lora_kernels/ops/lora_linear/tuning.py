"""Tiles of the LoRA kernels: the fused GEMM's autotune candidates and their pruning, the pinned tiles used under the
interpreter and with autotuning off, and the fixed launch shapes of the shrink and token-reduction kernels.

Every register, spill and shared-memory figure quoted here is from the offline sm_90 compile report
(``bench/sm90_compile_report.py``, ``bench/results/sm90_compile_report.txt``), which compiles each variant through the
JIT's binder with the launchers' arguments: "7B" is LLaMA-7B's projections at 8192 tokens (every size and row stride
a multiple of 16, unit inner strides), "unaligned" a shape where none is (8191×4100→4098, r = 7).
"""

from __future__ import annotations

import torch
import triton

from lora_kernels._backend import interpreter_enabled
from lora_kernels.ops.lora_linear.kernels import _lora_gemm_kernel

# IEEE fp32 runs on the FMA units: small tiles only (the 16-bit ones spill there: 16-48 B at 128×128×64 at 7B).
# 64×128×32 is not offered: 24 B of spill at 7B, 72 B unaligned, where 64×64×32 has none.
_FP32_TILES = {(64, 64, 32), (128, 64, 32)}
# Persistent candidates (TMA only): the large tiles, where one program fills an SM's shared memory anyway.
_PERSISTENT_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
# Tiles whose pointer-load form spills on unaligned operands (the forward 488-1688 B unaligned; none at 7B, where the
# loads vectorise and pipeline): with pointer loads, only on aligned operands.
_TMA_ONLY_TILES = {(128, 256), (256, 128), (64, 128)}
# The H100 SXM's SM count: the pruner's stand-in when no CUDA tensor is at hand (offline compilation).
_OFFLINE_SMS = 132
# sm_90's shared memory per block (opt-in maximum, what Triton checks at launch): the pruner's limit when no CUDA
# tensor is at hand.
SM90_SHARED_BYTES = 232448


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


def gemm_shared_bytes(bm: int, bn: int, bk: int, stages: int, elem: int, block_r: int = 0, lora_elem: int = 0,
                      lora_tf32: bool = False, tma: bool = False, persistent: bool = False) -> int:
    """Shared memory of one fused-GEMM program, from the tile arithmetic (sm_90 report, triton 3.6): the larger of

    * the main loop's pipeline: ``stages`` buffers of the a and w tiles (BLOCK_M·BLOCK_K + BLOCK_K·BLOCK_N elements of
      a's dtype) and, with TMA, an 8-byte barrier per stage -- exact on the tensor-core paths with aligned operands;
      IEEE fp32 (FMA units) holds one buffer fewer and unaligned pointer loads a single one, so it bounds those;
    * the LoRA K-loop's (it runs before or after the main loop and reuses its space): ``stages`` buffers of the t and
      l tiles (BLOCK_M·BLOCK_R + BLOCK_R·BLOCK_N elements of t's dtype); when the loop rounds its operands to tf32
      (fp32 adapters on a 16-bit base, fp32 with TF32 allowed) one buffer fewer plus one rounded l tile.  It is the
      larger one at BLOCK_R = 64 with fp32 t': 229,376 B at 128×128×64 / 4 stages against the main loop's 131,104 B;

    plus, for the persistent form, the TMA store's staging tile (BLOCK_M·BLOCK_N of the output, a's dtype) and 1 KiB
    (992-1000 B more were measured with a 64-wide LoRA step).  tests/ops/test_compile_sm90.py checks it against
    every fused-GEMM variant of the report: never below, within 1 KiB where exact."""
    main = stages * (bm * bk + bk * bn) * elem + (8 * stages if tma else 0)
    lora = 0
    if block_r and lora_elem:
        tile = (bm * block_r + block_r * bn) * lora_elem
        lora = (stages - 1) * tile + block_r * bn * lora_elem if lora_tf32 else stages * tile
    return max(main, lora) + (bm * bn * elem + 1024 if persistent else 0)


_SHARED_LIMIT = {}


def shared_memory_limit(device) -> int:
    """Shared memory one program may use on ``device`` (the opt-in maximum); sm_90's without a CUDA device."""
    if device is None or getattr(device, "type", None) != "cuda":
        return SM90_SHARED_BYTES
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SHARED_LIMIT:
        props = torch.cuda.get_device_properties(idx)
        _SHARED_LIMIT[idx] = int(getattr(props, "shared_memory_per_block_optin", 0) or SM90_SHARED_BYTES)
    return _SHARED_LIMIT[idx]


def _aligned_operands(named_args) -> bool:
    """Whether the pointer-load main loop's operands are laid out as the sm_90 report's aligned rows: unit inner
    strides, K, N and the row strides multiples of 16 (the JIT marks them divisible), 16-byte aligned bases -- the
    loads then vectorise and pipeline through shared memory.  False when an argument is missing."""
    g = named_args.get
    try:
        inner = g("stride_ak") == 1 and g("stride_cn") == 1 and 1 in (g("stride_wk"), g("stride_wn"))
        rows = (g("K"), g("N"), g("stride_am"), g("stride_cm"), max(g("stride_wk"), g("stride_wn")))
        bases = (g("a_ptr"), g("w_ptr"), g("c_ptr"))
        return bool(inner and all(v % 16 == 0 for v in rows) and all(b.data_ptr() % 16 == 0 for b in bases))
    except (TypeError, AttributeError):
        return False


def _prune_gemm_configs(configs, named_args, **kwargs):
    """The candidates worth compiling and timing for one launch.  Dropped:

    * tiles larger than the problem;
    * tiles whose shared memory (``gemm_shared_bytes``) exceeds the device's (232,448 B on sm_90): they would fail
      at launch, after a compile (fp32 with TF32 at 128×128×64 / 4 stages needs 262,144 B; fp32 adapters at r ≥ 64
      need 262,144-327,680 B at 128×256 and in the persistent forms);
    * with pointer loads on unaligned operands (``_aligned_operands``: the loads neither vectorise nor pipeline),
      the tiles that spill there: the TMA-only tiles and 4-warp tiles above 64×64 (sm_90 report, unaligned: the
      forward spills 464-1688 B, fp32's 128×64 80-104 B; the 128×128 / 8-warp tile kept spills 0-144 B);
    * more than 64 accumulator elements per thread with the masked dgrad (Philox in the epilogue: 144-192 B of spill
      with TMA, 136-408 B with pointer loads) or with a 64-wide tf32 LoRA K-loop over fp32 t' and l (fp32 adapters
      at r ≥ 64: 136-432 B);
    * persistent tiles without TMA, or with no more tiles than SMs (otherwise the same launch with a loop around it).
    """
    def flag(name):
        return kwargs.get(name, named_args.get(name, False))

    m, n = named_args["M"], named_args["N"]
    use_tma, masked = flag("USE_TMA"), flag("EPI_DROPOUT")
    a = named_args.get("a_ptr")
    t = named_args.get("t_ptr")
    fp32 = getattr(a, "dtype", None) == torch.float32 and flag("INPUT_PRECISION") == "ieee"
    cuda = getattr(a, "is_cuda", False)
    num_sms = sm_count(a.device) if cuda else _OFFLINE_SMS
    smem_limit = shared_memory_limit(a.device if cuda else None)
    elem = a.element_size() if hasattr(a, "element_size") else 2
    block_r = flag("BLOCK_R") if flag("HAS_LORA") else 0
    lora_elem = t.element_size() if hasattr(t, "element_size") else elem
    lora_tf32 = flag("LORA_PRECISION") == "tf32"
    wide_fp32_lora = lora_tf32 and lora_elem == 4 and block_r >= 64
    aligned = use_tma or _aligned_operands(named_args)
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if fp32 != ((bm, bn, bk) in _FP32_TILES and c.num_warps == 4 and c.num_stages == 3):
            continue
        per_thread = bm * bn // (32 * c.num_warps)
        if bm > max(64, triton.next_power_of_2(m)) or bn > max(64, triton.next_power_of_2(n)):
            continue
        if gemm_shared_bytes(bm, bn, bk, c.num_stages, elem, block_r, lora_elem, lora_tf32, use_tma,
                             c.kwargs["PERSISTENT"]) > smem_limit:
            continue
        if not aligned and ((bm, bn) in _TMA_ONLY_TILES or (c.num_warps == 4 and bm * bn > 64 * 64)):
            continue
        if c.kwargs["PERSISTENT"] and (not use_tma or triton.cdiv(m, bm) * triton.cdiv(n, bn) <= num_sms):
            continue
        if (masked or wide_fp32_lora) and per_thread > 64:
            continue
        keep.append(c)
    return keep or [c for c in configs if not c.kwargs["PERSISTENT"]][-1:]


# Triton adds every tensor argument's dtype to the key, so fp32 adapters (fp32 t', l) tune apart from 16-bit ones.
GEMM_TUNE_KEY = ["M_BUCKET", "N", "K", "R", "HAS_LORA", "EPI_DROPOUT", "HAS_BIAS", "BASE_IN_C", "USE_TMA", "W_NK",
                 "INPUT_PRECISION", "LORA_PRECISION"]
_lora_gemm_kernel_tuned = triton.autotune(configs=get_gemm_configs(), key=GEMM_TUNE_KEY,
                                          prune_configs_by={"early_config_prune": _prune_gemm_configs})(_lora_gemm_kernel)

# Pinned tiles: used under the interpreter (small, so odd test shapes cross several tiles) and on the GPU
# when autotuning is switched off (LORA_KERNELS_AUTOTUNE=0).
_ONE_TILE = dict(PERSISTENT=False)
_PINNED_INTERPRET = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, **_ONE_TILE)
_PINNED_GPU = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, **_ONE_TILE)
# IEEE fp32 runs on the FMA units, not the tensor cores: the 16-bit tile above spills 16-48 B there (7B shapes), so
# fp32 gets a smaller one (no spill at 7B or unaligned).
_PINNED_GPU_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, **_ONE_TILE)
# The split arrangement's LoRA pass (BASE_IN_C: no main loop, memory-bound): 8 warps, the masked-epilogue budget --
# no spill in 16-bit at any shape, 32 B in fp32 unaligned; 4 warps spill 64 B in 16-bit and 392 B in fp32 on
# unaligned shapes (none at 7B).  BLOCK_K is unused there.
_PINNED_SPLIT_GPU = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2, **_ONE_TILE)
# Persistent grid under the interpreter: fewer programs than tiles, so each walks several, unevenly.
_INTERPRET_PROGRAMS = 3


def pinned_gemm_meta(dtype: torch.dtype, base_in_c: bool) -> dict:
    """The one GEMM tile used when the autotuner is not (interpreter, autotuning off, the split pass)."""
    if interpreter_enabled():
        return _PINNED_INTERPRET
    if base_in_c:
        return _PINNED_SPLIT_GPU
    return _PINNED_GPU_FP32 if dtype == torch.float32 else _PINNED_GPU


def block_r(r: int) -> int:
    """The LoRA K-loop's step over r: tl.dot needs every block dim ≥ 16 on the GPU; at most 64 per step."""
    return max(16, min(64, triton.next_power_of_2(r)))


def _shrink_meta(block_r: int):
    """(BLOCK_M, BLOCK_K, num_warps) of the shrink kernel on a GPU: the whole of r in one tile, x read once."""
    if block_r <= 64:
        return 64, 64, 4
    return (64, 64, 8) if block_r <= 128 else (64, 32, 8)  # BLOCK_M ≥ 64 keeps wgmma (sm_90 report)


def shrink_meta(r: int) -> dict:
    """Launch parameters of the shrink kernel for rank r (BLOCK_R ≥ r: one program reads its rows of x once)."""
    br = max(16, triton.next_power_of_2(r))
    if interpreter_enabled():
        return dict(BLOCK_M=32, BLOCK_K=32, BLOCK_R=br)
    bm, bk, warps = _shrink_meta(br)
    return dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=warps, num_stages=3)


def _wgrad_meta(pdim: int, q: int, dtype: torch.dtype):
    """(BLOCK_P, BLOCK_Q, BLOCK_M, num_warps) of the token reduction on a GPU."""
    bp = 64 if pdim > 32 else max(16, triton.next_power_of_2(pdim))
    bq = 64 if q > 32 else max(16, triton.next_power_of_2(q))
    bm = 32 if dtype == torch.float32 else 64
    # A 64×64 fp32 accumulator plus in-kernel Philox spills 8 B at 4 warps (fp32, 7B, r = 64; 216 B in the first
    # sm_90 report, all integers as i32) and none at 8 warps: 8 warps there.
    return bp, bq, bm, (8 if bp * bq >= 64 * 64 else 4)


def wgrad_meta(pdim: int, q: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the token reduction for a [P, Q] result; ``dtype``: the product's (fp32 when a 16-bit
    left operand meets fp32 t' or gB': the fp32 tile, whose mixed variants compile without spill on sm_90 at 7B
    shapes, 24 B at most unaligned)."""
    if interpreter_enabled():
        return dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_M=32)
    bp, bq, bm, warps = _wgrad_meta(pdim, q, dtype)
    return dict(BLOCK_P=bp, BLOCK_Q=bq, BLOCK_M=bm, num_warps=warps, num_stages=3)


_SM_COUNT = {}


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def wgrad_splits(m: int, tiles: int, block_m: int, device: torch.device) -> int:
    """How many programs share the token reduction of one output tile: enough for ~4 programs per SM."""
    target = 4 if interpreter_enabled() else 4 * sm_count(device)
    return max(1, min(triton.cdiv(target, tiles), triton.cdiv(m, 4 * block_m)))


def grid_size(m: int, n: int, meta: dict, device: torch.device) -> int:
    """Programs of the GEMM grid: one per tile, or at most one per SM (persistent)."""
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    if not meta["PERSISTENT"]:
        return tiles
    return min(tiles, _INTERPRET_PROGRAMS if interpreter_enabled() else sm_count(device))
