"""What is saved for backward (and what is not computed), and bad arguments named in the error."""

import pytest
import torch

from lora_kernels import lora_linear
from lora_kernels._backend import HAS_TRITON
from tests.helpers import MODES, make_case

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import launch


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
