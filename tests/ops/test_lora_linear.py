"""lora_linear (kernels under the interpreter, and the PyTorch path) against a float64 reference.

Tolerance rule: relative error of ours vs float64 ≤ 2 × that of the same computation done by PyTorch in the same
dtype + a floor that scales with the dtype's eps and the reduction length (``error_floor``: it only matters where
PyTorch is exact by luck, which depends on the CPU's BLAS).
"""

import pytest
import torch

from lora_kernels import dropout_mask, lora_linear, lora_linear_ref, settings
from lora_kernels._backend import HAS_TRITON
from lora_kernels.ops import gemm_arrangement, gemm_arrangement_report
from lora_kernels.ops.lora_linear import arrangement

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import launch, tuning

EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}
MODES = {"AB": (True, True), "B": (False, True), "A": (True, False)}  # mode -> (A trains, B trains)


def error_floor(dtype, k):
    """The part of the bound that does not scale with torch's own error.  torch's error can be near zero by luck
    of one BLAS's kernel on a short reduction (MKL on AVX-512 gave 3.7e-8 for a 16-long fp32 chain, where ours had
    3.4e-7), so "2 × torch's error" alone cannot hold on every CPU.  Every output here is a chain of fp32-accumulated
    reductions (t over in, gB over out, the LoRA K-loop over r) with at most one rounding to ``dtype`` of a stored
    intermediate, so the floor is one unit roundoff of ``dtype`` plus the fp32 random-walk error eps₃₂·√k of a
    k-long accumulation, k = in + out + r."""
    return EPS[dtype] + EPS[torch.float32] * k**0.5


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(n, d_in, d_out, r, dtype, mode="AB", bias=True, x_grad=True, lead=(), device="cpu"):
    """Fresh random inputs, every factor non-zero (B too), scaled so outputs are O(1)."""
    a_trains, b_trains = MODES[mode]
    kw = dict(device=device)
    x = torch.randn(*lead, n, d_in, **kw).to(dtype).requires_grad_(x_grad)
    w = (torch.randn(d_out, d_in, **kw) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, **kw).to(dtype) if bias else None
    a = (torch.randn(r, d_in, **kw) / d_in**0.5).to(dtype).requires_grad_(a_trains)
    bb = (torch.randn(d_out, r, **kw) / r**0.5).to(dtype).requires_grad_(b_trains)
    return x, w, b, a, bb


def grads_of(y, g, tensors):
    ins = [t for t in tensors if t.requires_grad]
    outs = torch.autograd.grad(y, ins, g)
    it = iter(outs)
    return [next(it) if t.requires_grad else None for t in tensors]


def run_and_compare(x, w, b, a, bb, scale, p, seed=1234):
    """Forward + backward through lora_linear, checked against float64 and against torch in the same dtype."""
    dtype = x.dtype
    y = lora_linear(x, w, b, a, bb, scale, p, seed=seed)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == dtype
    g = torch.randn_like(y)
    got = [y] + grads_of(y, g, [x, a, bb])

    mask = dropout_mask(seed, (x[..., 0].numel(), x.shape[-1]), p, x.device).reshape(x.shape) if p > 0 else None
    results = {}
    for kind, cast in (("ref64", torch.float64), ("same", dtype)):
        leaves = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in (x, a, bb)]
        yr = lora_linear_ref(leaves[0], w.to(cast), b.to(cast) if b is not None else None, leaves[1], leaves[2],
                             scale, p, dropout_mask=mask)
        results[kind] = [yr] + grads_of(yr, g.to(cast), leaves)
    for name, o, r64, same in zip(("y", "dx", "dA", "dB"), got, results["ref64"], results["same"]):
        if r64 is None:
            assert o is None, f"{name} should not have been computed"
            continue
        assert o is not None and o.dtype == dtype and o.shape == r64.shape, name
        assert torch.isfinite(o).all(), f"{name} has non-finite entries (unwritten output?)"
        err, base = rel_err(o, r64), rel_err(same, r64)
        bound = 2 * base + error_floor(dtype, x.shape[-1] + w.shape[0] + a.shape[0])
        assert err <= bound, f"{name}: rel err {err:.3e} vs torch-{dtype} {base:.3e} (bound {bound:.3e})"
    return got


