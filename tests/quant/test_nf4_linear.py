"""NF4Linear (forward, views, state dict, dtype casts, errors) and quantize_model."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels.quant import NF4Linear, dequantize_nf4_ref, quantize_model, quantize_nf4
from tests.helpers import IDX, assert_unchanged, snapshot, tiny


def make_linear(d_in=100, d_out=37, bias=True, dtype=torch.float32):
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        if bias:
            lin.bias.copy_(torch.randn(d_out))  # non-zero, O(1): a dropped or mis-cast bias shows
    return lin


@pytest.mark.parametrize("compute_dtype, x_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_is_linear_on_the_dequantized_weight(compute_dtype, x_dtype, double_quant):
    """bitsandbytes' Linear4bit.forward: x and bias cast to the compute dtype, F.linear with W dequantized to it,
    the result cast back to x's dtype -- the same ops, so the same bits."""
    lin = make_linear()
    m = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 100, dtype=x_dtype)
    y = m(x)
    w = dequantize_nf4_ref(quantize_nf4(lin.weight, 64, double_quant), compute_dtype)
    ref = F.linear(x.to(compute_dtype), w, lin.bias.detach().to(compute_dtype)).to(x_dtype)
    assert y.dtype == x_dtype and y.shape == (3, 5, 37) and torch.equal(y, ref)
    assert torch.equal(m.dequantize(), w) and m.dequantize().dtype == compute_dtype


def test_gradient_reaches_x_and_nothing_trains():
    m = NF4Linear.from_linear(make_linear())
    assert not any(p.requires_grad for p in m.parameters())
    x = torch.randn(4, 100, requires_grad=True)
    g = torch.randn(4, 37)
    m(x).backward(g)
    assert torch.allclose(x.grad, g @ m.dequantize(), rtol=1e-5, atol=1e-6)


def test_nf4_tensor_is_a_view_of_the_buffers():
    m = NF4Linear.from_linear(make_linear(), double_quant=True)
    q = m.nf4_tensor()
    for field, buf in (("packed", m.weight), ("absmax", m.absmax), ("code", m.code),
                       ("nested_absmax", m.nested_absmax), ("nested_code", m.nested_code)):
        assert getattr(q, field).data_ptr() == buf.data_ptr(), field
    assert q.shape == (37, 100) and q.offset == m.offset.item() and q.dtype == m.compute_dtype


def test_from_nf4_shares_storage_and_keeps_the_offset():
    q = quantize_nf4(torch.randn(24, 40), 32, double_quant=True, compute_dtype=torch.bfloat16)
    bias = torch.randn(24)
    m = NF4Linear.from_nf4(q, bias)
    assert m.weight.data_ptr() == q.packed.data_ptr() and m.absmax.data_ptr() == q.absmax.data_ptr()
    assert m.bias.data_ptr() == bias.data_ptr() and not m.bias.requires_grad
    assert m.nf4_tensor().offset == q.offset and m.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_into_a_blank_layer(double_quant):
    src = NF4Linear.from_linear(make_linear(), blocksize=128, double_quant=double_quant)
    sd = src.state_dict()
    nested_keys = {"nested_absmax", "nested_code"}
    assert set(sd) == {"weight", "absmax", "code", "offset", "bias"} | (nested_keys if double_quant else set())
    dst = NF4Linear(100, 37, blocksize=128, double_quant=double_quant)
    before = float(dst.nf4_tensor().offset)  # the view reads the buffer itself: loading must show through
    dst.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k
    if double_quant:
        assert before == 0.0 and dst.nf4_tensor().offset == src.nf4_tensor().offset != 0.0
    x = torch.randn(6, 100)
    assert torch.equal(dst(x), src(x))


def test_dtype_casts_move_the_state_but_keep_its_dtypes():
    m = NF4Linear.from_linear(make_linear(), double_quant=True)
    dtypes = {n: b.dtype for n, b in m.named_buffers()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        cast(m)
        assert {n: b.dtype for n, b in m.named_buffers()} == dtypes
    assert m.bias.dtype == torch.float64 and m.compute_dtype == torch.float32
    assert m(torch.randn(2, 100)).dtype == torch.float32


@pytest.mark.parametrize("call, exc, match", [
    (lambda: NF4Linear.from_linear(nn.Conv1d(3, 4, 1)), TypeError, "linear must be an nn.Linear"),
    (lambda: NF4Linear.from_linear(make_linear(), blocksize=48), ValueError, "blocksize must be one of"),
    (lambda: NF4Linear(0, 4), ValueError, "in_features must be a positive int"),
    (lambda: NF4Linear(4, 4, blocksize=100), ValueError, "blocksize must be one of"),
    (lambda: NF4Linear(4, 4, compute_dtype=torch.int32), ValueError, "compute_dtype must be a float dtype"),
    (lambda: NF4Linear.from_nf4(torch.zeros(3)), TypeError, "q must be an NF4Tensor"),
    (lambda: NF4Linear.from_nf4(quantize_nf4(torch.randn(4, 8)), torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
])
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


class ScaledLinear(nn.Linear):
    """A subclass with its own forward: quantize_model must leave it alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_quantize_model_replaces_exact_linears_except_skipped_names():
    model = tiny()
    model.blocks[0]["gate"] = ScaledLinear(16, 16, dtype=torch.float64)
    model.blocks[1]["v_alias"] = model.blocks[1]["v_proj"]  # one module under two names
    ref = model(IDX)
    out = quantize_model(model, blocksize=32)
    assert out is model
    replaced = sorted(n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, NF4Linear))
    want = sorted(f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "up_proj", "down_proj"))
    assert replaced == sorted(want + ["blocks.1.v_alias"])
    assert model.blocks[1]["v_alias"] is model.blocks[1]["v_proj"]
    assert type(model.lm_head) is nn.Linear and type(model.blocks[0]["gate"]) is ScaledLinear
    layer = model.blocks[0]["q_proj"]
    assert layer.double_quant and layer.blocksize == 32 and layer.compute_dtype == torch.float64
    got = model(IDX)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # NF4 moves a Gaussian weight by ~10% RMS, and the logits by about as much (0.054-0.066 over 5 seeds); a wrong
    # layout (swapped nibbles, scales of the wrong blocks) gives O(1)
    assert 0 < (got - ref).norm() / ref.norm() < 0.15
    quantize_model(model, skip=())
    assert isinstance(model.lm_head, NF4Linear)


def test_quantize_model_error_leaves_the_model_as_it_was():
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_model(model, blocksize=48)
    assert_unchanged(model, snap)
    with pytest.raises(TypeError, match="skip must be a collection"):
        quantize_model(model, skip="lm_head")
    with pytest.raises(TypeError, match="model is itself an nn.Linear"):
        quantize_model(nn.Linear(4, 4))


def test_forward_saves_nothing_weight_sized_and_matches_the_dense_layer():
    """Like bitsandbytes' MatMul4Bit: W dequantized again for dX instead of being kept; same dX and dbias as
    F.linear on the dequantized W."""
    m = NF4Linear.from_linear(torch.nn.Linear(96, 40))
    m.bias.requires_grad_(True)
    x = torch.randn(3, 7, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    assert all(t.numel() < 40 * 96 for t in saved), [tuple(t.shape) for t in saved]
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    b2 = m.bias.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2, m.dequantize(), b2)
    y2.backward(g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(m.bias.grad, b2.grad)
