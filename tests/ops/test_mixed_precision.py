"""fp32 lora_A / lora_B on a 16-bit x, W, b (PEFT's default ``autocast_adapter_dtype``), on both backends (the
kernels under the interpreter, and the PyTorch path); then two op-level edge cases from the same issue: the seed
argument's shape and double backward (``create_graph=True``).

Design (docs/design.md, decision 14): the LoRA branch stays in fp32 as in PEFT -- t' and gB' are fp32 N×r, dA and dB
fp32 products of the 16-bit x / g with them -- while y and dX keep the 16-bit GEMM with the LoRA K-loop on tf32 (its
operands rounded to nearest in the kernel, which the interpreter reproduces exactly: only the summation order
differs from the GPU).

Bound (``run_and_compare``'s rule): relative error against float64 ≤ 2 × that of the PEFT-style composition in the
same dtypes (``lora_linear_ref`` with fp32 adapters: base in x's dtype, x cast to fp32 for the LoRA branch, the sum
cast back) + ``error_floor`` of the *output's* dtype: y and dX at the 16-bit floor, dA and dB at fp32's -- so a
LoRA gradient that went through a 16-bit intermediate (3e-3 from PEFT's, the issue) fails.
"""

import pytest
import torch

import lora_kernels.ops.fused_lora_linear  # noqa: F401  (registers torch.ops.lora_kernels.*)
from lora_kernels import dropout_mask, lora_linear, lora_linear_ref
from lora_kernels._backend import HAS_TRITON
from lora_kernels.ops.lora_linear import dispatch
from tests.helpers import MODES, check_saved_for_backward, error_floor, grads_of, make_case, rel_err, standalone_bound

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lora_kernels.ops.lora_linear import kernels, launch

HALF = [torch.float16, torch.bfloat16]
F32 = torch.float32
OPS = torch.ops.lora_kernels
SHAPES = [  # (N tokens, in, out, r, bias)
    (1, 16, 16, 1, True),     # M = 1
    (7, 33, 50, 7, False),    # r = 7, in / out not multiples of 16 (pointer loads, every edge masked)
    (37, 96, 80, 5, True),    # TMA-aligned rows, ragged M and N edges
    (100, 64, 48, 16, False),  # aligned TMA shape, r = 16
]


def mixed_case(n, d_in, d_out, r, dtype, mode="AB", bias=True, x_grad=True, lead=(), device="cpu"):
    """``make_case``'s values with x, W, b in ``dtype`` and lora_A, lora_B in fp32 (drawn in fp32, not rounded)."""
    x, w, b, a, bb = make_case(n, d_in, d_out, r, F32, mode, bias, x_grad=False, lead=lead, device=device)
    a_trains, b_trains = MODES[mode]
    return (x.to(dtype).requires_grad_(x_grad), w.to(dtype), b.to(dtype) if b is not None else None,
            a.detach().requires_grad_(a_trains), bb.detach().requires_grad_(b_trains))


def compare_mixed(x, w, b, a, bb, scale, p, seed=1234):
    """Forward + backward through lora_linear with fp32 adapters, each output against float64 with the bound of the
    module doc.  Returns {name: (ours, PEFT-style)} relative errors vs float64."""
    y = lora_linear(x, w, b, a, bb, scale, p, seed=seed)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    g = torch.randn_like(y)
    got = [y] + grads_of(y, g, [x, a, bb])
    mask = None
    if p > 0:  # the mask this very call drew (the kernels' Philox mask, or torch's on the PyTorch path)
        mask = dropout_mask(seed, (x[..., 0].numel(), x.shape[-1]), p, x.device, dtype=x.dtype,
                            r=a.shape[0]).reshape(x.shape)
    results = {}
    for kind, cast in (("ref64", lambda v: v.double()), ("peft", lambda v: v)):
        leaves = [cast(t.detach()).requires_grad_(t.requires_grad) for t in (x, a, bb)]
        yr = lora_linear_ref(leaves[0], cast(w), cast(b) if b is not None else None, leaves[1], leaves[2], scale, p,
                             dropout_mask=mask)
        results[kind] = [yr] + grads_of(yr, cast(g), leaves)
    k = x.shape[-1] + w.shape[0] + a.shape[0]
    errs = {}
    for name, o, r64, peft, want in zip(("y", "dx", "dA", "dB"), got, results["ref64"], results["peft"],
                                        (x.dtype, x.dtype, F32, F32)):
        if r64 is None:
            assert o is None, f"{name} should not have been computed"
            continue
        assert o is not None and o.shape == r64.shape, name
        assert o.dtype == want == peft.dtype, f"{name}: {o.dtype}, want {want} (PEFT's: {peft.dtype})"
        assert torch.isfinite(o).all(), f"{name} has non-finite entries (unwritten output?)"
        err, base = rel_err(o, r64), rel_err(peft, r64)
        bound = 2 * base + error_floor(o.dtype, k)
        assert err <= bound, f"{name}: rel err {err:.3e} vs PEFT-style {base:.3e} (bound {bound:.3e})"
        errs[name] = (err, base)
    return errs