SHAPES = [  # (N tokens, in, out, r, bias)
    (1, 16, 16, 1, True),
    (7, 33, 50, 7, False),
    (100, 70, 45, 16, True),
    (64, 100, 129, 100, True),
    (100, 64, 48, 16, True),   # 16-byte aligned rows: the GEMM takes the tensor-descriptor (TMA) path
    (37, 96, 80, 5, False),    # TMA path with ragged M and N edges
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + ("b" if s[4] else ""))
def test_matches_float64(backend, dtype, mode, p, shape):
    n, d_in, d_out, r, bias = shape
    run_and_compare(*make_case(n, d_in, d_out, r, dtype, mode, bias), scale=0.75, p=p)


@pytest.mark.parametrize("mode", list(MODES))
def test_3d_input_and_first_layer(backend, mode):
    """Leading dimensions, and x that does not require grad (first layer): dX is skipped."""
    x, w, b, a, bb = make_case(5, 40, 24, 8, torch.float32, mode, lead=(3,), x_grad=False)
    got = run_and_compare(x, w, b, a, bb, scale=2.0, p=0.1)
    assert got[1] is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_noncontiguous_input_and_grad(backend, p):
    base = torch.randn(2, 30, 2 * 48)
    x = base[:, 3:, ::2].requires_grad_()  # strided rows and columns, not viewable as 2-D without a copy
    assert not x.is_contiguous()
    _, w, b, a, bb = make_case(1, 48, 20, 5, torch.float32)
    run_and_compare(x, w, b, a, bb, scale=1.0, p=p)
    # A stride-0 gradient (from .sum()) must work too.
    y = lora_linear(x, w, b, a, bb, 1.0, p, seed=7)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(bb.grad).all()


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
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


def test_rank_above_kernel_limit_takes_the_torch_path(backend, monkeypatch):
    """r > 256 (one shrink tile would need a 64×512 fp32 accumulator) runs the PyTorch path, still correct."""
    calls = []
    if backend == "triton":
        monkeypatch.setattr(launch, "shrink", lambda *a, **k: calls.append(1))
    x, w, b, a, bb = make_case(9, 40, 30, 300, torch.float32)
    run_and_compare(x, w, b, a, bb, scale=0.1, p=0.0)
    assert calls == []


def test_wgrad_split_reduction(backend):
    """The token reduction split across programs gives the same dA/dB as one split."""
    if backend != "triton":
        pytest.skip("split reduction is a kernel detail")
    left, right = torch.randn(200, 7), torch.randn(200, 45)
    ref = left.double().t() @ right.double()
    for splits in (1, 2, 3, 7):
        assert rel_err(launch._wgrad(left, right, 0, 0.0, splits=splits), ref) < 1e-6


def test_empty_batch(backend):
    x, w, b, a, bb = make_case(0, 20, 12, 4, torch.float32)
    y = lora_linear(x, w, b, a, bb, 1.0, 0.2)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert a.grad.shape == a.shape and bb.grad.shape == bb.shape
    assert (a.grad == 0).all() and (bb.grad == 0).all()
    assert x.grad.shape == x.shape


def test_inference_saves_nothing_and_matches(backend):
    x, w, b, a, bb = make_case(9, 20, 12, 4, torch.float32)
    packed = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 0.5)
    assert packed == [] and y.grad_fn is None
    assert rel_err(y, lora_linear_ref(x, w, b, a, bb, 0.5, upcast=True)) < 1e-6


