"""Every kernel variant the launchers (and the autotuner) can launch compiles for Hopper, offline, on CPU.

Triton ships ptxas/cuobjdump/nvdisasm, so CI checks what it cannot run: that each variant compiles for sm_90, that
its matrix products use wgmma (HGMMA in SASS) wherever they run on the tensor cores, that register spills stay within
a small budget, and that its shared memory fits the device and matches the pruner's estimate.  The variants are
compiled as the JIT compiles them at run time (``bench/sm90_compile_report.py``: the launchers' arguments through the
JIT's binder, at LLaMA-7B shapes and the test suite's odd ones; tests/ops/test_specialization.py checks that these
are the launchers' arguments).

The spill budget: 0 bytes of stack for every pinned 16-bit launch at aligned shapes (LLaMA-7B, one token, r = 7,
r = 100); 64 B elsewhere (fp32 on the FMA units, autotune candidates, NF4, unaligned shapes: 8-64 B measured), except
the pinned 128×128 pointer-load forward on unaligned operands (144 B).  (The fp32 shrink with dropout there spilled
72 B until the mask took 8 decisions per Philox call; it now has none.)
So a regression like the 856 B Philox spill fails.

The compilation runs in a subprocess with TRITON_INTERPRET unset (the suite itself runs under the interpreter).
"""

import json
import os
import subprocess
import sys

import pytest

from lora_kernels._backend import HAS_TRITON
from tests.helpers import load_repo_module, repo_path

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

_TOOL = repo_path("bench", "sm90_compile_report.py")

if HAS_TRITON:
    import torch

    from lora_kernels.ops.lora_linear import tuning

    aot = load_repo_module("bench", "sm90_compile_report.py")

    VARIANTS = {(v.name, v.dtype): v for v in aot.checked_variants()}
    NAMES = list(VARIANTS)
else:  # pragma: no cover
    NAMES = []

_UNALIGNED = ("37x100>70 r7", "8191x4100>4098 r7")
# Measured spills above the default budget, with their cap.
_SPILL_EXCEPTIONS = {("gemm fwd @37x100>70 r7", "bf16"): 160,
                     ("gemm fwd [128x128x64 w8 s4] @8191x4100>4098 r7", "bf16"): 160}


def _spill_budget(v) -> int:
    if (v.name, v.dtype) in _SPILL_EXCEPTIONS:
        return _SPILL_EXCEPTIONS[(v.name, v.dtype)]
    sixteen = v.dtype != "fp32" and "fp32-adapter" not in v.name
    if sixteen and not v.tuned and v.shape.tag not in _UNALIGNED:
        return 0
    return 64


def _expects_wgmma(v) -> bool:
    """Whether the variant's products run on the tensor cores: 16-bit operands not upcast, or tf32."""
    c = v.constexprs
    if "INPUT_PRECISION" not in c:  # the NF4 dequantization: no product
        return False
    sixteen = v.dtype != "fp32"
    if c.get("BASE_IN_C"):  # the split pass: only the LoRA K-loop
        return c["LORA_PRECISION"] == "tf32" or (sixteen and not c["LORA_UPCAST"])
    return c["INPUT_PRECISION"] == "tf32" or (sixteen and not c["UPCAST"])


def _shared_estimate(v) -> int:
    """tuning.gemm_shared_bytes for a GEMM variant, as the pruner computes it."""
    c = v.constexprs
    named = dict(zip(v.kernel.arg_names, v.args))
    elem = named["a_ptr"].element_size()
    return tuning.gemm_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], v.num_stages, elem, c["BLOCK_R"],
                                    named["t_ptr"].element_size(), c["LORA_PRECISION"] == "tf32", c["USE_TMA"],
                                    c["PERSISTENT"])


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, _TOOL, "--json"], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(r["name"], r["dtype"]): r for r in rows}


@pytest.mark.parametrize("name, dtype", NAMES, ids=[f"{n}-{d}" for n, d in NAMES])
def test_compiles_for_sm90(reports, name, dtype):
    r, v = reports[(name, dtype)], VARIANTS[(name, dtype)]
    assert not r["error"], r["error"]
    assert r["stack"] <= _spill_budget(v), f"{name}: {r['stack']} B of stack (spills), {r['regs']} registers"
    if _expects_wgmma(v):
        assert r["hgmma"] > 0, f"{name}: no wgmma in SASS"
    assert r["shared"] <= tuning.SM90_SHARED_BYTES, f"{name}: {r['shared']} B of shared memory"


