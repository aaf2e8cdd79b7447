"""quantize_nf4 against the format's definition (no bitsandbytes): nearest level, error bounds, exact levels, the
packing, blocks over the flat index, double quantization, and the errors of quantize_nf4 and NF4Tensor.validate."""

import dataclasses

import pytest
import torch

from lora_kernels.quant import NF4Tensor, dequantize_nf4_ref, nf4_code, quantize_nf4
from lora_kernels.quant.quantize import NESTED_BLOCKSIZE, dynamic_map

EPS32 = 2.0**-23  # fp32 machine epsilon


def codes_of(q: NF4Tensor) -> torch.Tensor:
    """The 4-bit codes of q's elements, int64 [numel], read from the definition (high nibble first)."""
    flat = q.packed.reshape(-1).long()
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[: q.numel]


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |flat| over consecutive chunks of ``blocksize``, from the definition; a short last chunk's is floored at
    1e-38 (bitsandbytes stores the floor it scales by there, and only there)."""
    amax = torch.stack([c.abs().max() for c in flat.split(blocksize)])
    if flat.numel() % blocksize:
        amax[-1] = amax[-1].clamp(min=1e-38)
    return amax


def half_gap(levels: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Half the gap between the two sorted ``levels`` around each value of ``s`` (fp64): the most nearest-level
    rounding can move s."""
    i = torch.searchsorted(levels, s, right=True).clamp(1, levels.numel() - 1)
    return (levels[i] - levels[i - 1]) / 2


def random_weight(shape, dtype=torch.float32):
    """Fresh N(0, 1) values with rows of very different magnitudes (1e-3 .. 1e2), so blocks' scales differ."""
    rows = 10.0 ** (torch.rand(shape[0], 1) * 5 - 3)
    return (torch.randn(*shape) * rows).to(dtype)


SHAPES = [(48, 64), (37, 100), (33, 77), (1, 5), (300, 130)]  # nice; rows straddling blocks; odd numel; one short
# block; > 256 blocks (several nested blocks, the last short)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_are_nearest_levels_and_errors_within_half_a_gap(shape, blocksize, dtype):
    w = random_weight(shape, dtype)
    q = quantize_nf4(w, blocksize)
    flat = w.double().reshape(-1)
    blk = torch.arange(flat.numel()) // blocksize
    amax = blockwise_absmax(flat, blocksize)
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax.double(), amax), "absmax = max |w| per block"
    levels = nf4_code().double()
    s = flat / amax[blk]
    dist = (s[:, None] - levels[None, :]).abs()
    got = dist.gather(1, codes_of(q)[:, None]).squeeze(1)
    # nearest level, up to the fp32 rounding of s (a value within an ulp of a midpoint may go either way)
    assert (got <= dist.min(dim=1).values + 4 * EPS32).all()
    err = (dequantize_nf4_ref(q, torch.float32).double().reshape(-1) - flat).abs()
    bound = amax[blk] * (half_gap(levels, s) + 4 * EPS32)  # half a level gap, plus fp32 rounding of s and w
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_double_quant_scales_within_half_a_dynamic_gap(shape, blocksize):
    w = random_weight(shape)
    plain, q = quantize_nf4(w, blocksize), quantize_nf4(w, blocksize, double_quant=True)
    assert torch.equal(q.packed, plain.packed), "double quantization only changes the scales"
    assert q.nested and q.absmax.dtype == torch.uint8 and q.nested_blocksize == NESTED_BLOCKSIZE
    assert q.offset == plain.absmax.mean().item()
    centred = plain.absmax - q.offset  # fp32, as quantized
    assert torch.equal(q.nested_absmax, blockwise_absmax(centred, NESTED_BLOCKSIZE))
    blk2 = torch.arange(q.n_blocks) // NESTED_BLOCKSIZE
    table = dynamic_map().double()
    t = centred.double() / q.nested_absmax.double()[blk2]
    scale_err = (q.block_scales().double() - plain.absmax.double()).abs()
    scale_bound = q.nested_absmax.double()[blk2] * (half_gap(table, t) + 4 * EPS32)
    assert (scale_err <= scale_bound).all()
    # each element: the 4-bit rounding of the plain case plus the scale's error (|level| <= 1)
    flat, blk = w.double().reshape(-1), torch.arange(w.numel()) // blocksize
    err = (dequantize_nf4_ref(q, torch.float32).double().reshape(-1) - flat).abs()
    s = flat / plain.absmax.double()[blk]
    bound = plain.absmax.double()[blk] * (half_gap(nf4_code().double(), s) + 8 * EPS32) + scale_bound[blk]
    assert (err <= bound).all()


def test_values_on_levels_are_exact():
    """Levels times a power of two per block, each block holding ±1: scaling is exact, so every code is the level's
    own and W comes back bit for bit (also with an odd count and a short last block)."""
    blocksize, shape = 64, (9, 49)
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    idx = torch.randint(0, 16, (n,))
    idx[::blocksize] = torch.randint(0, 2, (n_blocks,)) * 15  # level -1 or +1 sets each block's absmax
    scale = 2.0 ** torch.randint(-8, 8, (n_blocks,)).float()
    w = (nf4_code()[idx] * scale.repeat_interleave(blocksize)[:n]).reshape(shape)
    for nested in (False, True):
        q = quantize_nf4(w, blocksize, double_quant=nested)
        assert torch.equal(codes_of(q), idx)
        if not nested:
            assert torch.equal(q.absmax, scale) and torch.equal(dequantize_nf4_ref(q), w)