def test_nan_propagates_like_linear(backend):
    x, w, b, a, bb = make_case(6, 20, 12, 4, torch.float32)
    x = x.detach().clone()
    x[2, 5] = float("nan")
    y = lora_linear(x, w, b, a, bb, 1.0)
    ref = torch.nn.functional.linear(x, w, b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


def test_trainable_base_weight_gets_gradient(backend):
    """If a caller makes W or b trainable, they get correct gradients (not a silent None)."""
    x, w, b, a, bb = make_case(10, 16, 8, 4, torch.float32)
    w.requires_grad_(), b.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 1.0)
    g = torch.randn_like(y)
    dw, db = torch.autograd.grad(y, [w, b], g)
    assert rel_err(dw, g.double().t() @ x.double()) < 1e-6
    assert rel_err(db, g.double().sum(0)) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_revealed_by_identity(backend, p):
    """W = 0, A = B = I (in = r = out), s = 1: y = m ⊙ x / (1-p) reveals the mask; dA, dB, dX must use it."""
    d, n = 24, 50
    x = (torch.rand(n, d) + 0.5).requires_grad_()  # never zero, so a zero output means a dropped element
    w = torch.zeros(d, d)
    a = torch.eye(d).requires_grad_()
    bb = torch.eye(d).requires_grad_()
    y = lora_linear(x, w, None, a, bb, 1.0, p, seed=99)
    revealed = y.detach() != 0
    assert torch.allclose(y[revealed], x.detach()[revealed] / (1 - p))
    assert torch.equal(revealed, dropout_mask(99, (n, d), p, "cpu"))
    keep_frac = revealed.float().mean().item()
    assert abs(keep_frac - (1 - p)) < 4 * ((p * (1 - p)) / (n * d)) ** 0.5 + 1e-3
    g = torch.randn(n, d)
    dx, da, db = torch.autograd.grad(y, [x, a, bb], g)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    yr = lora_linear_ref(leaves[0], w.double(), None, leaves[1], leaves[2], 1.0, p, dropout_mask=revealed)
    rx, ra, rb = torch.autograd.grad(yr, leaves, g.double())
    for name, o, r in (("dx", dx, rx), ("dA", da, ra), ("dB", db, rb)):
        assert rel_err(o, r) < 1e-6, name


def test_dropout_reproducible_with_manual_seed(backend):
    x, w, b, a, bb = make_case(20, 32, 16, 4, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        y = lora_linear(x, w, b, a, bb, 1.0, 0.3)
        outs.append([y] + list(torch.autograd.grad(y, [x, a, bb], torch.ones_like(y))))
    for o1, o2 in zip(*outs):
        assert torch.equal(o1, o2)
    torch.manual_seed(124)
    y3 = lora_linear(x, w, b, a, bb, 1.0, 0.3)
    assert not torch.equal(y3, outs[0][0])


def test_dropout_mask_rows_independent(backend):
    m = dropout_mask(5, (64, 128), 0.5, "cpu")
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[:, 0], m[:, 1])
    assert not torch.equal(m, dropout_mask(6, (64, 128), 0.5, "cpu"))


# ------------------------------------------------------------------------------------------------------------
# gradcheck (float64 runs the PyTorch path: the kernels serve fp32/fp16/bf16)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck(mode, p):
    x, w, b, a, bb = make_case(5, 6, 4, 3, torch.float64, mode)

    def f(x_, a_, b_):
        return lora_linear(x_, w, b, a_, b_, 0.8, p, seed=42)

    assert torch.autograd.gradcheck(f, (x, a, bb))


# ------------------------------------------------------------------------------------------------------------
# What is saved for backward
# ------------------------------------------------------------------------------------------------------------

