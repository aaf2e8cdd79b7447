"""Offline (no GPU) compilation of every kernel variant the launchers use, for a chosen NVIDIA target, with the
specialisation Triton's JIT gives it at run time.

Triton ships ptxas, cuobjdump and nvdisasm, so on any machine with Triton we can compile for Hopper (sm_90) and read
the resource report: registers per thread, stack bytes (spills), shared memory, and whether the matrix products
became wgmma (``HGMMA`` in SASS).  The CPU test suite runs this so a kernel that stops compiling for the GPU, or
starts spilling, fails CI even though CI has no GPU.  ``python bench/sm90_compile_report.py`` prints the table
(kept in bench/results/sm90_compile_report.txt); ``--json`` gives the rows the test suite checks.

What is compiled is what the JIT compiles: each variant carries the arguments a launcher passes at a given shape
(small CPU tensors stand for the pointers: the binder reads only their dtype and 16-byte alignment; the integers
are the launcher's own, the sizes and the strides it passes), and goes through the binder ``JITFunction.run`` uses
(``create_function_from_signature``), ``_pack_args`` and ``ASTSource`` -> ``triton.compile``, as ``_do_compile``
does.  So an integer argument equal to 1 (a unit stride, a single token) is a constant, one divisible by 16 is marked
so, and the seed and dropout threshold are the typed, unspecialised scalars the kernels declare.  The code depends on
the shape through that specialisation only, so each variant is compiled at one shape per specialisation: "7B" is
LLaMA-7B's projections at 8192 tokens (4096→4096, 4096→11008, 11008→4096: every size and row stride a multiple of
16, one specialisation, checked here), the others are the odd shapes of the test suite.  The test suite also records
the arguments the real launchers pass at these shapes and checks that they bind to the same specialisation as the
variants here (tests/ops/test_specialization.py).

A developer tool, not part of the installed package: it reads the launchers' tile choices and flags from
``lora_kernels.ops.lora_linear`` so that the report describes what the launchers launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout works too

from lora_kernels import settings  # noqa: E402
from lora_kernels._backend import interpreter_enabled  # noqa: E402
from lora_kernels.ops.lora_linear import kernels, launch, nf4_kernels, nf4_launch, tuning  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SEED = 0x2545F4914F6CDD1D >> 2  # a representative 62-bit seed: the kernels do not specialise on it
_P = 0.1
# The autotuner's tile parameters (a Config's kwargs and options): what differs between two candidates of one launch.
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT", "num_warps", "num_stages")


@dataclass(frozen=True)
class Shape:
    """A launch shape: ``sizes`` are (tokens, in_features, out_features) that bind to one specialisation (checked by
    ``check_shapes``); the first is the one compiled.  r: the LoRA rank."""
    tag: str
    sizes: Tuple[Tuple[int, int, int], ...]
    r: int

    @property
    def m(self) -> int:
        return self.sizes[0][0]

    @property
    def k_in(self) -> int:
        return self.sizes[0][1]

    @property
    def n_out(self) -> int:
        return self.sizes[0][2]

    def describe(self) -> str:
        return ", ".join(f"{m}×({i}→{o})" for m, i, o in self.sizes) + f", r = {self.r}"


_LLAMA_7B = ((8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096))
S7B = Shape("7B r16", _LLAMA_7B, 16)
S7B_R64 = Shape("7B r64", _LLAMA_7B, 64)
S7B_R256 = Shape("7B r256", _LLAMA_7B[:1], 256)
S_M1 = Shape("M=1", ((1, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096)), 16)
S_R7 = Shape("r7", _LLAMA_7B[:1], 7)
S_R100 = Shape("r100", _LLAMA_7B[:1], 100)
# Nothing aligned (no size or row stride a multiple of 16, rows not 16-byte aligned: pointer loads): the test suite's
# shapes, and a large one with the same specialisation for the autotune candidates (the small one prunes the tiles).
S_ODD = Shape("37x100>70 r7", ((37, 100, 70), (8191, 4100, 4098)), 7)
S_ODD_BIG = Shape("8191x4100>4098 r7", ((8191, 4100, 4098),), 7)
SHAPES = (S7B, S7B_R64, S7B_R256, S_M1, S_R7, S_R100, S_ODD, S_ODD_BIG)


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    dtype: str  # triton type name of the main operands: "bf16", "fp16", "fp32"
    args: Tuple  # the positional arguments a launcher passes (tensors stand for pointers)
    constexprs: Dict[str, object]  # the keyword arguments: flags and tiles
    num_warps: int
    num_stages: int
    shape: Shape = S7B
    tuned: bool = False  # an autotune candidate (tiles from the candidate list, not the launcher's pinned ones)
    pruned: bool = False  # a candidate the pruner drops at this shape, compiled to show why
    form: str = field(default="", compare=False)  # the launch form without tiles and shape ("gemm fwd tma")
    rebuild: Optional[Callable[[int], "Variant"]] = field(default=None, compare=False, repr=False)  # at sizes[i]

    def kwargs(self) -> dict:
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass
class Report:
    variant: Variant
    regs: int
    stack: int
    shared: int
    hgmma: int
    error: str = ""


# --------------------------------------------------------------------------------------------------------------
# The JIT's binder, without a GPU
# --------------------------------------------------------------------------------------------------------------

_BINDERS: Dict[Tuple[int, int], object] = {}


def target(capability: int = 90) -> GPUTarget:
    return GPUTarget("cuda", capability, 32)


def binder(kernel, capability: int = 90):
    """(backend, binder) as ``JITFunction.create_binder`` builds them for the current device, here for a target."""
    key = (id(kernel), capability)
    if key not in _BINDERS:
        backend = triton.compiler.make_backend(target(capability))
        _BINDERS[key] = (backend, triton.runtime.jit.create_function_from_signature(kernel.signature, kernel.params,
                                                                                   backend))
    return _BINDERS[key]


def run_kwargs(kernel, kwargs: dict) -> dict:
    """The keyword arguments as ``JITFunction.run`` completes them before binding."""
    from triton import knobs

    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    return kw


def specialization(kernel, args, kwargs, capability: int = 90) -> list:
    """The binder's specialisation of a launch: one (type, attribute) per parameter, as the JIT's cache key holds it."""
    _, bind = binder(kernel, capability)
    return bind(*args, **run_kwargs(kernel, kwargs))[1]


def pack(v: Variant, capability: int = 90):
    """(options, signature, constexprs, attrs) of a variant, exactly as ``JITFunction.run`` derives them."""
    backend, bind = binder(v.kernel, capability)
    kw = run_kwargs(v.kernel, v.kwargs())
    bound_args, spec, options = bind(*v.args, **kw)
    return v.kernel._pack_args(backend, kw, bound_args, spec, options)


def compile_variant(v: Variant, capability: int = 90) -> Report:
    try:
        options, signature, constexprs, attrs = pack(v, capability)
        src = ASTSource(fn=v.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=target(capability), options=options.__dict__)
    except Exception as exc:  # report, do not raise: the caller decides
        return Report(v, -1, -1, -1, 0, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), path], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return Report(v, regs, stack, int(k.metadata.shared), sass.count("HGMMA"))


_WORK: List[Variant] = []


def _compile_nth(i: int, capability: int):
    r = compile_variant(_WORK[i], capability)
    return r.regs, r.stack, r.shared, r.hgmma, r.error


def compile_all(variants: List[Variant], capability: int = 90, jobs: int = 0) -> List[Report]:
    """compile_variant over a list, in ``jobs`` forked processes (default: one per CPU; the compiler holds the GIL)."""
    import multiprocessing

    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(variants) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [compile_variant(v, capability) for v in variants]
    _WORK[:] = variants
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.starmap(_compile_nth, [(i, capability) for i in range(len(variants))], chunksize=1)
    finally:
        _WORK.clear()
    return [Report(v, *row) for v, row in zip(variants, rows)]


# --------------------------------------------------------------------------------------------------------------
# The launchers' arguments, built as launch.py / nf4_launch.py build them
# --------------------------------------------------------------------------------------------------------------

def _ptr(dtype: torch.dtype) -> torch.Tensor:
    """Stands for a pointer argument: the binder reads its dtype and whether data_ptr() is 16-byte aligned (it is:
    every tensor the launchers pass is an allocation or a view at offset 0)."""
    t = torch.empty(64, dtype=dtype)
    assert t.data_ptr() % 16 == 0
    return t


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 16384) // 64


def _wgrad_m_per_split(m: int, tiles: int, bm: int) -> int:
    """launch._wgrad's rows per split, with tuning.wgrad_splits at the offline SM count (the test suite records the
    real launcher and compares)."""
    splits = max(1, min(triton.cdiv(4 * tuning._OFFLINE_SMS, tiles), triton.cdiv(m, 4 * bm)))
    return triton.cdiv(triton.cdiv(m, splits), bm) * bm


def _meta_split(meta: dict) -> Tuple[dict, int, int]:
    meta = dict(meta)
    return meta, meta.pop("num_warps"), meta.pop("num_stages")


def _gpu_launch(builder):
    """A builder runs with the launchers' GPU choices (tiles, dot flags) even when this module is imported under
    the interpreter (the test suite lists the variants there), and records how to rebuild it at another size."""
    @functools.wraps(builder)
    def build(*args, size: int = 0, **kwargs):
        with settings.override(interpret=False):
            v = builder(*args, size=size, **kwargs)
        return replace(v, rebuild=lambda i: build(*args, size=i, **kwargs))
    return build


@_gpu_launch
def shrink_variant(name: str, shape: Shape, x_dt: str, a_dt: str, gb: bool, p: float, size: int = 0) -> Variant:
    """launch.shrink: t = s/(1-p)·(m⊙x)Aᵀ (x [M, in], lora_A [r, in]), or gB' = s·g B (``gb``: g [M, out] with
    a = lora_B.t(), strides (1, r))."""
    m, k_in, n_out = shape.sizes[size]
    r = shape.r
    k = n_out if gb else k_in
    t_dt = launch.lora_dtype(_DT[x_dt], _DT[a_dt])
    a_strides = (1, r) if gb else (k, 1)
    args = (_ptr(_DT[x_dt]), _ptr(_DT[a_dt]), _ptr(t_dt), m, k, r, k, 1, *a_strides, r, 1,
            0 if gb else _SEED, launch._dropout_threshold(p), 2.0 / (1.0 - p))
    meta, warps, stages = _meta_split(tuning.shrink_meta(r))
    flags = dict(HAS_DROPOUT=p > 0.0, **launch._dot_flags(_DT[x_dt], _DT[a_dt]))
    return Variant(name, kernels._lora_shrink_kernel, x_dt, args, dict(flags, **meta), warps, stages, shape,
                   form=name)


@_gpu_launch
def gemm_variant(name: str, shape: Shape, dt: str, lora_dt: str, fwd: bool, p: float, tma: bool, split: bool = False,
                 size: int = 0) -> Variant:
    """launch._gemm_launch at the pinned tiles: the forward (a = x, w = W as [N, K] = [out, in], bias, l = lora_B.t())
    or the dgrad (a = g, w = W as [K, N] = [out, in], l = lora_A, the mask with p > 0); ``split``: the in-place LoRA
    pass (c holds the base product, w is a with strides 0)."""
    m, k_in, n_out = shape.sizes[size]
    r = shape.r
    n, k = (n_out, k_in) if fwd else (k_in, n_out)
    x, w, t, c = _ptr(_DT[dt]), _ptr(_DT[dt]), _ptr(_DT[lora_dt]), _ptr(_DT[dt])
    l_strides = (1, r) if fwd else (k_in, 1)
    if split:
        w, w_strides = x, (0, 0)
    else:
        w_strides = (1, k_in) if fwd else (k_in, 1)
    has_bias = fwd and not split
    args = (x, w, _ptr(_DT[dt]) if has_bias else x, t, _ptr(_DT[lora_dt]), c, m, n, k, r,
            k, 1, *w_strides, r, 1, *l_strides, n, 1,
            _SEED, launch._dropout_threshold(0.0 if fwd else p), _m_bucket(m))
    flags = dict(HAS_BIAS=has_bias, HAS_LORA=r > 0, EPI_DROPOUT=(not fwd) and p > 0.0, BASE_IN_C=split,
                 BLOCK_R=tuning.block_r(r), USE_TMA=tma and not split, W_NK=fwd, **launch._dot_flags(_DT[dt]),
                 **launch._lora_loop_flags(_DT[dt], _DT[lora_dt]))
    if split:
        meta = tuning._PINNED_SPLIT_GPU
    else:
        meta = tuning._PINNED_GPU_FP32 if dt == "fp32" else tuning._PINNED_GPU
    meta, warps, stages = _meta_split(meta)
    return Variant(name, kernels._lora_gemm_kernel, dt, args, dict(flags, **meta), warps, stages, shape, form=name)


@_gpu_launch
def wgrad_variant(name: str, shape: Shape, dt: str, right_dt: str, da: bool, p: float, size: int = 0) -> Variant:
    """launch._wgrad: dAᵀ = (m⊙x)ᵀ gB' (``da``: left x [M, in], right gB' [M, r]) or dB = gᵀ t' (left g [M, out])."""
    m, k_in, n_out = shape.sizes[size]
    r = shape.r
    pdim = k_in if da else n_out
    meta, warps, stages = _meta_split(tuning.wgrad_meta(pdim, r, torch.promote_types(_DT[dt], _DT[right_dt])))
    tiles = triton.cdiv(pdim, meta["BLOCK_P"]) * triton.cdiv(r, meta["BLOCK_Q"])
    args = (_ptr(_DT[dt]), _ptr(_DT[right_dt]), _ptr(torch.float32), m, pdim, r,
            _wgrad_m_per_split(m, tiles, meta["BLOCK_M"]), pdim, 1, r, 1, pdim * r, r, 1,
            _SEED if da else 0, launch._dropout_threshold(p if da else 0.0))
    flags = dict(HAS_DROPOUT=da and p > 0.0, **launch._dot_flags(_DT[dt], _DT[right_dt]))
    return Variant(name, kernels._lora_wgrad_kernel, dt, args, dict(flags, **meta), warps, stages, shape, form=name)