def test_packing_high_nibble_first_and_odd_tail_padded_with_the_zero_level():
    code = nf4_code()
    w = torch.tensor([[-3.0, 3.0, 3.0 * code[9].item()]])
    q = quantize_nf4(w, 64)
    # codes 0, 15, 9; the missing fourth nibble is level 7 (0.0), as bitsandbytes pads
    assert q.packed.tolist() == [0x0F, 0x97] and torch.equal(q.absmax, torch.tensor([3.0]))


def test_blocks_run_over_the_flat_index_across_rows():
    """Row 1 is 1000× row 0; with 40 columns and blocks of 32, block 1 holds row 0's last 8 values and row 1's first
    24, so its scale is row 1's and row 0's part of it rounds to the levels near 0."""
    w = torch.randn(3, 40) * torch.tensor([[1.0], [1000.0], [1.0]])
    q = quantize_nf4(w, 32)
    assert q.n_blocks == 4
    assert torch.equal(q.absmax, blockwise_absmax(w.reshape(-1), 32))
    assert q.absmax[1] == w[1, :24].abs().max()
    back = dequantize_nf4_ref(q)
    assert (back[0, 32:].abs() <= q.absmax[1] * 0.0796).all()  # under the first positive level × scale
    assert torch.allclose(back[0, :32], w[0, :32], atol=q.absmax[0].item() * 0.2)


def test_all_zero_block_decodes_to_zero():
    """An all-zero block (a pruned stretch) must not divide by zero: the scale is floored for scaling; a full
    block stores 0, the short tail block stores the floor, as bitsandbytes does."""
    w = torch.randn(4, 64)
    w[1] = 0.0  # block 1, a full one
    w_tail = torch.randn(5, 20)
    w_tail.view(-1)[64:] = 0.0  # the short tail block (36 values)
    q, q_tail = quantize_nf4(w, 64), quantize_nf4(w_tail, 64)
    assert q.absmax[1] == 0 and q_tail.absmax[-1] == torch.tensor(1e-38)
    for got, ref in ((dequantize_nf4_ref(q), w), (dequantize_nf4_ref(q_tail), w_tail)):
        assert torch.isfinite(got).all()
        assert torch.equal(got[ref == 0], torch.zeros_like(got[ref == 0]))


def test_non_contiguous_weight_is_read_in_its_logical_row_major_order():
    w = torch.randn(40, 24)
    a, b = quantize_nf4(w.t(), 32, True), quantize_nf4(w.t().contiguous(), 32, True)
    assert a.shape == (24, 40) and torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes_round_to_fp32_first_and_set_the_compute_dtype(dtype):
    w = random_weight((12, 40), dtype)
    q = quantize_nf4(w, 32, double_quant=True)
    ref = quantize_nf4(w.float(), 32, double_quant=True)
    assert q.dtype == dtype and ref.dtype == torch.float32
    assert torch.equal(q.packed, ref.packed) and torch.equal(q.absmax, ref.absmax)
    assert quantize_nf4(w, 32, compute_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert dequantize_nf4_ref(q).dtype == dtype


def test_dynamic_map_shape_and_symmetry():
    for signed in (True, False):
        m = dynamic_map(signed)
        assert m.dtype == torch.float32 and m.numel() == 256 and (m[1:] > m[:-1]).all()
        assert m[-1] == 1.0 and (0.0 in m.tolist())
    m = dynamic_map(True)
    neg, pos = m[m < 0], m[(m > 0) & (m < 1)]
    assert torch.equal(neg.flip(0), -pos) and m.min().item() == pytest.approx(-0.99297, abs=1e-5)


@pytest.mark.parametrize("w, kwargs, match", [
    (torch.randn(64), {}, "w must be a non-empty 2-D"),
    (torch.randn(2, 4, 8), {}, "w must be a non-empty 2-D"),
    (torch.randn(0, 8), {}, "w must be a non-empty 2-D"),
    (torch.randint(0, 5, (4, 8)), {}, "w must be float16"),
    (torch.randn(4, 8), {"blocksize": 48}, "blocksize must be one of"),
    (torch.randn(4, 8), {"blocksize": 0}, "blocksize must be one of"),
    (torch.randn(4, 8), {"blocksize": True}, "blocksize must be one of"),
    (torch.randn(4, 8), {"compute_dtype": torch.int8}, "compute_dtype must be a float dtype"),
    (torch.tensor([[1.0, float("nan")]]), {}, "w has non-finite values"),
])
def test_quantize_errors_name_the_argument(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(w, **kwargs)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_nf4([[1.0, 2.0]])


@pytest.mark.parametrize("change, match", [
    (lambda q: dict(packed=q.packed[:-1]), "NF4Tensor.packed"),
    (lambda q: dict(packed=q.packed.to(torch.int16)), "NF4Tensor.packed"),
    (lambda q: dict(shape=(q.shape[0],)), "NF4Tensor.shape"),
    (lambda q: dict(blocksize=0), "NF4Tensor.blocksize"),
    (lambda q: dict(absmax=q.absmax[:-1]), "NF4Tensor.absmax"),
    (lambda q: dict(absmax=q.absmax.float()), "NF4Tensor.absmax"),
    (lambda q: dict(code=q.code[:8]), "NF4Tensor.code"),
    (lambda q: dict(nested_absmax=q.nested_absmax.double()), "NF4Tensor.nested_absmax"),
    (lambda q: dict(nested_code=None), "NF4Tensor.nested_code"),
    (lambda q: dict(dtype=torch.int32), "NF4Tensor.dtype"),
    (lambda q: dict(code=q.code.to("meta")), "NF4Tensor.code is on meta"),
])
def test_validate_errors_name_the_field(change, match):
    q = quantize_nf4(torch.randn(20, 33), 64, double_quant=True)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(q, **change(q))