# ------------------------------------------------------------------------------------------------------------
# Numerics against float64, every mode, dropout, bias, odd and aligned shapes, both 16-bit bases
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + ("b" if s[4] else ""))
def test_fp32_adapters_match_float64(backend, dtype, mode, p, shape):
    n, d_in, d_out, r, bias = shape
    compare_mixed(*mixed_case(n, d_in, d_out, r, dtype, mode, bias), scale=0.75, p=p)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_3d_input_without_grad_and_noncontiguous(backend, dtype):
    """Leading dimensions, an x that needs no gradient (dX skipped), and strided x and W."""
    x, w, b, a, bb = mixed_case(5, 40, 24, 8, dtype, lead=(3,), x_grad=False)
    errs = compare_mixed(x, w, b, a, bb, scale=2.0, p=0.1)
    assert "dx" not in errs
    base = torch.randn(2, 30, 2 * 48).to(dtype)
    xs = base[:, 3:, ::2].requires_grad_()
    _, w, b, a, bb = mixed_case(1, 48, 20, 5, dtype)
    compare_mixed(xs, w.t().contiguous().t(), b, a, bb, scale=1.0, p=0.3)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lora_gradients_at_fp32_precision_not_16_bit(backend, dtype):
    """The point of the change: with fp32 adapters dA and dB are fp32-accurate, as PEFT's (1e-7 relative), where
    the same adapters rounded to the base dtype put them at the 16-bit level (the issue's 3e-3 from PEFT)."""
    torch.manual_seed(3)
    x, w, b, a, bb = mixed_case(256, 128, 96, 16, dtype)
    errs = compare_mixed(x, w, b, a, bb, scale=0.5, p=0.1)
    for name in ("dA", "dB"):
        assert errs[name][0] <= 10 * error_floor(F32, 0), (name, errs[name])
    # The same values with 16-bit adapters (the only option before): gradients a thousand times further off.
    a16, b16 = (v.detach().to(dtype).requires_grad_() for v in (a, bb))
    y = lora_linear(x, w, b, a16, b16, 0.5, 0.1, seed=1234)
    g = torch.randn_like(y)
    d_a, d_b = torch.autograd.grad(y, (a16, b16), g)
    mask = dropout_mask(1234, tuple(x.shape), 0.1, x.device, dtype=dtype, r=16)
    leaves = [v.detach().double().requires_grad_() for v in (a16, b16)]
    yr = lora_linear_ref(x.detach().double(), w.double(), b.double(), *leaves, 0.5, 0.1, dropout_mask=mask)
    r_a, r_b = torch.autograd.grad(yr, leaves, g.double())
    assert min(rel_err(d_a, r_a), rel_err(d_b, r_b)) > 100 * max(errs["dA"][0], errs["dB"][0])


# ------------------------------------------------------------------------------------------------------------
# Kernel details: t' in fp32, tf32 rounding of the LoRA K-loop, flags
# ------------------------------------------------------------------------------------------------------------

def test_intermediates_are_fp32_and_every_output_written(kernels, monkeypatch):
    """t' and gB' are fp32 (allocated through the poisoned ``_empty``), y and dX in x's dtype."""
    made = []
    orig = launch._empty
    monkeypatch.setattr(launch, "_empty", lambda shape, device, dtype: made.append((tuple(shape), dtype))
                        or orig(shape, device, dtype))
    n, d_in, d_out, r = 37, 96, 80, 5
    x, w, b, a, bb = mixed_case(n, d_in, d_out, r, torch.bfloat16, "AB")
    y = lora_linear(x, w, b, a, bb, 1.0, 0.2, seed=3)
    assert (n, r) in [s for s, d in made if d == F32] and ((n, d_out), torch.bfloat16) in made
    made.clear()
    y.float().sum().backward()
    assert ((n, r), F32) in made and ((n, d_in), torch.bfloat16) in made  # gB' fp32, dX bf16
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == bb.grad.dtype == F32