@_gpu_launch
def nf4_gemm_variant(name: str, shape: Shape, dt: str, lora_dt: str, fwd: bool, p: float, size: int = 0) -> Variant:
    """nf4_launch.gemm: the fused GEMM decoding W (packed codes, fp32 block scales) in its main loop."""
    m, k_in, n_out = shape.sizes[size]
    r = shape.r
    n, k = (n_out, k_in) if fwd else (k_in, n_out)
    x = _ptr(_DT[dt])
    stride_wk, stride_wn = (1, k_in) if fwd else (k_in, 1)
    l_strides = (1, r) if fwd else (k_in, 1)
    args = (x, _ptr(torch.uint8), _ptr(torch.float32), _ptr(torch.float32), _ptr(_DT[dt]) if fwd else x,
            _ptr(_DT[lora_dt]), _ptr(_DT[lora_dt]), _ptr(_DT[dt]), m, n, k, r, nf4_launch._log2(64),
            k, 1, stride_wk, stride_wn, r, 1, *l_strides, n, 1,
            _SEED, launch._dropout_threshold(0.0 if fwd else p))
    flags = dict(HAS_BIAS=fwd, HAS_LORA=r > 0, EPI_DROPOUT=(not fwd) and p > 0.0, ROUND_BF16=dt == "bf16",
                 BLOCK_R=tuning.block_r(r), **launch._dot_flags(_DT[dt]), **launch._lora_loop_flags(_DT[dt],
                                                                                                  _DT[lora_dt]))
    meta, warps, stages = _meta_split(nf4_launch._PINNED_GPU_FP32 if dt == "fp32" else nf4_launch._PINNED_GPU)
    return Variant(name, nf4_kernels._lora_nf4_gemm_kernel, dt, args, dict(flags, **meta), warps, stages, shape,
                   form=name)