def saved_by(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("mode", list(MODES))
def test_saved_tensors(backend, mode, p):
    n, d_in, d_out, r = 40, 48, 32, 4
    x, w, b, a, bb = make_case(n, d_in, d_out, r, torch.float32, mode)
    saved, y = saved_by(lambda: lora_linear(x, w, b, a, bb, 1.0, p))
    params = {w.data_ptr(), a.data_ptr(), bb.data_ptr()}
    seeds = [t for t in saved if t.dim() == 0 and t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].device.type == "cpu", "the dropout seed is saved as one CPU int64 scalar"
    activations = [t for t in saved if t.data_ptr() not in params and t.dim() > 0]
    shapes = sorted(tuple(t.shape) for t in activations)
    if mode == "B":
        # t only: never x nor anything N×in, with or without dropout.
        assert shapes == [(n, r)]
        assert all(t.numel() < n * d_in for t in activations)
    elif mode == "AB":
        assert shapes == sorted([(n, d_in), (n, r)])
    else:  # A-only: x for dA; t is not needed (dB is never computed)
        assert shapes == [(n, d_in)]
    for t in activations:
        if t.shape == (n, d_in):
            assert t.data_ptr() == x.data_ptr(), "x must be saved as-is, not copied"
    y.sum().backward()  # and the saved state is enough for backward


def test_skipped_outputs_are_not_computed(backend, monkeypatch):
    """x without grad and B-only: backward launches only the dB reduction (no dgrad GEMM, no gB shrink)."""
    if backend != "triton":
        pytest.skip("counts kernel launches")
    calls = []
    for name in ("gemm", "shrink", "_wgrad"):
        orig = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    x, w, b, a, bb = make_case(16, 32, 16, 4, torch.float32, "B", x_grad=False)
    y = lora_linear(x, w, b, a, bb, 1.0, 0.1)
    assert calls == ["shrink", "gemm"]
    y.sum().backward()
    assert calls == ["shrink", "gemm", "_wgrad"]


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------

def _good():
    return make_case(4, 8, 6, 2, torch.float32)


@pytest.mark.parametrize("mutate, exc, word", [
    (lambda c: (c[0][..., :7],) + c[1:], ValueError, "x"),
    (lambda c: (c[0], c[1][:, :7]) + c[2:], ValueError, "weight expects 7"),
    (lambda c: c[:3] + (c[3][:, :7],) + c[4:], ValueError, "lora_A"),
    (lambda c: c[:4] + (c[4][:5],), ValueError, "lora_B"),
    (lambda c: c[:4] + (c[4][:, :1],), ValueError, "lora_B"),
    (lambda c: c[:2] + (c[2][:3],) + c[3:], ValueError, "bias"),
    (lambda c: c[:3] + (c[3][:0],) + (c[4][:, :0],), ValueError, "r = 0"),
    (lambda c: (c[0].half(),) + c[1:], TypeError, "dtype"),
    (lambda c: (c[0].long(),) + c[1:], TypeError, "x must be float"),
    (lambda c: c[:3] + (c[3].int(),) + c[4:], TypeError, "lora_A must be float"),
    (lambda c: (c[0].detach().numpy(),) + c[1:], TypeError, "x must be a torch.Tensor"),
    (lambda c: c[:1] + (c[1].reshape(-1),) + c[2:], ValueError, "weight"),
], ids=["x-features", "weight-shape", "A-shape", "B-out", "B-rank", "bias-shape", "rank0", "dtype-mismatch",
        "int-x", "int-A", "numpy-x", "weight-1d"])
def test_bad_arguments_name_the_argument(mutate, exc, word):
    args = mutate(_good())
    with pytest.raises(exc, match=word):
        lora_linear(*args, 1.0)


@pytest.mark.parametrize("scale, p, word", [(1.0, 1.0, "dropout_p"), (1.0, -0.1, "dropout_p"),
                                            (float("nan"), 0.0, "scale"), ("2", 0.0, "scale")])
def test_bad_scalars(scale, p, word):
    with pytest.raises(ValueError, match=word):
        lora_linear(*_good(), scale, p)


def test_autocast_runs_in_autocast_dtype(backend):
    x, w, b, a, bb = make_case(8, 32, 16, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    assert rel_err(y, lora_linear_ref(x, w, b, a, bb, 1.0, upcast=True)) < 2e-2


def test_strided_bias_and_broadcast_gradient(backend):
    """Review regressions: a bias with stride 2 must be read correctly, and a stride-0 (broadcast) gradient must
    not be given to a tensor descriptor."""
    x, w, _, a, bb = make_case(12, 64, 48, 4, torch.float32)
    bias = torch.randn(48, 2)[:, 0]
    assert bias.stride(0) == 2
    run_and_compare(x, w, bias, a, bb, scale=0.5, p=0.0)
    g = torch.ones(1, 48).expand(12, 48)
    assert not launch._tma_aligned(g)
    assert launch._tma_aligned(torch.ones(12, 48))
