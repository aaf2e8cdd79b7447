"""Our NF4 against bitsandbytes itself: the quantizer's bytes and scales, reading a real ``Linear4bit`` in place,
dequantization and forward bit for bit.  Tests that need bitsandbytes skip without it (the ``bnb`` fixture); the
first two run everywhere.

Two bitsandbytes 0.50 CPU-library behaviours shape these tests (both checked against bitsandbytes' own reference
kernels, its "default" backend, which is what its GPU kernels follow):
  * the native CPU ``dequantize_4bit`` (AVX-512 path) mis-assigns block scales when in_features is a multiple of 16
    but not of the block size (blocks straddling rows); shapes compared with it avoid that case, and one test
    compares such a shape with the reference kernel instead;
  * the native CPU 8-bit ``quantize_blockwise`` (the nested step) sometimes picks the farther of two table
    neighbours (~0.1% of the scale codes); our codes equal the reference kernel's, and differ from the native
    library's only where its pick is the farther one.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from lora_kernels.quant import NF4Linear, dequantize_nf4_ref, is_bnb_linear4bit, nf4_from_bnb, quantize_nf4
from lora_kernels.quant.quantize import NESTED_BLOCKSIZE, dynamic_map
from tests.helpers import bnb_linear4bit, error_floor, rel_err


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def random_weight(shape, dtype=torch.float32):
    rows = 10.0 ** (torch.rand(shape[0], 1) * 4 - 2)  # rows 1e-2 .. 1e2: blocks with different scales
    return (torch.randn(*shape) * rows).to(dtype)


def reference_kernel(op, *args):
    """bitsandbytes' reference ("default" backend) kernel of ``op``, bypassing the native CPU library."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, *args)


# -- without bitsandbytes -------------------------------------------------------------------------------------

def test_quant_imports_without_importing_bitsandbytes():
    code = ("import sys, lora_kernels.quant as q; from lora_kernels.quant.linear import NF4Linear\n"
            "assert not q.is_bnb_linear4bit(NF4Linear(8, 4))\n"
            "assert 'bitsandbytes' not in sys.modules, 'importing lora_kernels.quant imported bitsandbytes'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_non_bnb_objects_are_refused():
    assert not is_bnb_linear4bit(nn.Linear(4, 4)) and not is_bnb_linear4bit(NF4Linear(8, 4))
    with pytest.raises(TypeError, match="expected a bitsandbytes Linear4bit or Params4bit, got Linear"):
        nf4_from_bnb(nn.Linear(4, 4))


# -- the quantizer ----------------------------------------------------------------------------------------------

def test_dynamic_map_equals_bnb(bnb):
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnb.functional.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("shape", [(64, 128), (37, 100), (33, 77), (300, 130)])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantizer_matches_bnb_quantize_4bit(bnb, shape, blocksize, double_quant):
    F = bnb.functional
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = random_weight(shape, dtype)
        q = quantize_nf4(w, blocksize, double_quant)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(q.packed, packed.reshape(-1)), dtype
        assert state.quant_type == "nf4" and torch.equal(q.code, state.code) and tuple(state.shape) == shape
        if not double_quant:
            assert torch.equal(q.absmax, state.absmax), dtype
            continue
        plain = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")[1].absmax
        assert q.offset == state.offset.item()
        assert torch.equal(q.nested_absmax, state.state2.absmax) and torch.equal(q.nested_code, state.state2.code)
        assert state.state2.blocksize == NESTED_BLOCKSIZE == q.nested_blocksize
        ref_codes, ref_absmax = reference_kernel(torch.ops.bitsandbytes.quantize_blockwise.default,
                                                 plain - state.offset, state.state2.code, NESTED_BLOCKSIZE)
        assert torch.equal(q.absmax, ref_codes) and torch.equal(q.nested_absmax, ref_absmax)
        # the native CPU library: the same codes, except where it took the farther neighbour
        t = (plain.double() - q.offset) / q.nested_absmax.double()[torch.arange(q.n_blocks) // NESTED_BLOCKSIZE]
        table = q.nested_code.double()
        diff = q.absmax != state.absmax
        ours_d, theirs_d = ((t - table[c.long()]).abs() for c in (q.absmax, state.absmax))
        assert (theirs_d[diff] > ours_d[diff]).all() and diff.double().mean() < 0.01


# -- reading a Linear4bit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, blocksize", [((48, 128), 64), ((37, 100), 64), ((33, 77), 128)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_from_bnb_reads_in_place_and_dequantizes_like_bnb(bnb, shape, blocksize, double_quant, dtype):
    w = random_weight(shape, dtype)
    layer = bnb_linear4bit(w, double_quant=double_quant, blocksize=blocksize)
    state = layer.weight.quant_state
    q = nf4_from_bnb(layer)
    assert q.shape == shape and q.blocksize == blocksize and q.dtype == state.dtype == dtype
    assert q.packed.data_ptr() == layer.weight.data_ptr() and q.absmax.data_ptr() == state.absmax.data_ptr()
    assert q.code.data_ptr() == state.code.data_ptr()
    if double_quant:
        assert q.nested_absmax.data_ptr() == state.state2.absmax.data_ptr()
        assert q.nested_code.data_ptr() == state.state2.code.data_ptr() and q.offset == state.offset.item()
    ref = bnb.functional.dequantize_4bit(layer.weight.data, state)
    assert ref.dtype == dtype and torch.equal(dequantize_nf4_ref(q), ref)
    assert torch.equal(dequantize_nf4_ref(q, torch.float32),
                       bnb.functional.dequantize_4bit(layer.weight.data, state.__class__(
                           absmax=q.block_scales(), shape=state.shape, code=state.code, blocksize=blocksize,
                           quant_type="nf4", dtype=torch.float32)))
    assert torch.equal(q.packed, quantize_nf4(w, blocksize).packed)  # the same codes as our quantizer
    assert torch.equal(nf4_from_bnb(layer.weight).packed, q.packed)  # the Params4bit alone reads the same


def test_rows_straddling_blocks_match_bnb_reference_kernel(bnb):
    """in_features 96 with blocks of 64: the native CPU dequantization mis-assigns scales there (module docstring),
    bitsandbytes' reference kernel agrees with us bit for bit."""
    layer = bnb_linear4bit(random_weight((40, 96)), double_quant=False, blocksize=64)
    q = nf4_from_bnb(layer)
    ref = reference_kernel(torch.ops.bitsandbytes.dequantize_4bit.default, layer.weight.data, q.absmax, 64, "nf4",
                           [40, 96], torch.float32)
    assert torch.equal(dequantize_nf4_ref(q), ref)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int32])