@_gpu_launch
def nf4_dequant_variant(shape: Shape, dt: str, size: int = 0) -> Variant:
    """nf4_launch.dequantize of the out×in weight (bf16 stored through its int16 bits)."""
    _, k_in, n_out = shape.sizes[size]
    out = torch.int16 if dt == "bf16" else _DT[dt]
    args = (_ptr(torch.uint8), _ptr(torch.float32), _ptr(torch.float32), _ptr(out), k_in * n_out, nf4_launch._log2(64))
    return Variant("nf4 dequant", nf4_kernels._nf4_dequant_kernel, dt, args,
                   dict(ROUND_BF16=dt == "bf16", BLOCK=nf4_launch._DEQUANT_BLOCK), 4, 3, shape, form="nf4 dequant")


def _named(v: Variant, suffix: str = "") -> Variant:
    return replace(v, name=f"{v.form}{suffix} @{v.shape.tag}")


def dense_forms(shape: Shape, dt: str, adapter: Optional[str] = None, tma: Optional[bool] = None,
                only: Optional[Tuple[str, ...]] = None, tag: str = "") -> List[Variant]:
    """Every launch of one layer's forward and backward at a shape, pinned tiles: x, W, y in ``dt``, lora_A / lora_B
    in ``adapter`` (default ``dt``).  TMA forms where the launcher takes them (16-bit, aligned rows), pointer forms
    always (LORA_KERNELS_TMA=0, or unaligned rows).  ``only``: the form names to keep."""
    adapter = adapter or dt
    lora = launch.lora_dtype(_DT[dt], _DT[adapter])
    lora_dt = {v: k for k, v in _DT.items()}[lora]
    aligned = all((s * _DT[dt].itemsize) % 16 == 0 for _, i, o in shape.sizes for s in (i, o))
    tma_forms = (True, False) if dt != "fp32" and aligned and tma is not False else (False,)
    if tma is True:
        tma_forms = tuple(x for x in tma_forms if x)
    out = [shrink_variant("shrink dropout", shape, dt, adapter, False, _P),
           shrink_variant("shrink", shape, dt, adapter, False, 0.0),
           shrink_variant("shrink gB", shape, dt, adapter, True, 0.0)]
    for use_tma in tma_forms:
        sfx = " tma" if use_tma else ""
        out += [gemm_variant("gemm fwd" + sfx, shape, dt, lora_dt, True, _P, use_tma),
                gemm_variant("gemm dgrad" + sfx, shape, dt, lora_dt, False, 0.0, use_tma),
                gemm_variant("gemm dgrad dropout" + sfx, shape, dt, lora_dt, False, _P, use_tma)]
    out += [gemm_variant("split lora pass fwd", shape, dt, lora_dt, True, _P, False, split=True),
            gemm_variant("split lora pass dgrad dropout", shape, dt, lora_dt, False, _P, False, split=True),
            wgrad_variant("wgrad dB", shape, dt, lora_dt, False, 0.0),
            wgrad_variant("wgrad dAT", shape, dt, lora_dt, True, 0.0),
            wgrad_variant("wgrad dAT dropout", shape, dt, lora_dt, True, _P)]
    if only is not None:
        out = [v for v in out if v.form in only]
    return [_named(v, tag) for v in out]


