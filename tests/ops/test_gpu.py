"""GPU-only checks: bf16 on real tensor cores, large and odd shapes, the autotuned path, > 2³¹-element tensors.

Skipped cleanly on machines without CUDA (the ``gpu`` marker, resolved in conftest at collection time).
"""

import numpy as np
import pytest
import torch

from lora_kernels import dropout_mask, lora_linear, lora_linear_ref, settings
from lora_kernels._backend import HAS_TRITON
from lora_kernels.ops import gemm_arrangement, gemm_arrangement_report
from lora_kernels.ops.lora_linear import arrangement
from tests.helpers import MODES, make_case, philox_keep_mask, rel_err, run_and_compare

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import tuning

pytestmark = pytest.mark.gpu


def _tuned(monkeypatch, tuned):
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "1" if tuned == "autotune" else "0")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "fused")  # "auto" could route a shape to split; that has its own tests
    settings.reload()  # (conftest reloads again after the test, once monkeypatch has restored the environment)


GPU_SHAPES = [(1000, 1024, 2816, 16, True), (777, 4096, 1000, 100, False), (4096, 512, 512, 256, True),
              (1, 4096, 4096, 7, True)]
# Pinned tiles for every dtype; the autotuned path for bf16 (each new autotune key compiles ~10 candidates, about
# 10 s, so the full dtype × autotune product would not fit a GPU session).  Every 16-bit candidate is also run
# pinned in test_gpu_every_autotune_candidate.
TUNED_DTYPES = [("pinned", torch.bfloat16), ("pinned", torch.float16), ("pinned", torch.float32),
                ("autotune", torch.bfloat16)]


@pytest.mark.parametrize("tuned, dtype", TUNED_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_gpu_matches_float64(monkeypatch, tuned, dtype, mode, p, shape):
    _tuned(monkeypatch, tuned)
    n, d_in, d_out, r, bias = shape
    run_and_compare(*make_case(n, d_in, d_out, r, dtype, mode, bias, device="cuda"), scale=0.5, p=p)


@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_3d_noncontiguous(mode):
    x, w, b, a, bb = make_case(300, 768, 512, 16, torch.bfloat16, mode, lead=(4,), device="cuda")
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, other strides
    run_and_compare(xt, w, b, a, bb, scale=2.0, p=0.05)


def test_gpu_beyond_int32_offsets():
    """N·in > 2³¹: the last rows (whose linear indices exceed int32) must be right, dropout mask included."""
    d_in, d_out, r, p = 2048, 64, 8, 0.1
    n = 2**31 // d_in + 1000
    x, w, b, a, bb = make_case(n, d_in, d_out, r, torch.bfloat16, device="cuda")
    y = lora_linear(x, w, b, a, bb, 1.0, p, seed=5)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, [x, a, bb], g)
    tail = slice(n - 1000, n)
    mask = dropout_mask(5, (n, d_in), p, "cuda")[tail]
    xs = x.detach()[tail].double()
    yr = lora_linear_ref(xs, w.double(), b.double(), a.double(), bb.double(), 1.0, p, dropout_mask=mask)
    assert rel_err(y[tail], yr) < 1e-2
    dxr = g[tail].double() @ w.double() + (mask * ((g[tail].double() @ bb.double()) @ a.double())) / (1 - p)
    assert rel_err(dx[tail], dxr) < 1e-2
    assert torch.isfinite(da).all() and torch.isfinite(db).all()
    del dx, da, db, y, x


@pytest.mark.parametrize("seed", [11, 2**32 + 7], ids=["seed11", "seed2^32+7"])
def test_gpu_dropout_mask_matches_cpu_interpreter_definition(seed):
    """The CUDA kernels' mask is, bit for bit, the numpy Philox reference (tests.helpers.philox_keep_mask) that the
    CPU interpreter's mask is checked against in test_dropout.py -- odd widths and a seed ≥ 2³² included -- and it
    is reproducible across calls."""
    if not HAS_TRITON:
        pytest.skip("the Philox mask is the Triton kernels' (the PyTorch path uses torch's generator)")
    for shape, p in (((513, 1000), 0.3), ((7, 13), 0.5), ((33, 50), 0.1), ((64, 130), 0.9)):
        m1 = dropout_mask(seed, shape, p, "cuda")
        assert m1.device.type == "cuda" and m1.dtype == torch.bool and m1.shape == shape
        assert torch.equal(m1, dropout_mask(seed, shape, p, "cuda"))
        assert np.array_equal(m1.cpu().numpy(), philox_keep_mask(seed, shape, p)), f"{shape}, p={p}"
    m = dropout_mask(seed, (513, 1000), 0.3, "cuda")
    assert abs(m.float().mean().item() - 0.7) < 0.01


def _candidates():
    if not HAS_TRITON:
        return []
    return [c for c in tuning.get_gemm_configs() if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
            not in tuning._FP32_TILES]


def _cfg_id(c):
    return "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
        f"w{c.num_warps}s{c.num_stages}" + ("p" if c.kwargs["PERSISTENT"] else ""))


@pytest.mark.parametrize("config", _candidates(), ids=_cfg_id)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_every_autotune_candidate(monkeypatch, config, p):
    """Every 16-bit autotune candidate (persistent ones included), pinned, on a shape with more tiles than SMs and
    ragged edges: whichever the autotuner picks must be right.  Candidates the pruner would refuse for the
    pointer path run on the TMA path (aligned shape), where they are offered."""
    _tuned(monkeypatch, "pinned")
    meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    monkeypatch.setattr(tuning, "pinned_gemm_meta", lambda dtype, base_in_c: meta)
    run_and_compare(*make_case(4000, 2048, 4104, 16, torch.bfloat16, "AB", True, device="cuda"), scale=0.5, p=p)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_split_arrangement(mode, p, dtype):
    with gemm_arrangement("split"):
        run_and_compare(*make_case(1000, 1024, 2816, 16, dtype, mode, True, device="cuda"), scale=0.5, p=p)


def test_gpu_auto_arrangement_measures_and_is_correct(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_GEMM", "auto")
    settings.reload()
    monkeypatch.setattr(arrangement, "_measured", {})
    run_and_compare(*make_case(2048, 1024, 1024, 16, torch.bfloat16, "AB", True, device="cuda"), scale=0.5, p=0.1)
    report = gemm_arrangement_report()
    assert {k[0] for k in report} == {"fwd", "dgrad"}
    assert all(v["choice"] in ("fused", "split") and v["fused_ms"] > 0 and v["split_ms"] > 0
               for v in report.values())