def test_quant_storage_is_viewed_as_bytes(bnb, storage):
    w = random_weight((24, 64))
    layer = bnb_linear4bit(w, quant_storage=storage)
    assert layer.weight.dtype == storage
    q = nf4_from_bnb(layer)
    assert q.packed.dtype == torch.uint8 and q.packed.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(q.packed, quantize_nf4(w, 64).packed)


def test_fp4_layers_are_read_through_their_code_table(bnb):
    layer = bnb_linear4bit(random_weight((32, 64)), quant_type="fp4", double_quant=True)
    state = layer.weight.quant_state
    q = nf4_from_bnb(layer)
    assert torch.equal(q.code, bnb.functional.get_4bit_type("fp4", device="cpu")) and q.code.data_ptr() == state.code.data_ptr()
    assert torch.equal(dequantize_nf4_ref(q), bnb.functional.dequantize_4bit(layer.weight.data, state))


def test_compute_dtype_is_the_layers_else_the_weights(bnb):
    w = random_weight((16, 64), torch.bfloat16)
    assert nf4_from_bnb(bnb_linear4bit(w)).dtype == torch.bfloat16
    assert nf4_from_bnb(bnb_linear4bit(w, compute_dtype=torch.float16)).dtype == torch.float16
    assert is_bnb_linear4bit(bnb_linear4bit(w)) and is_bnb_linear4bit(bnb.nn.LinearNF4(64, 16))


def test_unquantized_and_unreadable_layers_are_refused(bnb):
    with pytest.raises(ValueError, match="not quantized yet"):
        nf4_from_bnb(bnb.nn.Linear4bit(64, 16, quant_type="nf4"))
    with pytest.raises(ValueError, match="not quantized yet"):
        nf4_from_bnb(bnb.nn.Params4bit(torch.randn(16, 64), quant_type="nf4"))
    layer = bnb_linear4bit(random_weight((16, 64)))
    layer.weight.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type 'int4'"):
        nf4_from_bnb(layer)
    layer = bnb_linear4bit(random_weight((16, 64)))
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked for bitsandbytes' CPU inference kernel"):
        nf4_from_bnb(layer)


def test_eval_forward_on_cpu_repacks_and_is_then_refused(bnb):
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    layer = bnb_linear4bit(random_weight((64, 128)), compute_dtype=torch.bfloat16).eval()
    nf4_from_bnb(layer)
    with torch.no_grad():
        layer(torch.randn(3, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="repacked"):
        nf4_from_bnb(layer)


# -- forward ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compute_dtype, x_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_matches_bnb_linear4bit(bnb, compute_dtype, x_dtype, double_quant):
    """Both decode W to the compute dtype with the same bits (tested above) and call F.linear on the same x and
    bias, so they agree exactly here; the bound leaves room only for a BLAS that picks its kernel by memory
    alignment: one rounding of the compute dtype plus fp32 accumulation-order noise over in_features
    (``error_floor``)."""
    w, bias = random_weight((48, 100)), torch.randn(48)  # in_features 100: off the native kernel's bad case
    layer = bnb_linear4bit(w, bias, double_quant=double_quant, compute_dtype=compute_dtype)  # training mode
    ours = NF4Linear.from_nf4(nf4_from_bnb(layer), bias.clone())
    x = torch.randn(2, 5, 100, dtype=x_dtype)
    y_bnb, y = layer(x), ours(x)
    assert y.dtype == y_bnb.dtype == x_dtype and y.shape == y_bnb.shape == (2, 5, 48)
    assert rel_err(y, y_bnb) <= error_floor(compute_dtype, 100)  # equal in fact, on this CPU