def test_launch_flags(kernels):
    """Same-dtype calls keep their flags; fp32 adapters: fp32 products (IEEE unless TF32 is allowed) for the shrink
    and reductions, tf32 for the 16-bit GEMM's LoRA K-loop."""
    bf, h = torch.bfloat16, torch.float16
    assert launch._dot_flags(h, F32) == dict(UPCAST=True, INPUT_PRECISION="ieee")
    assert launch._dot_flags(F32) == dict(UPCAST=False, INPUT_PRECISION="ieee")
    assert launch._lora_loop_flags(h, F32) == dict(LORA_UPCAST=False, LORA_PRECISION="tf32")
    assert launch._lora_loop_flags(bf, bf) == dict(LORA_UPCAST=True, LORA_PRECISION="ieee")  # interpreter upcast
    assert launch.lora_dtype(bf, F32) == F32 and launch.lora_dtype(h, h) == h
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert launch._dot_flags(bf, F32)["INPUT_PRECISION"] == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


if HAS_TRITON:
    @triton.jit
    def _round_tf32_probe(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, kernels._round_tf32(tl.load(x_ptr + offs)))


def test_round_tf32_is_round_to_nearest_ties_away(kernels):
    """``_round_tf32``: to 10 explicit mantissa bits, ties away from zero (``cvt.rna.tf32.f32``), exact values kept."""
    u = 2.0**-10  # tf32's ulp at 1
    vals = [1.0, 1 + u / 2, 1 + u / 2 - 2**-23, 1 + u / 2 + 2**-23, 1 + 3 * u / 2, -(1 + u / 2), 3.0, 0.0,
            -0.0, 2.0**-130, 1e30, -7.0 * 2**-20]
    want = [1.0, 1 + u, 1.0, 1 + u, 1 + 2 * u, -(1 + u), 3.0, 0.0, -0.0, 2.0**-130, None, -7.0 * 2**-20]
    x = torch.tensor(vals + [0.0] * (16 - len(vals)), dtype=F32)
    y = torch.empty_like(x)
    _round_tf32_probe[(1,)](x, y, N=16)
    bits = y.view(torch.int32)
    assert ((bits & 0x1FFF) == 0).all(), "low 13 mantissa bits must be zero"
    for v, got, w_ in zip(vals, y.tolist(), want):
        if w_ is not None:
            assert got == w_, (v, got, w_)
    assert abs(y[10].item() / 1e30 - 1) <= 2.0**-11


# ------------------------------------------------------------------------------------------------------------
# Saved for backward: the contract per mode is unchanged (t' is fp32 N×r)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("mode", list(MODES))
def test_saved_tensors(backend, mode, p):
    x, w, b, a, bb = mixed_case(40, 48, 32, 4, torch.bfloat16, mode)
    y, acts = check_saved_for_backward(x, w, b, a, bb, p, mode)
    for t in acts:
        if t.shape == x.shape:
            assert t.dtype == torch.bfloat16
        else:
            assert t.dtype == F32, "t' is kept in fp32 (dB = gᵀ t' at PEFT's precision)"
    y.float().sum().backward()


# ------------------------------------------------------------------------------------------------------------
# Custom ops with mixed dtypes, autocast, bad dtype combinations
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_mixed_dtypes(backend, p):
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
    x, w, b, a, bb = mk(13, 24), mk(20, 24), mk(20), mk(4, 24, dt=F32), mk(20, 4, dt=F32)
    seed = torch.tensor(11, dtype=torch.int64)
    torch.library.opcheck(OPS.lora_fwd.default, (x, w, b, a, bb, 0.5, p, seed))
    torch.library.opcheck(OPS.lora_fwd.default, (x, w, None, a, bb, 0.5, p, seed))
    y, t = OPS.lora_fwd(x, w, b, a, bb, 0.5, p, seed)
    assert y.dtype == torch.bfloat16 and t.dtype == F32
    g = torch.randn(y.shape, generator=gen).to(torch.bfloat16)
    for flags in ((True, True, True), (True, False, True), (False, True, False)):
        torch.library.opcheck(OPS.lora_bwd.default, (g, x, t, w, a, bb, 0.5, p, seed, *flags))
    dx, d_a, d_b = OPS.lora_bwd(g, x, t, w, a, bb, 0.5, p, seed, True, True, True)
    assert dx.dtype == torch.bfloat16 and d_a.dtype == d_b.dtype == F32