_CORE = ("shrink dropout", "shrink gB", "gemm fwd tma", "gemm dgrad tma", "gemm dgrad dropout tma", "gemm fwd",
         "gemm dgrad", "gemm dgrad dropout", "split lora pass fwd", "split lora pass dgrad dropout", "wgrad dB",
         "wgrad dAT", "wgrad dAT dropout")
_RANK = ("shrink dropout", "shrink gB", "gemm fwd tma", "gemm dgrad dropout tma", "gemm fwd", "gemm dgrad dropout",
         "wgrad dB", "wgrad dAT dropout")
_ODD = ("shrink dropout", "shrink gB", "gemm fwd tma", "gemm dgrad dropout tma", "gemm fwd", "gemm dgrad dropout",
        "split lora pass fwd", "split lora pass dgrad dropout", "wgrad dB", "wgrad dAT dropout")


def launcher_variants(dtypes=("bf16", "fp16", "fp32"), odd_shapes: bool = True) -> List[Variant]:
    """The variants the launchers use on a GPU with autotuning off (pinned tiles), for each dtype: every form at
    LLaMA-7B shapes with r = 16, the rank-dependent ones at r = 64 (and the shrink at r = 256), and with
    ``odd_shapes`` the test suite's shapes (one token, r = 7 and 100, nothing aligned)."""
    out = []
    for dt in dtypes:
        out += dense_forms(S7B, dt, only=_CORE)
        out += dense_forms(S7B_R64, dt, only=_RANK)
        out += dense_forms(S7B_R256, dt, only=("shrink",))
        if odd_shapes:
            for shape in (S_M1, S_R7, S_R100, S_ODD):
                out += dense_forms(shape, dt, only=_ODD)
    return out


