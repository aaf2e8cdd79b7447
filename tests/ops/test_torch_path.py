"""The pure-PyTorch backend (``torch_path``): float64-reference numerics of every mode, the dropout mask it draws
(the one ``dropout_mask`` reveals, identical in forward, dX and dA, drawn once per pass), what it saves for
backward, and the CPU mode of the benchmark that times it.

Every test forces the PyTorch path (``dispatch.use_triton`` → False), so they mean the same with or without
``TRITON_INTERPRET=1``.
"""

import pytest
import torch

from lora_kernels import FusedLoRALinear, dropout_mask, lora_linear, lora_linear_ref
from lora_kernels.ops.lora_linear import dispatch, torch_path
from lora_kernels.ops.lora_linear.base_weight import BaseWeight, DenseWeight
from tests.helpers import (MODES, check_saved_for_backward, grads_of, load_repo_module, make_case, rel_err,
                           run_and_compare, standalone_bound)


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)


@pytest.fixture
def draws(monkeypatch):
    """Shapes of the uniforms the mask is made from, one entry per draw."""
    seen = []
    orig = torch_path._uniforms
    monkeypatch.setattr(torch_path, "_uniforms", lambda seed, n, k, dev: seen.append((n, k)) or orig(seed, n, k, dev))
    return seen


# ------------------------------------------------------------------------------------------------------------
# Numerics against float64
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(37, 45, 29, 5, (), True), (7, 33, 65, 3, (2, 3), False), (1, 8, 8, 1, (), True)],
                         ids=["37x45to29r5", "lead2x3x7x33to65r3-nobias", "1x8to8r1"])
def test_matches_float64_reference(shape, mode, p, dtype):
    """y, dX, dA, dB vs float64 lora_linear_ref with the mask this call drew (2 × torch's own error + floor)."""
    n, d_in, d_out, r, lead, bias = shape
    case = make_case(n, d_in, d_out, r, dtype, mode, bias=bias, lead=lead)
    if dtype != torch.float64:
        run_and_compare(*case, 0.7, p, seed=77)
        return
    # float64 is its own reference dtype: the composition of plain ops with the same mask, to a few ulps
    x, w, b, a, bb = case
    y = lora_linear(x, w, b, a, bb, 0.7, p, seed=77)
    g = torch.randn_like(y)
    got = [y] + grads_of(y, g, [x, a, bb])
    yr = lora_linear_ref(x, w, b, a, bb, 0.7, p, seed=77)
    for name, o, ref in zip(("y", "dx", "dA", "dB"), got, [yr] + grads_of(yr, g, [x, a, bb])):
        assert (o is None) == (ref is None), name
        if o is not None:
            assert o.dtype == torch.float64 and rel_err(o, ref) < 1e-13, name


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("mode", list(MODES))
def test_x_without_grad(mode, p):
    """dX not asked for (first layer): dA / dB still right, dX not computed."""
    case = make_case(19, 24, 12, 3, torch.float32, mode, x_grad=False)
    got = run_and_compare(*case, 1.5, p, seed=5)
    assert got[1] is None


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_float64(mode, p):
    x, w, b, a, bb = make_case(5, 6, 4, 3, torch.float64, mode)
    assert torch.autograd.gradcheck(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, 0.8, p, seed=42), (x, a, bb))


class _NotDense(BaseWeight):
    """A base weight without a dense fast path (as a quantized W would be): the generic branch of the dgrad."""

    def __init__(self, w):
        self.w = w
        self.out_features, self.in_features = w.shape
        self.dtype, self.device = w.dtype, w.device

    def linear(self, x2d, bias):
        return torch.nn.functional.linear(x2d, self.w, bias)

    def grad_input(self, g2d):
        return g2d @ self.w

    def dense(self):
        return self.w


@pytest.mark.parametrize("base_type", [DenseWeight, _NotDense])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, True), (False, True, False), (True, True, False)],
                         ids=["dx-dA-dB", "dx-dB", "dA", "dx-dA"])
