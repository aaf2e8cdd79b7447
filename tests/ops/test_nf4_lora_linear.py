"""``lora_linear`` on a 4-bit NF4 base (``NF4Tensor``), both backends and both arrangements, against float64 built
from the dequantized weight; the dequantization kernel bit for bit against the reference."""

import pytest
import torch

from lora_kernels.ops.lora_linear import gemm_arrangement, lora_linear
from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight, dequantize
from lora_kernels.quant.nf4 import dequantize_nf4_ref
from lora_kernels.quant.quantize import quantize_nf4
from tests.helpers import FLOAT_DTYPES, make_case, run_and_compare

# (tokens, in, out, r): in a multiple of the blocksize and 16-aligned; in = 100 (blocks and bytes straddle rows,
# odd out); one token; in odd (a byte holds the last element of one row and the first of the next).
SHAPES = [(33, 128, 64, 16), (37, 100, 70, 7), (1, 64, 48, 4), (9, 33, 20, 3)]


def _nf4_case(n, d_in, d_out, r, dtype, mode="AB", bias=True, double_quant=True, blocksize=64):
    x, w, b, a, bb = make_case(n, d_in, d_out, r, dtype, mode=mode, bias=bias)
    q = quantize_nf4(w.float(), blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype)
    return x, q, dequantize_nf4_ref(q), b, a, bb


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["AB", "B", "A"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_every_mode_dtype_and_dropout(backend, dtype, mode, p):
    x, q, wd, b, a, bb = _nf4_case(37, 100, 70, 7, dtype, mode=mode, double_quant=mode != "A")
    for arrangement in ("fused", "split"):
        with gemm_arrangement(arrangement):
            run_and_compare(x, q, b, a, bb, 0.5, p, w_dense=wd)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_shapes_bias_blocksizes(backend, shape, bias, blocksize):
    x, q, wd, b, a, bb = _nf4_case(*shape, torch.float32, bias=bias, double_quant=blocksize == 64,
                                   blocksize=blocksize)
    for arrangement in ("fused", "split"):
        with gemm_arrangement(arrangement):
            run_and_compare(x, q, b, a, bb, 2.0, 0.1, w_dense=wd)


def test_three_d_input_and_bf16_double_quant_off(backend):
    x, q, wd, b, a, bb = _nf4_case(10, 64, 40, 8, torch.bfloat16, double_quant=False)
    x3 = x.detach().reshape(2, 5, 64).requires_grad_()
    run_and_compare(x3, q, b, a, bb, 1.0, 0.1, w_dense=wd)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_is_bit_identical_to_the_reference(backend, dtype, double_quant):
    for shape in ((70, 100), (33, 7), (64, 128)):
        q = quantize_nf4(torch.randn(shape), double_quant=double_quant, compute_dtype=dtype)
        got = dequantize(q, torch.empty(0, dtype=dtype))
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, dequantize_nf4_ref(q)), f"{shape}: the dequantized W differs from the reference"


def test_b_only_saves_t_and_the_seed_only(backend):
    """B-only on a 4-bit base: t' (N×r) and the seed; the codes are the layer's frozen buffers, not saved."""
    x, q, wd, b, a, bb = _nf4_case(16, 64, 32, 4, torch.float32, mode="B")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, q, b, a, bb, 1.0, 0.1)
    params = {a.data_ptr(), bb.data_ptr()}
    acts = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)
    assert acts == [(), (16, 4)], acts


def test_fp32_adapters_on_a_bf16_nf4_base(backend):
    x, q, wd, b, a, bb = _nf4_case(21, 64, 48, 8, torch.bfloat16)
    a32 = a.detach().float().requires_grad_()
    b32 = bb.detach().float().requires_grad_()
    y = lora_linear(x, q, b, a32, b32, 0.5, 0.0)
    y.sum().backward()
    ref = lora_linear(x.detach(), wd, b, a32.detach(), b32.detach(), 0.5, 0.0)
    assert y.dtype == torch.bfloat16 and a32.grad.dtype == torch.float32
    assert torch.allclose(y.float(), ref.float(), rtol=0, atol=2 * 7.8e-3 * ref.abs().max().item())


def test_bad_weight_names_the_argument():
    x, q, wd, b, a, bb = _nf4_case(4, 64, 32, 4, torch.float32)
    with pytest.raises(TypeError, match="weight"):
        lora_linear(x, object(), b, a, bb, 1.0, 0.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, q, b, a[:, :32], bb, 1.0, 0.0)
    with pytest.raises(TypeError, match="weight"):
        lora_linear(x.half(), q, None, a.half(), bb.half(), 1.0, 0.0)  # compute dtype fp32, x fp16
    with pytest.raises(TypeError, match="NF4Tensor"):
        NF4Weight(wd)