def fp32_adapter_variants(halves=("bf16", "fp16"), odd_shapes: bool = True) -> List[Variant]:
    """The variants fp32 lora_A / lora_B on a 16-bit x, W, y launch (docs/design.md decision 14), pinned tiles.

    The shrink (t', gB') and the token reductions (dA, dB) are fp32 products with one 16-bit operand (x or g, upcast
    in the kernel), in both precisions the launcher can pick (IEEE by default, tf32 when
    ``torch.backends.cuda.matmul.allow_tf32``: " tf32" in the name).  The GEMMs keep their 16-bit main loop and run
    the LoRA K-loop over fp32 t' and l in tf32.  dtype: the 16-bit one; " fp32-adapter" in the name."""
    out = []
    for h in halves:
        for tf32 in (False, True):
            tag = " fp32-adapter" + (" tf32" if tf32 else "")
            with _allow_tf32(tf32):
                forms = ("shrink dropout", "shrink gB", "wgrad dB", "wgrad dAT", "wgrad dAT dropout")
                if not tf32:  # the GEMMs' LoRA loop is tf32 whatever allow_tf32 says
                    forms += ("gemm fwd tma", "gemm dgrad tma", "gemm dgrad dropout tma", "gemm fwd", "gemm dgrad",
                              "gemm dgrad dropout", "split lora pass fwd", "split lora pass dgrad dropout")
                out += dense_forms(S7B, h, "fp32", only=forms, tag=tag)
                out += dense_forms(S7B_R64, h, "fp32", only=("shrink dropout", "wgrad dAT dropout"), tag=tag)
                out += dense_forms(S7B_R256, h, "fp32", only=("shrink",), tag=tag)
                if odd_shapes and not tf32:
                    out += dense_forms(S_ODD, h, "fp32", only=_ODD, tag=tag)
    return out