def test_autocast_runs_everything_in_the_autocast_dtype(backend):
    """PEFT under autocast: its fp32 lora_A / lora_B run through autocast's F.linear, so the whole layer is in the
    autocast dtype; so is ours (the very same call as with adapters cast to it), and fp32 grads come back."""
    x, w, b, a, bb = mixed_case(8, 32, 16, 4, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 1.0)
    want = lora_linear(x, w, b, a.to(torch.bfloat16), bb.to(torch.bfloat16), 1.0)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().sum().backward()
    assert a.grad.dtype == bb.grad.dtype == F32
    # Under autocast the operands' own dtypes do not matter (as for nn.Linear / PEFT): an fp32 x on a bf16 W works.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = lora_linear(x.detach().float(), w, b, a, bb, 1.0)
    assert y32.dtype == torch.bfloat16


def _dt_case(x_dt, w_dt=None, a_dt=F32, b_dt=None):
    x, w, b, a, bb = make_case(4, 8, 6, 2, F32)
    return (x.detach().to(x_dt), w.to(w_dt or x_dt), b.to(w_dt or x_dt), a.detach().to(a_dt),
            bb.detach().to(b_dt or a_dt))


@pytest.mark.parametrize("case, word", [
    (_dt_case(torch.bfloat16, a_dt=F32, b_dt=torch.bfloat16), "must share one dtype"),
    (_dt_case(torch.bfloat16, a_dt=torch.float16), "adapters must be in x's dtype, or float32"),
    (_dt_case(F32, a_dt=torch.float64), "adapters must be in x's dtype"),
    (_dt_case(F32, a_dt=torch.bfloat16), "adapters must be in x's dtype"),
    (_dt_case(torch.float64, a_dt=F32), "adapters must be in x's dtype"),
    (_dt_case(torch.bfloat16, w_dt=F32), "weight has dtype torch.float32 but x has torch.bfloat16"),
], ids=["A32-B16", "fp16-adapters-on-bf16", "fp64-adapters-on-fp32", "bf16-adapters-on-fp32", "fp32-on-fp64",
        "fp32-W-bf16-x"])
def test_bad_dtype_combinations_are_named(case, word):
    with pytest.raises(TypeError, match=word):
        lora_linear(*case, 1.0)


# ------------------------------------------------------------------------------------------------------------
# Op-level edge cases from the same issue: the seed's shape, double backward
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [torch.tensor([1, 2]), torch.zeros(2, 1, dtype=torch.int64), torch.tensor(1.0),
                                  torch.tensor(True), -1, 2**63, 1.5, True],
                         ids=["vector", "2x1", "float-tensor", "bool-tensor", "negative", "2^63", "float", "bool"])
def test_bad_seed_is_refused(seed):
    x, w, b, a, bb = make_case(4, 8, 6, 2, F32)
    with pytest.raises(ValueError, match="seed must be"):
        lora_linear(x, w, b, a, bb, 1.0, 0.1, seed=seed)


def test_one_element_seed_tensors_are_accepted(backend):
    x, w, b, a, bb = make_case(4, 8, 6, 2, F32)
    ys = [lora_linear(x, w, b, a, bb, 1.0, 0.5, seed=s) for s in (7, torch.tensor(7), torch.tensor([[7]]),
                                                                   torch.tensor([7], dtype=torch.int32))]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def _second_order(fn, x, w, b, a, bb, scale, p, seed):
    """∂/∂(x, A, B) of ‖dx‖² + ‖dA‖² + ‖dB‖², the first-order gradients taken with create_graph=True."""
    leaves = [t for t in (x, a, bb) if t.requires_grad]
    y = fn(x, w, b, a, bb, scale, p, seed)
    first = torch.autograd.grad(y.float().pow(2).sum(), leaves, create_graph=True)
    pen = sum(f.float().pow(2).sum() for f in first)
    return list(first) + list(torch.autograd.grad(pen, leaves))


