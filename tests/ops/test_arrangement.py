"""How the kernels tile and arrange the work -- TMA vs pointer loads, persistent grids, the fused and split GEMM
arrangements and their "auto" choice, the split token reduction -- and that every arrangement still matches
float64 (``tests.helpers.run_and_compare``) or the others."""

import pytest
import torch

from lora_kernels import lora_linear, settings
from lora_kernels._backend import HAS_TRITON
from lora_kernels.ops import gemm_arrangement, gemm_arrangement_report
from lora_kernels.ops.lora_linear import arrangement
from tests.helpers import FLOAT_DTYPES, MODES, make_case, rel_err, run_and_compare, standalone_bound

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import launch, tuning


@pytest.mark.parametrize("shape, tma", [((100, 64, 48, 16), True), ((37, 96, 80, 5), True),
                                        ((100, 70, 45, 16), False), ((64, 100, 129, 7), False)])
def test_gemm_path_choice_and_agreement(backend, monkeypatch, shape, tma):
    """Aligned shapes take the TMA path, odd ones the pointer path; forcing the pointer path changes nothing."""
    if backend != "triton":
        pytest.skip("kernel path detail")
    chosen = []
    orig = launch._use_tma
    monkeypatch.setattr(launch, "_use_tma", lambda *a: chosen.append(orig(*a)) or chosen[-1])
    n, d_in, d_out, r = shape
    x, w, b, a, bb = make_case(n, d_in, d_out, r, torch.float16)
    outs = []
    for allowed in (True, False):
        with settings.override(tma=allowed):
            y = lora_linear(x, w, b, a, bb, 0.5, 0.2, seed=3)
            outs.append([y] + list(torch.autograd.grad(y, [x, a, bb], torch.ones_like(y))))
    assert chosen == [tma, tma, False, False]  # forward + dgrad, then both forced off
    for o1, o2 in zip(*outs):
        assert torch.allclose(o1.float(), o2.float(), rtol=2e-3, atol=2e-3)


