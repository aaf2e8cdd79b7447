"""Offline (no GPU) compilation of every kernel variant the launchers use, for a chosen NVIDIA target.

Triton ships ptxas, cuobjdump and nvdisasm, so on any machine with Triton we can compile for Hopper (sm_90) and read
the resource report: registers per thread, stack bytes (spills), shared memory, and whether the matrix products
became wgmma (``HGMMA`` in SASS).  The CPU test suite runs this so a kernel that stops compiling for the GPU, or
starts spilling, fails CI even though CI has no GPU.  ``python bench/sm90_compile_report.py`` prints the table
(kept in bench/results/sm90_compile_report.txt); ``--json`` gives the rows the test suite checks.

A developer tool, not part of the installed package: it reads the launchers' tile choices from
``lora_kernels.ops.lora_linear.tuning`` so that the report describes what the launchers launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout works too

from lora_kernels._backend import interpreter_enabled  # noqa: E402
from lora_kernels.ops.lora_linear import kernels, tuning  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_FLOAT_ARGS = {"out_scale"}
_I64_ARGS = {"seed"}


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    dtype: str  # triton type name of the tensor operands: "bf16", "fp16", "fp32"
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    out_dtype: str = ""  # pointer type of the output, when it differs (wgrad writes fp32 partials)
    ptr_dtypes: Tuple[Tuple[str, str], ...] = ()  # (pointer name, type) where it differs: fp32 adapters on 16-bit


@dataclass
class Report:
    variant: Variant
    regs: int
    stack: int
    shared: int
    hgmma: int
    error: str = ""


def _signature(v: Variant) -> Dict[str, str]:
    sig = {}
    ptrs = dict(v.ptr_dtypes)
    for name in v.kernel.arg_names:
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (v.out_dtype if (v.out_dtype and name in ("c_ptr", "out_ptr")) else v.dtype)
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in _I64_ARGS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(v: Variant, capability: int = 90) -> Report:
    src = ASTSource(fn=v.kernel, signature=_signature(v), constexprs=dict(v.constexprs), attrs={})
    target = GPUTarget("cuda", capability, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": v.num_warps, "num_stages": v.num_stages})
    try:
        k = triton.compile(src, target=target, options=options.__dict__)
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


def launcher_variants(dtypes=("bf16", "fp16", "fp32")) -> List[Variant]:
    """The variants the launchers use on a GPU with autotuning off (pinned tiles), for each dtype."""
    import torch

    out = []
    for dt in dtypes:
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        g = tuning._PINNED_GPU_FP32 if tdt == torch.float32 else tuning._PINNED_GPU
        tiles = {k: g[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        common = dict(UPCAST=False, INPUT_PRECISION="ieee")
        gemm_common = dict(LORA_UPCAST=False, LORA_PRECISION="ieee", **common)
        for r, drop in ((16, True), (64, True), (256, False)):
            mblk, kblk, warps = tuning._shrink_meta(r)
            out.append(Variant(f"shrink r{r}{' dropout' if drop else ''}", kernels._lora_shrink_kernel, dt,
                               dict(HAS_DROPOUT=drop, BLOCK_M=mblk, BLOCK_K=kblk, BLOCK_R=r, **common), warps, 3))
        for tma in ((True, False) if dt != "fp32" else (False,)):
            for name, bias, drop, w_nk in (("gemm fwd", True, False, True), ("gemm dgrad", False, False, False),
                                           ("gemm dgrad dropout", False, True, False)):
                out.append(Variant(f"{name}{' tma' if tma else ''}", kernels._lora_gemm_kernel, dt,
                                   dict(HAS_BIAS=bias, HAS_LORA=True, EPI_DROPOUT=drop, BASE_IN_C=False, BLOCK_R=16,
                                        USE_TMA=tma, W_NK=w_nk, **tiles, **tuning._ONE_TILE, **gemm_common),
                                   g["num_warps"], g["num_stages"]))
        split = tuning._PINNED_SPLIT_GPU
        split_tiles = {k: split[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT")}
        for name, drop, w_nk in (("split lora pass fwd", False, True), ("split lora pass dgrad dropout", True, False)):
            out.append(Variant(name, kernels._lora_gemm_kernel, dt,
                               dict(HAS_BIAS=False, HAS_LORA=True, EPI_DROPOUT=drop, BASE_IN_C=True, BLOCK_R=16,
                                    USE_TMA=False, W_NK=w_nk, **split_tiles, **gemm_common),
                               split["num_warps"], split["num_stages"]))
        for name, pdim, q, drop in (("wgrad dB (out x r16)", 4096, 16, False), ("wgrad dAT (in x r16)", 4096, 16, False),
                                    ("wgrad dAT dropout", 4096, 16, True), ("wgrad dAT r64 dropout", 4096, 64, True)):
            bp, bq, bm, warps = tuning._wgrad_meta(pdim, q, tdt)
            out.append(Variant(name, kernels._lora_wgrad_kernel, dt,
                               dict(HAS_DROPOUT=drop, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_M=bm, **common), warps, 3,
                               out_dtype="fp32"))
    return out


def fp32_adapter_variants(halves=("bf16", "fp16")) -> List[Variant]:
    """The variants fp32 lora_A / lora_B on a 16-bit x, W, y launch (docs/design.md decision 14), pinned tiles.

    The shrink (t', gB') and the token reductions (dA, dB) are fp32 products with one 16-bit operand (x or g, upcast
    in the kernel): their rows carry dtype fp32, the 16-bit operand in the name ("bf16-x"), in both precisions the
    launcher can pick (IEEE by default, tf32 when ``torch.backends.cuda.matmul.allow_tf32``).  The GEMMs keep their
    16-bit main loop (dtype bf16 / fp16) and run the LoRA K-loop over fp32 t' and l in tf32 ("fp32-lora")."""
    import torch

    from lora_kernels.ops.lora_linear import launch

    out = []
    for h in halves:
        hdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[h]
        lora = launch._lora_loop_flags(hdt, torch.float32)
        for prec in ("ieee", "tf32"):
            tag = f"fp32-adapter {h}-x" + (" tf32" if prec == "tf32" else "")
            for r, drop in ((16, True), (64, True), (256, False)):
                mblk, kblk, warps = tuning._shrink_meta(r)
                out.append(Variant(f"shrink r{r}{' dropout' if drop else ''} {tag}", kernels._lora_shrink_kernel,
                                   "fp32", dict(HAS_DROPOUT=drop, BLOCK_M=mblk, BLOCK_K=kblk, BLOCK_R=r, UPCAST=True,
                                                INPUT_PRECISION=prec), warps, 3, ptr_dtypes=(("x_ptr", h),)))
            for name, pdim, q, drop in (("wgrad dB (out x r16)", 4096, 16, False),
                                        ("wgrad dAT (in x r16)", 4096, 16, False),
                                        ("wgrad dAT dropout", 4096, 16, True),
                                        ("wgrad dAT r64 dropout", 4096, 64, True)):
                bp, bq, bm, warps = tuning._wgrad_meta(pdim, q, torch.float32)
                out.append(Variant(f"{name} {tag}", kernels._lora_wgrad_kernel, "fp32",
                                   dict(HAS_DROPOUT=drop, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_M=bm, UPCAST=True,
                                        INPUT_PRECISION=prec), warps, 3, ptr_dtypes=(("l_ptr", h),)))
        g = tuning._PINNED_GPU
        tiles = {k: g[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        fp32_lora = (("t_ptr", "fp32"), ("l_ptr", "fp32"))
        for tma in (True, False):
            for name, bias, drop, w_nk in (("gemm fwd", True, False, True), ("gemm dgrad", False, False, False),
                                           ("gemm dgrad dropout", False, True, False)):
                out.append(Variant(f"{name}{' tma' if tma else ''} fp32-lora", kernels._lora_gemm_kernel, h,
                                   dict(HAS_BIAS=bias, HAS_LORA=True, EPI_DROPOUT=drop, BASE_IN_C=False, BLOCK_R=16,
                                        USE_TMA=tma, W_NK=w_nk, **tiles, **tuning._ONE_TILE, UPCAST=False,
                                        INPUT_PRECISION="ieee", **lora),
                                   g["num_warps"], g["num_stages"], ptr_dtypes=fp32_lora))
        split = tuning._PINNED_SPLIT_GPU
        split_tiles = {k: split[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT")}
        for name, drop, w_nk in (("split lora pass fwd", False, True), ("split lora pass dgrad dropout", True, False)):
            out.append(Variant(f"{name} fp32-lora", kernels._lora_gemm_kernel, h,
                               dict(HAS_BIAS=False, HAS_LORA=True, EPI_DROPOUT=drop, BASE_IN_C=True, BLOCK_R=16,
                                    USE_TMA=False, W_NK=w_nk, **split_tiles, UPCAST=False, INPUT_PRECISION="ieee",
                                    **lora),
                               split["num_warps"], split["num_stages"], ptr_dtypes=fp32_lora))
    return out


def autotune_variants(dtype: str = "bf16", fp32_lora: bool = False) -> List[Variant]:
    """Every autotuning candidate of the fused GEMM that the pruner can pick, forward and masked dgrad; with
    ``fp32_lora``, as launched for fp32 adapters (fp32 t' and l, the LoRA K-loop in tf32)."""
    out = []
    import torch

    from lora_kernels.ops.lora_linear import launch

    probe = torch.empty(0, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    for tma in ((True, False) if dtype != "fp32" else (False,)):
        for name, drop in (("gemm fwd", False), ("gemm dgrad dropout", True)):
            flags = {"USE_TMA": tma, "EPI_DROPOUT": drop, "INPUT_PRECISION": "ieee"}
            for cfg in tuning._prune_gemm_configs(tuning.get_gemm_configs(), {"M": 8192, "N": 4096, "a_ptr": probe},
                                               **flags):
                tiles = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                tiles += " persistent" if cfg.kwargs["PERSISTENT"] else ""
                lora = (launch._lora_loop_flags(probe.dtype, torch.float32) if fp32_lora
                        else dict(LORA_UPCAST=False, LORA_PRECISION="ieee"))
                out.append(Variant(f"{name}{' tma' if tma else ''}{' fp32-lora' if fp32_lora else ''} "
                                   f"[{tiles} w{cfg.num_warps} s{cfg.num_stages}]",
                                   kernels._lora_gemm_kernel, dtype,
                                   dict(HAS_BIAS=not drop, HAS_LORA=True, EPI_DROPOUT=drop, BASE_IN_C=False,
                                        BLOCK_R=16, UPCAST=False, INPUT_PRECISION="ieee", USE_TMA=tma, W_NK=not drop,
                                        **lora, **cfg.kwargs),
                                   cfg.num_warps, cfg.num_stages,
                                   ptr_dtypes=(("t_ptr", "fp32"), ("l_ptr", "fp32")) if fp32_lora else ()))
    return out


def nf4_variants(dtypes=("bf16", "fp16", "fp32")) -> List[Variant]:
    """The NF4 base-weight kernels (``nf4_kernels.py``) at their pinned tiles (``nf4_launch``): the dequantization
    into a scratch buffer (bf16 stored through its int16 bits) and the fused GEMM with W decoded in the main loop,
    forward / dgrad / masked dgrad, with adapters in the compute dtype and, on 16-bit, fp32 adapters (the default)."""
    import torch

    from lora_kernels.ops.lora_linear import launch, nf4_kernels, nf4_launch

    codes = (("q_ptr", "u8"), ("scale_ptr", "fp32"), ("code_ptr", "fp32"))
    out = []
    for dt in dtypes:
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        out.append(Variant("nf4 dequant", nf4_kernels._nf4_dequant_kernel, dt,
                           dict(ROUND_BF16=dt == "bf16", BLOCK=nf4_launch._DEQUANT_BLOCK), 4, 1,
                           ptr_dtypes=codes + (("out_ptr", "i16" if dt == "bf16" else dt),)))
        g = nf4_launch._PINNED_GPU_FP32 if dt == "fp32" else nf4_launch._PINNED_GPU
        tiles = {k: g[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        loras = [("", (), dict(LORA_UPCAST=False, LORA_PRECISION="ieee"))]
        if dt != "fp32":
            loras.append((" fp32-lora", (("t_ptr", "fp32"), ("l_ptr", "fp32")),
                          launch._lora_loop_flags(tdt, torch.float32)))
        for tag, lora_ptrs, lora in loras:
            for name, bias, drop in (("nf4 gemm fwd", True, False), ("nf4 gemm dgrad", False, False),
                                     ("nf4 gemm dgrad dropout", False, True)):
                out.append(Variant(name + tag, nf4_kernels._lora_nf4_gemm_kernel, dt,
                                   dict(HAS_BIAS=bias, HAS_LORA=True, EPI_DROPOUT=drop, UPCAST=False,
                                        INPUT_PRECISION="ieee", ROUND_BF16=False, BLOCK_R=16, **lora, **tiles),
                                   g["num_warps"], g["num_stages"], ptr_dtypes=codes + lora_ptrs))
    return out


def checked_variants() -> List[Variant]:
    """The set the test suite checks: every launcher variant in bf16 and fp32 (fp32 adapters on bf16 included),
    every bf16 autotune candidate (with fp32 adapters too) and every fp32 one, and the NF4 kernels."""
    return (launcher_variants(("bf16", "fp32")) + fp32_adapter_variants(("bf16",)) + autotune_variants("bf16")
            + autotune_variants("fp32") + autotune_variants("bf16", fp32_lora=True) + nf4_variants(("bf16", "fp32")))


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the checked set as JSON (for the tests)")
    ap.add_argument("--capability", type=int, default=90)
    args = ap.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: offline compilation needs Triton's compiled JIT")
    if args.json:
        rows = []
        for v in checked_variants():
            r = compile_variant(v, args.capability)
            rows.append(dict(name=v.name, dtype=v.dtype, regs=r.regs, stack=r.stack, shared=r.shared,
                             hgmma=r.hgmma, error=r.error))
        print(json.dumps(rows))
        return
    sections = [(52, None, launcher_variants() + autotune_variants()),
                (62, "fp32 lora_A / lora_B on a 16-bit base (docs/design.md decision 14): fp32 products with a 16-bit "
                     "operand (dtype fp32, the operand named), and 16-bit GEMMs with an fp32 LoRA K-loop in tf32",
                 fp32_adapter_variants() + autotune_variants(fp32_lora=True)),
                (40, "4-bit NF4 base (nf4_kernels.py): dequantization and the fused GEMM decoding W in its main loop",
                 nf4_variants())]
    for width, title, variants in sections:
        if title:
            print(f"\n# {title}")
        print(f"{'variant':{width}s} {'dtype':5s} {'warps':>5s} {'regs':>5s} {'stack':>6s} {'shared':>7s} "
              f"{'HGMMA':>6s}")
        for v in variants:
            r = compile_variant(v, args.capability)
            if r.error:
                print(f"{v.name:{width}s} {v.dtype:5s} FAILED {r.error}")
                continue
            print(f"{v.name:{width}s} {v.dtype:5s} {v.num_warps:5d} {r.regs:5d} {r.stack:6d} {r.shared:7d} "
                  f"{r.hgmma:6d}")


if __name__ == "__main__":
    main()
