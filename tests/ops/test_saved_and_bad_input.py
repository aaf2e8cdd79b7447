"""What is saved for backward (and what is not computed), and bad arguments named in the error."""

import pytest
import torch

from lora_kernels import lora_linear
from lora_kernels._backend import HAS_TRITON
from tests.helpers import MODES, check_saved_for_backward, make_case

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import launch


# ------------------------------------------------------------------------------------------------------------
# What is saved for backward
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("mode", list(MODES))
def test_saved_tensors(backend, mode, p):
    x, w, b, a, bb = make_case(40, 48, 32, 4, torch.float32, mode)
    y, _ = check_saved_for_backward(x, w, b, a, bb, p, mode)
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


def test_dropout_inside_a_cuda_graph_capture_is_refused(monkeypatch):
    """A drawn seed inside a capture would be baked into the graph (one mask on every replay): a clear error, and
    nothing is refused outside dropout or with an explicit seed."""
    from lora_kernels.ops.lora_linear import function

    monkeypatch.setattr(function, "_capturing", lambda x: True)
    x, w, b, a, bb = make_case(8, 16, 12, 4, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        lora_linear(x, w, b, a, bb, 1.0, 0.1)
    lora_linear(x, w, b, a, bb, 1.0, 0.0)
    lora_linear(x, w, b, a, bb, 1.0, 0.1, seed=3)


@pytest.mark.gpu
def test_gpu_capture_first_call_and_dropout_refusal():
    """On the GPU: a first call inside a capture (nothing compiled or tuned yet for this shape) does not crash and
    replays correctly; dropout with a drawn seed is refused inside the capture."""
    x, w, b, a, bb = (t.detach().cuda() for t in make_case(40, 96, 72, 8, torch.bfloat16, bias=True))
    static_x = x.clone()
    s = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        static_y = lora_linear(static_x, w, b, a, bb, 1.0, 0.0)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        want = lora_linear(static_x, w, b, a, bb, 1.0, 0.0)
        assert torch.allclose(static_y.float(), want.float(), rtol=0, atol=1e-2)
    graph2 = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.stream(s), torch.cuda.graph(graph2, stream=s):
            lora_linear(static_x, w, b, a, bb, 1.0, 0.1)
