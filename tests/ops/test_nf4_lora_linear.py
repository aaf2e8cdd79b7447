"""``lora_linear`` on a 4-bit NF4 base (``NF4Tensor``), both backends and both arrangements, against float64 built
from the dequantized weight; the dequantization kernel bit for bit against the reference."""

import gc
import weakref

import pytest
import torch

from lora_kernels.ops.lora_linear import dropout_mask, gemm_arrangement, lora_linear, lora_linear_ref
from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight, dequantize
from lora_kernels.quant.nf4 import dequantize_nf4_ref
from lora_kernels.quant.quantize import quantize_nf4
from tests.helpers import FLOAT_DTYPES, make_case, rel_err, run_and_compare

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


@pytest.mark.parametrize("arrangement", ["fused", "split"])
def test_no_dequantized_w_outlives_a_call(kernels, monkeypatch, arrangement):
    """Peak extra memory per layer: the fused arrangement allocates nothing W-sized (W is decoded in registers); the
    split one allocates one out×in scratch in the compute dtype per base product (forward, dgrad), freed on return."""
    from lora_kernels.ops.lora_linear import launch

    made = []
    real = launch._empty

    def recording(shape, device, dtype):
        t = real(shape, device, dtype)
        made.append((tuple(shape), dtype, weakref.ref(t)))
        return t

    monkeypatch.setattr(launch, "_empty", recording)
    x, q, wd, b, a, bb = _nf4_case(24, 96, 80, 8, torch.float32)
    with gemm_arrangement(arrangement):
        y = lora_linear(x, q, b, a, bb, 1.0, 0.1, seed=5)
        y.backward(torch.randn_like(y))
    scratch = [(shape, ref) for shape, dtype, ref in made if shape == (80, 96)]
    assert len(scratch) == (2 if arrangement == "split" else 0), [s for s, _, _ in made]
    gc.collect()
    assert all(ref() is None for _, ref in scratch), "a dequantized W outlived its call"


@pytest.mark.gpu
@pytest.mark.parametrize("arrangement", ["fused", "split"])
@pytest.mark.parametrize("mode", ["AB", "B"])
def test_gpu_bf16_llama_shape(arrangement, mode):
    """bf16 at a LLaMA shape on the GPU against float64 on the dequantized W, and the peak extra memory of a
    forward + backward: at most the outputs, the N×r intermediates and, split only, one out×in bf16 scratch."""
    n, d = 2048, 4096
    x, q, wd, b, a, bb = _nf4_case(n, d, d, 16, torch.bfloat16, mode=mode, bias=False)
    x, wd, a, bb = (v.detach().cuda() for v in (x, wd, a, bb))
    x.requires_grad_()
    a.requires_grad_(mode != "B")
    bb.requires_grad_()
    q = quantize_nf4(wd.float(), double_quant=True, compute_dtype=torch.bfloat16)
    wd = dequantize_nf4_ref(q)
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    with gemm_arrangement(arrangement):
        lora_linear(x, q, None, a, bb, 2.0, 0.1, seed=3).backward(g)  # compile, warm up
        x.grad = a.grad = bb.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = lora_linear(x, q, None, a, bb, 2.0, 0.1, seed=3)
        y.backward(g)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    outputs = 2 * n * d * 2  # y and dx, bf16
    scratch = d * d * 2 if arrangement == "split" else 0
    small = 64 * n * 16 * 4 + d * d // 8 + (8 << 20)  # N×r intermediates, the decoded scales, allocator rounding
    assert extra <= outputs + scratch + small, (extra, outputs, scratch)
    mask = dropout_mask(3, (n, d), 0.1, "cuda", dtype=torch.bfloat16, r=16)
    x64 = x.detach().double().requires_grad_()
    ref = lora_linear_ref(x64, wd.double(), None, a.detach().double(), bb.detach().double(), 2.0, 0.1,
                          dropout_mask=mask)
    ref.backward(g.double())
    assert rel_err(y, ref) < 1e-2 and rel_err(x.grad, x64.grad) < 1e-2