def test_shared_memory_estimate_matches_the_report(reports):
    """The pruner's tile arithmetic against what ptxas allocated, for every fused-GEMM variant: never below it, and
    within 1 KiB of it where the estimate is meant to be exact (tensor cores, aligned operands, one tile per
    program)."""
    checked = 0
    for key, v in VARIANTS.items():
        if v.kernel is not aot.kernels._lora_gemm_kernel or v.constexprs["BASE_IN_C"]:
            continue
        est, got = _shared_estimate(v), reports[key]["shared"]
        assert est >= got, f"{v.name} ({v.dtype}): estimate {est} B < {got} B measured"
        c = v.constexprs
        exact = (c["INPUT_PRECISION"] == "tf32" or v.dtype != "fp32") and v.shape.tag not in _UNALIGNED
        if exact:
            assert est - got <= 1024, f"{v.name} ({v.dtype}): estimate {est} B, {got} B measured"
        checked += 1
    assert checked > 60


def _base(dtype, shape, form, tf32=False, adapter=None):
    with aot._allow_tf32(tf32):
        v = aot.dense_forms(shape, dtype, adapter, only=(form,))[0]
    return dict(zip(v.kernel.arg_names, v.args)), {k: x for k, x in v.constexprs.items() if k not in aot.TILE_KEYS}


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages,
            c.kwargs["PERSISTENT"])


def _estimate(c, named, flags):
    return tuning.gemm_shared_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                                    named["a_ptr"].element_size(), flags["BLOCK_R"], named["t_ptr"].element_size(),
                                    flags["LORA_PRECISION"] == "tf32", flags["USE_TMA"], c.kwargs["PERSISTENT"])


def test_prune_drops_tiles_over_the_shared_memory_limit(monkeypatch):
    """fp32 with TF32 allowed at 128×128×64 / 8 warps / 4 stages needs 262,144 B (sm_90: 232,448 B): dropped before it
    compiles, by the shared-memory rule alone; every tile kept fits.  Same for fp32 adapters at r = 64 (the tf32 LoRA
    K-loop's buffers: 128×256 and the persistent forms).  CPU only, nothing compiles."""
    configs = tuning.get_gemm_configs()
    assert tuning.shared_memory_limit(None) == tuning.SM90_SHARED_BYTES == 232448
    named, flags = _base("fp32", aot.S7B, "gemm fwd", tf32=True)
    big = [c for c in configs if _tile(c) == (128, 128, 64, 8, 4, False)]
    assert len(big) == 1 and _estimate(big[0], named, flags) == 262144
    kept = tuning._prune_gemm_configs(configs, named, **flags)
    assert kept and big[0] not in kept
    assert all(_estimate(c, named, flags) <= tuning.SM90_SHARED_BYTES for c in kept)
    monkeypatch.setattr(tuning, "SM90_SHARED_BYTES", 10**9)  # no limit: the same tile is kept
    assert big[0] in tuning._prune_gemm_configs(configs, named, **flags)
    monkeypatch.undo()

    for form in ("gemm fwd tma", "gemm dgrad dropout tma", "gemm fwd"):
        named, flags = _base("bf16", aot.S7B_R64, form, adapter="fp32")
        kept = tuning._prune_gemm_configs(configs, named, **flags)
        assert kept and all(_estimate(c, named, flags) <= tuning.SM90_SHARED_BYTES for c in kept)
        dropped = {_tile(c) for c in configs if c not in kept}
        if form == "gemm fwd tma":
            assert {(128, 256, 64, 8, 3, False), (128, 256, 64, 8, 3, True), (128, 128, 64, 8, 4, True),
                    (256, 128, 64, 8, 3, True)} <= dropped
        assert (128, 128, 64, 8, 4, False) not in dropped  # 229,376 B: fits


def test_prune_pointer_loads_by_alignment():
    """Pointer loads on aligned operands (7B, LORA_KERNELS_TMA=0) keep the large tiles, which no longer spill there;
    on unaligned operands only the tiles that do not spill heavily (128×128 / 8 warps, 64×64)."""
    configs = tuning.get_gemm_configs()
    named, flags = _base("bf16", aot.S7B, "gemm fwd")
    aligned = {_tile(c)[:4] for c in tuning._prune_gemm_configs(configs, named, **flags)}
    assert {(128, 256, 64, 8), (256, 128, 64, 8), (64, 128, 64, 4), (128, 128, 64, 4)} <= aligned
    named, flags = _base("bf16", aot.S_ODD_BIG, "gemm fwd")
    unaligned = {_tile(c)[:4] for c in tuning._prune_gemm_configs(configs, named, **flags)}
    assert unaligned == {(128, 128, 64, 8), (64, 64, 64, 4)}
    # A view 2 bytes off a 16-byte boundary is unaligned whatever the sizes.
    named, flags = _base("bf16", aot.S7B, "gemm fwd")
    named["a_ptr"] = torch.empty(64, dtype=torch.bfloat16)[1:]
    assert {_tile(c)[:4] for c in tuning._prune_gemm_configs(configs, named, **flags)} == unaligned