def test_whole_backward_matches_the_entry_points(need, p, base_type):
    """``torch_path.lora_bwd`` (one mask draw) gives what the launch-compatible entry points give, any base type."""
    need_dx, need_da, need_db = need
    n, d_in, d_out, r, s, seed = 23, 40, 18, 4, 0.6, 321
    x, w, _, a, bb = (t.detach() for t in make_case(n, d_in, d_out, r, torch.float64))
    g = torch.randn(n, d_out, dtype=torch.float64)
    base = base_type(w)
    t = torch_path.shrink(x, a, seed, p, s / (1 - p))
    got = torch_path.lora_bwd(g, x, t, base, a, bb, s, p, seed, need_dx=need_dx, need_dA=need_da, need_dB=need_db)
    gb = torch_path.shrink(g, bb.t(), 0, 0.0, s / (1 - p))
    want = (torch_path.gemm(g, base, False, None, gb, a, seed, p, True) if need_dx else None,
            torch_path.grad_A(x, gb, seed, p, a.dtype) if need_da else None,
            torch_path.grad_B(g, t, bb.dtype) if need_db else None)
    for name, o, ref in zip(("dx", "dA", "dB"), got, want):
        assert (o is None) == (ref is None), name
        if o is not None:
            assert rel_err(o, ref) < 1e-14, name
    # and against the chain rule written out in float64
    keep = (dropout_mask(seed, (n, d_in), p, "cpu", dtype=torch.float64).double() if p
            else torch.ones(n, d_in, dtype=torch.float64))
    xd = keep * x / (1 - p)
    if need_dx:
        assert rel_err(got[0], g @ w + s * keep * (g @ bb @ a) / (1 - p)) < 1e-13
    if need_da:
        assert rel_err(got[1], s * (g @ bb).t() @ xd) < 1e-13
    if need_db:
        assert rel_err(got[2], s * g.t() @ (xd @ a.t())) < 1e-13


def test_empty_batch():
    x, w, b, a, bb = make_case(0, 20, 12, 4, torch.float32)
    y = lora_linear(x, w, b, a, bb, 1.0, 0.2)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert (a.grad == 0).all() and (bb.grad == 0).all() and x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------------------
# The dropout mask
# ------------------------------------------------------------------------------------------------------------