class _allow_tf32:
    """``torch.backends.cuda.matmul.allow_tf32`` set for a block (the launchers read it for INPUT_PRECISION)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def autotune_variants(dtype: str = "bf16", fp32_lora: bool = False, tf32: bool = False, shape: Shape = S7B,
                      include_pruned: bool = False) -> List[Variant]:
    """Every autotuning candidate of the fused GEMM that the pruner keeps for the launch at ``shape``, forward and
    masked dgrad, TMA and pointer loads; ``fp32_lora``: as launched for fp32 adapters (fp32 t' and l, the LoRA K-loop
    in tf32); ``tf32``: fp32 with ``allow_tf32``.  ``include_pruned``: also the one-tile candidates the spill and
    shared-memory rules drop (not those larger than the problem, nor persistent ones without TMA), marked pruned."""
    out = []
    configs = tuning.get_gemm_configs()
    with _allow_tf32(tf32):
        forms = dense_forms(shape, dtype, "fp32" if fp32_lora else None,
                            only=("gemm fwd tma", "gemm dgrad dropout tma", "gemm fwd", "gemm dgrad dropout"))
    for base in forms:
        named = dict(zip(base.kernel.arg_names, base.args))
        flags = {k: v for k, v in base.constexprs.items() if k not in TILE_KEYS}
        kept = tuning._prune_gemm_configs(configs, named, **flags)
        cands = list(kept)
        if include_pruned:
            m, n = named["M"], named["N"]
            fp32 = dtype == "fp32" and flags["INPUT_PRECISION"] == "ieee"
            for c in configs:
                bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                if c in kept or c.kwargs["PERSISTENT"] and not flags["USE_TMA"]:
                    continue
                if bm > max(64, triton.next_power_of_2(m)) or bn > max(64, triton.next_power_of_2(n)):
                    continue
                if fp32 != ((bm, bn, bk) in tuning._FP32_TILES and c.num_warps == 4 and c.num_stages == 3):
                    continue
                if c.kwargs["PERSISTENT"] and triton.cdiv(m, bm) * triton.cdiv(n, bn) <= tuning._OFFLINE_SMS:
                    continue
                cands.append(c)
        for c in cands:
            tiles = "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            tiles += " persistent" if c.kwargs["PERSISTENT"] else ""
            pruned = c not in kept
            form = base.form + (" tf32" if tf32 else "") + (" fp32-lora" if fp32_lora else "")
            out.append(replace(base, name=f"{form} [{tiles} w{c.num_warps} s{c.num_stages}]"
                                          f"{' pruned' if pruned else ''} @{shape.tag}",
                               constexprs=dict(flags, **c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                               tuned=True, pruned=pruned, form=form))
    return out


def nf4_variants(dtypes=("bf16", "fp16", "fp32"), odd_shapes: bool = True) -> List[Variant]:
    """The NF4 base-weight kernels (``nf4_kernels.py``) at their pinned tiles (``nf4_launch``): the dequantization
    into a scratch buffer (bf16 stored through its int16 bits) and the fused GEMM with W decoded in the main loop,
    forward / dgrad / masked dgrad, with adapters in the compute dtype and, on 16-bit, fp32 adapters (the default);
    with ``odd_shapes`` also at one token (decode-like, where the fused arrangement is predicted to win) and with
    nothing aligned (blocks straddling rows)."""
    out = []
    for dt in dtypes:
        out.append(_named(nf4_dequant_variant(S7B, dt)))
        loras = [("", dt)] + ([(" fp32-lora", "fp32")] if dt != "fp32" else [])
        for tag, lora_dt in loras:
            shapes = (S7B,) + ((S_M1, S_ODD) if odd_shapes else ())
            for shape in shapes:
                for name, fwd, p in (("nf4 gemm fwd", True, 0.0), ("nf4 gemm dgrad", False, 0.0),
                                     ("nf4 gemm dgrad dropout", False, _P)):
                    if shape is not S7B and name == "nf4 gemm dgrad":
                        continue
                    out.append(_named(nf4_gemm_variant(name + tag, shape, dt, lora_dt, fwd, p)))
    return out


def checked_variants() -> List[Variant]:
    """The set the test suite checks: every launcher variant in bf16 and fp32 at LLaMA-7B shapes and the test shapes,
    fp32 adapters on bf16, the autotune candidates the pruner keeps at 7B (bf16, bf16 with fp32 adapters at r = 16
    and 64, fp32 IEEE and TF32) and at an unaligned shape (bf16), and the NF4 kernels in bf16 and fp32."""
    return (launcher_variants(("bf16", "fp32")) + fp32_adapter_variants(("bf16",), odd_shapes=False)
            + autotune_variants("bf16") + autotune_variants("bf16", shape=S_ODD_BIG) + autotune_variants("fp32")
            + autotune_variants("fp32", tf32=True) + autotune_variants("bf16", fp32_lora=True)
            + autotune_variants("bf16", fp32_lora=True, shape=S7B_R64)
            + nf4_variants(("bf16", "fp32"), odd_shapes=False)
            + [v for v in nf4_variants(("bf16",)) if v.shape is not S7B])


def report_sections() -> List[Tuple[Optional[str], List[Variant]]]:
    """The full table: every dtype, the candidates the pruner drops too ("pruned"), at 7B and unaligned."""
    tuned = []
    for shape in (S7B, S7B_R64, S_ODD_BIG):
        tuned += autotune_variants("bf16", shape=shape, include_pruned=True)
    for shape in (S7B, S_ODD_BIG):
        tuned += autotune_variants("fp32", shape=shape, include_pruned=True)
    tuned += autotune_variants("fp32", tf32=True, include_pruned=True)
    tuned += autotune_variants("fp32", tf32=True, shape=S7B_R64, include_pruned=True)
    lora = []
    for shape in (S7B, S7B_R64, S_ODD_BIG):
        lora += autotune_variants("bf16", fp32_lora=True, shape=shape, include_pruned=True)
    return [(None, launcher_variants() + tuned),
            ("fp32 lora_A / lora_B on a 16-bit base (docs/design.md decision 14): fp32 products with a 16-bit operand, "
             "and 16-bit GEMMs with an fp32 LoRA K-loop in tf32", fp32_adapter_variants() + lora),
            ("4-bit NF4 base (nf4_kernels.py): dequantization and the fused GEMM decoding W in its main loop",
             nf4_variants())]


def check_shapes(variants: List[Variant]) -> List[str]:
    """For each variant whose shape lists several sizes: the sizes that bind to a different specialisation from the
    compiled one (none expected)."""
    bad = []
    for v in variants:
        want = specialization(v.kernel, v.args, v.kwargs())
        for i in range(1, len(v.shape.sizes)):
            if specialization(v.kernel, v.rebuild(i).args, v.kwargs()) != want:
                bad.append(f"{v.name} at {v.shape.sizes[i]}")
    return bad


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the checked set as JSON (for the tests)")
    ap.add_argument("--capability", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=0, help="compile threads (default: one per CPU)")
    args = ap.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: offline compilation needs Triton's compiled JIT")
    if args.json:
        rows = []
        for r in compile_all(checked_variants(), args.capability, args.jobs):
            v = r.variant
            rows.append(dict(name=v.name, dtype=v.dtype, shape=v.shape.tag, warps=v.num_warps, stages=v.num_stages,
                             regs=r.regs, stack=r.stack, shared=r.shared, hgmma=r.hgmma, error=r.error,
                             pruned=v.pruned))
        print(json.dumps(rows))
        return
    import datetime

    sections = report_sections()
    bad = check_shapes([v for _, vs in sections for v in vs])
    print(f"# sm_{args.capability} compile report, {datetime.date.today().isoformat()}, triton {triton.__version__}: "
          "compiled through the JIT binder with the runtime's specialisation at the shapes listed; \"pruned\": an "
          "autotune candidate the pruner drops at that shape")
    print("# shapes (tokens×(in→out), rank): each variant is compiled at the first size of its shape; the other "
          "sizes bind to the same specialisation" + (f" EXCEPT {bad}" if bad else ""))
    for s in SHAPES:
        print(f"#   {s.tag:14s} {s.describe()}")
    for title, variants in sections:
        width = max(len(v.name) for v in variants)
        print(f"\n# {title}" if title else "")
        print(f"{'variant':{width}s} {'dtype':5s} {'warps':>5s} {'regs':>5s} {'stack':>6s} {'shared':>7s} "
              f"{'HGMMA':>6s}")
        for r in compile_all(variants, args.capability, args.jobs):
            v = r.variant
            if r.error:
                print(f"{v.name:{width}s} {v.dtype:5s} FAILED {r.error}")
                continue
            print(f"{v.name:{width}s} {v.dtype:5s} {v.num_warps:5d} {r.regs:5d} {r.stack:6d} {r.shared:7d} "
                  f"{r.hgmma:6d}")


if __name__ == "__main__":
    main()