@pytest.mark.parametrize("mode", ["AB", "A", "B-frozen-x"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("adapters", ["same", "fp32"])
def test_double_backward_matches_float64(backend, mode, p, adapters):
    """create_graph=True runs a differentiable composition (the forward's own mask) on both backends: first and
    second derivatives against the float64 reference."""
    m = "B" if mode == "B-frozen-x" else mode
    dtype = F32 if adapters == "same" else torch.bfloat16
    case = mixed_case if adapters == "fp32" else make_case
    x, w, b, a, bb = case(9, 20, 12, 4, dtype, m, x_grad=mode != "B-frozen-x")
    seed = 42
    got = _second_order(lambda *v: lora_linear(*v[:-1], seed=v[-1]), x, w, b, a, bb, 0.8, p, seed)
    mask = (dropout_mask(seed, tuple(x.shape), p, x.device, dtype=dtype, r=4) if p > 0 else None)

    def ref(x_, w_, b_, a_, bb_, s_, p_, _seed, cast):
        return lora_linear_ref(x_, cast(w_), cast(b_), a_, bb_, s_, p_, dropout_mask=mask)

    leaves64 = [v.detach().double().requires_grad_(v.requires_grad) for v in (x, a, bb)]
    want = _second_order(lambda x_, w_, b_, a_, bb_, s_, p_, sd: ref(x_, w_, b_, a_, bb_, s_, p_, sd,
                                                                      lambda v: v.double()),
                         leaves64[0], w, b, leaves64[1], leaves64[2], 0.8, p, seed)
    assert len(got) == len(want)
    floor_dt = F32 if adapters == "same" else torch.bfloat16
    for o, r in zip(got, want):
        assert torch.isfinite(o).all()
        assert rel_err(o, r) <= 3 * standalone_bound(floor_dt, 20 + 12 + 4), (rel_err(o, r))


def test_double_backward_in_b_only_mode_with_an_input_needing_grad_raises(backend):
    """B-only never keeps x, and ∂²L through dB = gᵀt' needs it: a clear error, not a wrong second derivative."""
    x, w, b, a, bb = make_case(6, 10, 8, 3, F32, "B")
    y = lora_linear(x, w, b, a, bb, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="double backward .* B-only"):
        torch.autograd.grad(y.pow(2).sum(), (x, bb), create_graph=True)
    # Without create_graph the same call is the ordinary (kernel) backward.
    y = lora_linear(x, w, b, a, bb, 1.0, 0.0)
    dx, d_b = torch.autograd.grad(y.pow(2).sum(), (x, bb))
    assert dx.grad_fn is None and d_b.shape == bb.shape


@pytest.mark.parametrize("mode", ["AB", "A"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradgradcheck_float64(mode, p):
    """float64 runs the PyTorch path: its double backward is checked by finite differences."""
    x, w, b, a, bb = make_case(5, 6, 4, 3, torch.float64, mode)
    leaves = [t for t in (x, a, bb) if t.requires_grad]

    def f(*ins):
        it = iter(ins)
        args = [next(it) if t.requires_grad else t for t in (x, a, bb)]
        return lora_linear(args[0], w, b, args[1], args[2], 0.8, p, seed=42)

    assert torch.autograd.gradgradcheck(f, leaves)


def test_double_backward_keeps_the_kernels_for_plain_backward(kernels, monkeypatch):
    """Only create_graph=True takes the composition: a plain backward still launches the kernels."""
    calls = []
    orig = launch._wgrad
    monkeypatch.setattr(launch, "_wgrad", lambda *a_, **k: calls.append(1) or orig(*a_, **k))
    x, w, b, a, bb = mixed_case(16, 32, 16, 4, torch.bfloat16, "AB")
    lora_linear(x, w, b, a, bb, 1.0, 0.1).float().sum().backward()
    assert len(calls) == 2  # dA and dB reductions
    calls.clear()
    y = lora_linear(x, w, b, a, bb, 1.0, 0.1)
    torch.autograd.grad(y.float().sum(), (a, bb), create_graph=True)
    assert calls == []


# ------------------------------------------------------------------------------------------------------------
# On a GPU: real tensor cores (tf32 LoRA K-loop, IEEE fp32 shrink and reductions), pinned and autotuned
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1000, 1024, 2816, 16, True), (777, 1000, 520, 7, False),
                                   (4096, 512, 512, 64, True)], ids=lambda s: "x".join(map(str, s[:4])))
def test_gpu_fp32_adapters_match_float64(dtype, mode, p, shape):
    n, d_in, d_out, r, bias = shape
    assert dispatch.backend(torch.empty(0, device="cuda", dtype=dtype), r) is launch
    compare_mixed(*mixed_case(n, d_in, d_out, r, dtype, mode, bias, device="cuda"), scale=0.5, p=p)
