"""Tiles of the LoRA kernels: the fused GEMM's autotune candidates and their pruning, the pinned tiles used under the
interpreter and with autotuning off, and the fixed launch shapes of the shrink and token-reduction kernels.

Every spill and shared-memory figure quoted here is from the offline sm_90 compile report
(``bench/sm90_compile_report.py``, ``bench/results/sm90_compile_report.txt``).
"""

from __future__ import annotations

import torch
import triton

from lora_kernels._backend import interpreter_enabled
from lora_kernels.ops.lora_linear.kernels import _lora_gemm_kernel

# IEEE fp32 runs on the FMA units: small tiles only (the 16-bit ones spill or exceed shared memory there).
_FP32_TILES = {(64, 64, 32), (128, 64, 32), (64, 128, 32)}
# Persistent candidates (TMA only): the large tiles, where one program fills an SM's shared memory anyway.
_PERSISTENT_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
# Tiles whose pointer-load form spills on sm_90: used only with TMA.
_TMA_ONLY_TILES = {(128, 256), (256, 128), (64, 128)}
# The H100 SXM's SM count: the pruner's stand-in when no CUDA tensor is at hand (offline compilation).
_OFFLINE_SMS = 132


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


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the problem, and tiles that spill on sm_90 for this variant: pointer loads at the
    TMA-only tiles or at 128×128 with 4 warps; the masked dgrad (Philox in the epilogue) above 64 accumulator
    elements per thread.  Persistent tiles only with TMA, and only when there are more tiles than SMs (otherwise
    they are the same launch with a loop around it)."""
    def flag(name):
        return kwargs.get(name, named_args.get(name, False))

    m, n = named_args["M"], named_args["N"]
    use_tma, masked = flag("USE_TMA"), flag("EPI_DROPOUT")
    a = named_args.get("a_ptr")
    fp32 = getattr(a, "dtype", None) == torch.float32 and flag("INPUT_PRECISION") == "ieee"
    num_sms = sm_count(a.device) if getattr(a, "is_cuda", False) else _OFFLINE_SMS
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
# IEEE fp32 runs on the FMA units, not the tensor cores: the 16-bit tile above needs a 6.8 KB stack there, so fp32
# gets a smaller one.
_PINNED_GPU_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, **_ONE_TILE)
# The split arrangement's LoRA pass (BASE_IN_C: no main loop, memory-bound): 8 warps (4 spilled 128 B on sm_90),
# the masked-epilogue budget.  BLOCK_K is unused there.
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
    # A 64×64 fp32 accumulator plus in-kernel Philox spilled 216 B at 4 warps (sm_90 report): 8 warps there.
    return bp, bq, bm, (8 if bp * bq >= 64 * 64 else 4)


def wgrad_meta(pdim: int, q: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the token reduction for a [P, Q] result; ``dtype``: the product's (fp32 when a 16-bit
    left operand meets fp32 t' or gB': the fp32 tile, whose mixed variants compile without spill on sm_90)."""
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
