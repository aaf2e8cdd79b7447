"""lora_linear (kernels under the interpreter, and the PyTorch path) against a float64 reference: shapes, dtypes,
modes, layouts, edge cases, gradcheck.

Tolerance rule (``tests.helpers.run_and_compare``): relative error of ours vs float64 ≤ 2 × that of the same
computation done by PyTorch in the same dtype + a floor that scales with the dtype's eps and the reduction length
(``error_floor``: it only matters where PyTorch is exact by luck, which depends on the CPU's BLAS).  Checks with
no same-dtype PyTorch run to compare with use ``standalone_bound`` (the same bound, torch's error taken at its size).

Tiling and GEMM arrangements are in test_arrangement.py, dropout in test_dropout.py, saved tensors and bad input
in test_saved_and_bad_input.py.
"""

import pytest
import torch

from lora_kernels import lora_linear, lora_linear_ref
from lora_kernels._backend import HAS_TRITON
from tests.helpers import FLOAT_DTYPES, MODES, make_case, rel_err, run_and_compare, standalone_bound

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import launch

SHAPES = [  # (N tokens, in, out, r, bias)
    (1, 16, 16, 1, True),
    (7, 33, 50, 7, False),
    (100, 70, 45, 16, True),
    (64, 100, 129, 100, True),
    (100, 64, 48, 16, True),   # 16-byte aligned rows: the GEMM takes the tensor-descriptor (TMA) path
    (37, 96, 80, 5, False),    # TMA path with ragged M and N edges
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
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


def test_rank_above_kernel_limit_takes_the_torch_path(backend, monkeypatch):
    """r > 256 (one shrink tile would need a 64×512 fp32 accumulator) runs the PyTorch path, still correct."""
    calls = []
    if backend == "triton":
        monkeypatch.setattr(launch, "shrink", lambda *a, **k: calls.append(1))
    x, w, b, a, bb = make_case(9, 40, 30, 300, torch.float32)
    run_and_compare(x, w, b, a, bb, scale=0.1, p=0.0)
    assert calls == []


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
    assert rel_err(y, lora_linear_ref(x, w, b, a, bb, 0.5, upcast=True)) <= standalone_bound(torch.float32, 20 + 12 + 4)


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
    bound = standalone_bound(torch.float32, 10)  # both are reductions over the 10 tokens
    assert rel_err(dw, g.double().t() @ x.double()) <= bound
    assert rel_err(db, g.double().sum(0)) <= bound


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