MASK_SHAPES = [(1, 1, 0.5), (37, 45, 0.1), (300, 257, 0.3), (64, 1024, 0.9), (2048, 1024, 0.1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, k, p", MASK_SHAPES)
def test_mask_identity(n, k, p, dtype):
    """dropout_mask = keep_mask = the 0/1 multiplier every pass uses, for every dtype; and it is still the
    definition it always was (torch.rand with a seeded generator, ≥ p), so a seed's mask did not change."""
    seed = 2**40 + 17
    revealed = dropout_mask(seed, (n, k), p, "cpu", dtype=dtype)
    assert revealed.dtype == torch.bool and revealed.shape == (n, k)
    assert torch.equal(revealed, torch_path.keep_mask(seed, n, k, p, "cpu"))
    mult = torch_path._keep_mult(seed, n, k, p, dtype, "cpu")
    assert mult.dtype == dtype and torch.equal(mult != 0, revealed)
    assert torch.equal(mult[revealed], torch.ones_like(mult[revealed]))
    assert torch.equal(revealed, torch.rand((n, k), generator=torch.Generator().manual_seed(seed)) >= p)
    if n * k >= 8:
        assert not torch.equal(revealed, dropout_mask(seed + 1, (n, k), p, "cpu"))


def test_keep_fraction():
    p, n, k = 0.1, 512, 1024
    frac = torch_path.keep_mask(3, n, k, p, "cpu").double().mean().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / (n * k)) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("n, d", [(50, 24), (700, 200)])
def test_mask_revealed_in_forward_dx_and_dA(n, d, mode, p, dtype):
    """W = 0, A = B = I, s = 1: y = m ⊙ x / (1-p) reveals the forward's mask; it must be dropout_mask's, and
    dX = m ⊙ g / (1-p), dA = gᵀ (m ⊙ x) / (1-p) must use the same one (dB follows from t)."""
    a_tr, b_tr = MODES[mode]
    x = (torch.rand(n, d, dtype=dtype) + 0.5).requires_grad_()  # never zero: a zero output is a dropped element
    w = torch.zeros(d, d, dtype=dtype)
    a = torch.eye(d, dtype=dtype).requires_grad_(a_tr)
    bb = torch.eye(d, dtype=dtype).requires_grad_(b_tr)
    y = lora_linear(x, w, None, a, bb, 1.0, p, seed=99)
    revealed = y.detach() != 0
    assert torch.equal(revealed, dropout_mask(99, (n, d), p, "cpu", dtype=dtype))
    g = torch.rand(n, d, dtype=dtype) + 0.5
    dx, da, db = grads_of(y, g, [x, a, bb])
    m = revealed.to(dtype)
    assert torch.allclose(dx, m * g / (1 - p), rtol=1e-6, atol=0)
    if a_tr:
        assert torch.allclose(da, g.t() @ (m * x.detach()) / (1 - p), rtol=1e-5)
    if b_tr:
        assert torch.allclose(db, g.t() @ (m * x.detach()) / (1 - p), rtol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_mask_drawn_once_per_pass(mode, draws):
    """One draw in forward and one in backward (dX and dA share it); none at p = 0 or when no gradient needs it."""
    n, d_in = 9, 14
    x, w, b, a, bb = make_case(n, d_in, 6, 2, torch.float32, mode)
    y = lora_linear(x, w, b, a, bb, 1.0, 0.3)
    assert draws == [(n, d_in)]
    y.sum().backward()
    assert draws == [(n, d_in)] * 2
    draws.clear()
    y = lora_linear(x, w, b, a, bb, 1.0, 0.0)
    y.sum().backward()
    assert draws == []
    x2, w, b, a, bb = make_case(n, d_in, 6, 2, torch.float32, "B", x_grad=False)
    lora_linear(x2, w, b, a, bb, 1.0, 0.3).sum().backward()  # dB only: needs t, not the mask
    assert draws == [(n, d_in)]


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("train_a", [True, False])
def test_checkpoint_regenerates_the_mask(reentrant, train_a):
    layer = FusedLoRALinear(24, 16, r=4, lora_dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_A.requires_grad_(train_a)
    x = torch.randn(5, 24, requires_grad=True)
    trained = [x, layer.lora_B] + ([layer.lora_A] if train_a else [])

    def run(ckpt):
        for t in trained:
            t.grad = None
        torch.manual_seed(7)
        if ckpt:
            y = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(layer(t)), x, use_reentrant=reentrant)
        else:
            y = torch.tanh(layer(x))
        y.sum().backward()  # (reentrant checkpointing does not support autograd.grad)
        return [t.grad.clone() for t in trained]

    for plain, ck in zip(run(False), run(True)):
        assert torch.equal(plain, ck)


# ------------------------------------------------------------------------------------------------------------
# What is saved for backward
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("mode", list(MODES))
def test_saved_for_backward(mode, p, dtype):
    """B-only: t (N×r) and the seed, never x nor anything N×in; AB: x itself (no copy), t and the seed; A-only: x
    and the seed.  No mask is stored, with or without dropout: the backward draws it again from the seed."""
    x, w, b, a, bb = make_case(40, 48, 32, 4, dtype, mode)
    y, acts = check_saved_for_backward(x, w, b, a, bb, p, mode)
    assert all(t.dtype == dtype for t in acts)
    y.sum().backward()


# ------------------------------------------------------------------------------------------------------------
# The benchmark's CPU mode (tiny shapes: bookkeeping only, no timing claim)
# ------------------------------------------------------------------------------------------------------------

def test_bench_cpu_mode(tmp_path):
    pytest.importorskip("peft")
    bench = load_repo_module("bench", "bench_lora_linear.py")
    rows = bench.main(["--device", "cpu", "--tokens", "13", "--d-in", "24", "--d-out", "20", "--rank", "4",
                       "--reps", "15", "--out", str(tmp_path), "--tag", "cpu_test"])
    cases = {(r["dropout"], r["mode"]) for r in rows}
    assert cases == {(0.0, "fwd"), (0.0, "fwdbwd-AB"), (0.0, "fwdbwd-B"), (0.1, "fwdbwd-AB"), (0.1, "fwdbwd-B")}
    assert {r["provider"] for r in rows} == {"linear", "peft", "ours"}
    assert all(r["ratio"] == 1.0 for r in rows if r["provider"] == "linear")
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)
    bound = standalone_bound(torch.float32, 24 + 20 + 4)
    for r in rows:
        assert all(r[f"err_{k}"] <= bound for k in ("y", "dx", "dA", "dB"))
        if r["dropout"] == 0.0:  # ours vs PEFT's layer in the same run
            assert all(r[f"err_vs_peft_{k}"] <= bound for k in ("y", "dx", "dA", "dB"))
    ours_b = [r for r in rows if r["provider"] == "ours" and r["mode"] == "fwdbwd-B"]
    assert ours_b and all(abs(r["saved_mb"] * 2**20 - (13 * 4 * 4 + 8)) < 1 for r in ours_b)  # t + seed, never x
    assert (tmp_path / "lora_linear_cpu_test.csv").exists()


def test_reference_helper_unchanged():
    """lora_linear_ref(seed=) draws the PyTorch path's mask (the tests above rely on it through dropout_mask)."""
    x, w, b, a, bb = make_case(6, 10, 7, 2, torch.float64)
    y = lora_linear(x, w, b, a, bb, 1.0, 0.5, seed=4)
    assert rel_err(y, lora_linear_ref(x, w, b, a, bb, 1.0, 0.5, seed=4)) < 1e-14
