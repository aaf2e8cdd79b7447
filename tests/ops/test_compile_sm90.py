"""Every kernel variant the launchers (and the autotuner) can launch compiles for Hopper, offline, on CPU.

Triton ships ptxas/cuobjdump/nvdisasm, so CI checks what it cannot run: that each variant compiles for sm_90, that
the 16-bit matrix products use wgmma (HGMMA in SASS), and that register spills stay within a small budget.  The
budget: 0 bytes of stack everywhere except the pointer-load forward GEMM at 128×128 (24 B measured) and fp32
shrink tiles (≤ 64 B measured); 64 B is the cap, so a regression like the 856 B Philox spill fails.

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
    aot = load_repo_module("bench", "sm90_compile_report.py")

    NAMES = [(v.name, v.dtype) for v in aot.checked_variants()]
else:  # pragma: no cover
    NAMES = []


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, _TOOL, "--json"], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(r["name"], r["dtype"]): r for r in rows}


@pytest.mark.parametrize("name, dtype", NAMES, ids=[f"{n}-{d}" for n, d in NAMES])
def test_compiles_for_sm90(reports, name, dtype):
    r = reports[(name, dtype)]
    assert not r["error"], r["error"]
    assert r["stack"] <= 64, f"{name}: {r['stack']} B of stack (spills), {r['regs']} registers"
    if dtype != "fp32" and "dequant" not in name:  # the NF4 dequantization has no matrix product
        assert r["hgmma"] > 0, f"{name}: no wgmma in SASS"