ARRANGEMENT_SHAPES = [(100, 64, 48, 16, True), (37, 96, 80, 5, False), (100, 70, 45, 16, True), (1, 16, 16, 1, True)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", ARRANGEMENT_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_persistent_grid_matches_float64(kernels, monkeypatch, dtype, mode, p, shape):
    """A persistent grid (3 programs walking 2-12 tiles unevenly, TMA and pointer paths) covers every tile once."""
    monkeypatch.setattr(tuning, "_PINNED_INTERPRET", dict(tuning._PINNED_INTERPRET, PERSISTENT=True))
    grids = []
    orig = tuning.grid_size
    monkeypatch.setattr(tuning, "grid_size", lambda *a: grids.append((orig(*a), a[0], a[1])) or grids[-1][0])
    n, d_in, d_out, r, bias = shape
    run_and_compare(*make_case(n, d_in, d_out, r, dtype, mode, bias), scale=0.75, p=p)
    assert grids and all(g == min(3, -(-m // 32) * -(-c // 32)) for g, m, c in grids)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", ARRANGEMENT_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_split_arrangement_matches_float64(kernels, dtype, mode, p, shape):
    """The split arrangement (torch/cuBLAS base product, LoRA term added in place by the kernel, dropout mask in
    the dgrad pass) against float64, like the fused one."""
    n, d_in, d_out, r, bias = shape
    with gemm_arrangement("split"):
        run_and_compare(*make_case(n, d_in, d_out, r, dtype, mode, bias), scale=0.75, p=p)


def test_arrangements_agree_and_are_really_used(kernels, monkeypatch):
    """fused and split give the same outputs and gradients (same dropout mask), and each launches what it says:
    split runs the kernel with BASE_IN_C and no bias, after a torch product; fused never does."""
    launches = []
    orig = launch._gemm_launch
    monkeypatch.setattr(launch, "_gemm_launch", lambda *a: launches.append(a[-1]) or orig(*a))
    x, w, b, a, bb = make_case(50, 64, 48, 8, torch.float32)
    outs = {}
    for name in ("fused", "split"):
        with gemm_arrangement(name):
            y = lora_linear(x, w, b, a, bb, 0.5, 0.3, seed=11)
            outs[name] = [y] + list(torch.autograd.grad(y, [x, a, bb], torch.ones_like(y)))
    assert launches == [False, False, True, True]  # forward + dgrad per arrangement
    for o1, o2 in zip(outs["fused"], outs["split"]):
        assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-5)


def test_arrangement_setting_is_validated(backend, monkeypatch):
    with pytest.raises(ValueError, match="gemm_arrangement name"):
        with gemm_arrangement("cublas"):
            pass
    monkeypatch.setenv("LORA_KERNELS_GEMM", "fastest")
    with pytest.raises(ValueError, match="LORA_KERNELS_GEMM"):
        settings.reload()
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    assert settings.reload().gemm == "split"
    with gemm_arrangement("fused"):
        assert settings.get().gemm == "fused"  # the context manager wins over the environment
    assert settings.get().gemm == "split"


def test_auto_arrangement_measures_once_per_key(monkeypatch):
    """"auto" times each candidate once per shape bucket, keeps the faster, and reuses the choice."""
    timed = []
    fake = {"fused": 1.3, "split": 0.9}
    monkeypatch.setattr(arrangement, "_measured", {})
    monkeypatch.setattr(arrangement, "_time_ms", lambda fn: timed.append(fn) or fake[fn()])
    cands = {"fused": lambda: "fused", "split": lambda: "split"}
    assert arrangement.choose(("fwd", 0, "bf16", 8192), cands) == "split"
    assert arrangement.choose(("fwd", 0, "bf16", 8192), cands) == "split"
    assert len(timed) == 2  # measured once
    fake.update(fused=0.5)
    assert arrangement.choose(("dgrad", 0, "bf16", 8192), cands) == "fused"
    report = gemm_arrangement_report()
    assert report[("fwd", 0, "bf16", 8192)] == {"choice": "split", "fused_ms": 1.3, "split_ms": 0.9}
    assert report[("dgrad", 0, "bf16", 8192)]["choice"] == "fused"


def test_auto_arrangement_falls_back_to_fused_when_timing_runs_out_of_memory(monkeypatch):
    """Timing allocates extra outputs and an L2-flush buffer: near full memory "auto" must keep working."""
    def oom(fn):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(arrangement, "_measured", {})
    monkeypatch.setattr(arrangement, "_time_ms", oom)
    assert arrangement.choose(("fwd", 0, "bf16", 4096), {"fused": None, "split": None}) == "fused"
    assert gemm_arrangement_report()[("fwd", 0, "bf16", 4096)]["note"] == "out of memory"


def test_persistent_configs_pruned_to_tma_and_large_problems():
    if not HAS_TRITON:
        pytest.skip("needs triton")
    probe = torch.empty(0, dtype=torch.bfloat16)
    configs = tuning.get_gemm_configs()
    assert any(c.kwargs["PERSISTENT"] for c in configs)

    def persistent(m, n, tma):
        kept = tuning._prune_gemm_configs(configs, {"M": m, "N": n, "a_ptr": probe}, USE_TMA=tma)
        assert kept
        return [c for c in kept if c.kwargs["PERSISTENT"]]

    assert persistent(8192, 4096, True)             # 1024 tiles of 128×128 on 132 SMs
    assert not persistent(8192, 4096, False)        # pointer loads: never persistent
    assert not persistent(256, 512, True)           # 8 tiles: nothing to walk


def test_wgrad_split_reduction(backend):
    """The token reduction split across programs gives the same dA/dB as one split."""
    if backend != "triton":
        pytest.skip("split reduction is a kernel detail")
    left, right = torch.randn(200, 7), torch.randn(200, 45)
    ref = left.double().t() @ right.double()
    for splits in (1, 2, 3, 7):
        assert rel_err(launch._wgrad(left, right, 0, 0.0, splits=splits), ref) <= standalone_bound(torch.float32, 200)
