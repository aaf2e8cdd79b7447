"""Dropout: the mask a seed stands for, on each backend, and that every pass of a call uses it.

The kernels' mask is checked bit for bit against ``tests.helpers.philox_keep_mask``, a numpy rebuild of its
definition (Philox4x32-10 as in ``tl.philox``, one call per 8 adjacent columns), which is itself checked against
the published Philox known-answer vectors.  The PyTorch path's mask comes from torch's generator (another mask,
same distribution); ``dropout_mask(..., dtype=, r=)`` must name whichever mask the call it describes draws.
"""

import numpy as np
import pytest
import torch

from lora_kernels import dropout_mask, lora_linear, lora_linear_ref
from lora_kernels._backend import HAS_TRITON
from lora_kernels.ops.lora_linear import dispatch
from tests.helpers import (dropout_threshold, grads_of, make_case, philox4x32, philox_keep_mask, rel_err,
                           standalone_bound)

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import kernels as triton_kernels


# ------------------------------------------------------------------------------------------------------------
# Properties of the mask, on both backends
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_revealed_by_identity(backend, p):
    """W = 0, A = B = I (in = r = out), s = 1: y = m ⊙ x / (1-p) reveals the mask; dA, dB, dX must use it."""
    d, n = 24, 50
    x = (torch.rand(n, d) + 0.5).requires_grad_()  # never zero, so a zero output means a dropped element
    w = torch.zeros(d, d)
    a = torch.eye(d).requires_grad_()
    bb = torch.eye(d).requires_grad_()
    y = lora_linear(x, w, None, a, bb, 1.0, p, seed=99)
    revealed = y.detach() != 0
    assert torch.allclose(y[revealed], x.detach()[revealed] / (1 - p))
    assert torch.equal(revealed, dropout_mask(99, (n, d), p, "cpu"))
    keep_frac = revealed.float().mean().item()
    assert abs(keep_frac - (1 - p)) < 4 * ((p * (1 - p)) / (n * d)) ** 0.5 + 1e-3
    g = torch.randn(n, d)
    dx, da, db = torch.autograd.grad(y, [x, a, bb], g)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    yr = lora_linear_ref(leaves[0], w.double(), None, leaves[1], leaves[2], 1.0, p, dropout_mask=revealed)
    rx, ra, rb = torch.autograd.grad(yr, leaves, g.double())
    bound = standalone_bound(torch.float32, n + 2 * d)  # dA, dB reduce over the n tokens after a d-long product
    for name, o, r in (("dx", dx, rx), ("dA", da, ra), ("dB", db, rb)):
        assert rel_err(o, r) <= bound, name


def test_dropout_reproducible_with_manual_seed(backend):
    x, w, b, a, bb = make_case(20, 32, 16, 4, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        y = lora_linear(x, w, b, a, bb, 1.0, 0.3)
        outs.append([y] + list(torch.autograd.grad(y, [x, a, bb], torch.ones_like(y))))
    for o1, o2 in zip(*outs):
        assert torch.equal(o1, o2)
    torch.manual_seed(124)
    y3 = lora_linear(x, w, b, a, bb, 1.0, 0.3)
    assert not torch.equal(y3, outs[0][0])


def test_dropout_mask_rows_independent(backend):
    m = dropout_mask(5, (64, 128), 0.5, "cpu")
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[:, 0], m[:, 1])
    assert not torch.equal(m, dropout_mask(6, (64, 128), 0.5, "cpu"))


# ------------------------------------------------------------------------------------------------------------
# The kernels' mask, bit for bit
# ------------------------------------------------------------------------------------------------------------

def test_numpy_philox_matches_known_answer_vectors():
    """Philox4x32-10 known-answer vectors of Random123 (kat_vectors), key = (low, high) words of the seed."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, (k0, k1), want in kat:
        assert tuple(int(v) for v in philox4x32(k0 | k1 << 32, *ctr)) == want


SEEDS = [0, 99, 2**31 + 3, 2**32 - 1, 2**32, 2**32 + 5, 2**47 + 12345, 2**63 - 1]  # ≥ 2³²: the key's high word


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(7, 13), (33, 50), (64, 128), (5, 3), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_mask_matches_numpy_philox(kernels, seed, shape):
    """dropout_mask on the kernels (interpreter) is the numpy Philox mask, k a multiple of 4 or not."""
    for p in (0.1, 0.5, 0.9):
        got = dropout_mask(seed, shape, p, "cpu")
        assert got.dtype == torch.bool and got.shape == shape
        assert np.array_equal(got.numpy(), philox_keep_mask(seed, shape, p)), f"p={p}"


def test_numpy_reference_would_see_a_wrong_layout(kernels):
    """The comparison above is sharp: a row stride of ⌊k/8⌋ instead of ⌈k/8⌉, lanes in another order, or another
    threshold each give a different mask."""
    seed, (n, k), p = 2**32 + 5, (33, 50), 0.5
    got = dropout_mask(seed, (n, k), p, "cpu").numpy()
    assert not np.array_equal(got, philox_keep_mask(seed, (n, k), p, row_len=k - k % 8))
    groups = -(-k // 8)
    counter = np.arange(n, dtype=np.uint64)[:, None] * np.uint64(groups) + np.arange(groups, dtype=np.uint64)
    r0, r1, r2, r3 = philox4x32(seed, counter & np.uint64(0xFFFFFFFF), counter >> np.uint64(32), 0, 0)
    lo, hi = (lambda r: r & np.uint64(0xFFFF)), (lambda r: r >> np.uint64(16))
    swapped = np.stack([lo(r0), lo(r1), lo(r2), lo(r3), hi(r0), hi(r1), hi(r2), hi(r3)],  # halves in another order
                       axis=-1).reshape(n, 8 * groups)[:, :k]
    assert not np.array_equal(got, swapped >= np.uint64(dropout_threshold(p)))
    assert not np.array_equal(got, philox_keep_mask(seed, (n, k), 0.45))


def test_kernel_mask_counter_high_word(kernels):
    """Counters ≥ 2³² (c1 ≠ 0) need more elements than a CPU test can hold, so the mask kernel is launched on one
    32×32 tile of a matrix declared 2³⁴ columns wide: row i's counters are then i·2³² + j, i.e. c1 = i."""
    n, row_len, seed, p = 32, 2**34, 2**32 + 77, 0.3
    out = torch.zeros((n, 32), dtype=torch.uint8)
    triton_kernels._dropout_mask_kernel[(1, 1)](out, n, row_len, out.stride(0), out.stride(1), seed,
                                                dropout_threshold(p), BLOCK_M=32, BLOCK_K=32)
    assert np.array_equal(out.bool().numpy(), philox_keep_mask(seed, (n, 32), p, row_len=row_len))


# ------------------------------------------------------------------------------------------------------------
# The mask a call uses
# ------------------------------------------------------------------------------------------------------------

def _agree(x, w, b, a, bb, scale, p, seed, mask=None):
    """lora_linear(seed=seed) against float64 lora_linear_ref given ``mask``, or else the same ``seed``: output and
    every gradient.  Returns the largest relative error and the bound it is held to."""
    y = lora_linear(x, w, b, a, bb, scale, p, seed=seed)
    g = torch.randn_like(y)
    got = [y] + grads_of(y, g, [x, a, bb])
    if mask is None:
        yr = lora_linear_ref(x, w, b, a, bb, scale, p, seed=seed, upcast=True)
    else:
        yr = lora_linear_ref(x, w, b, a, bb, scale, p, dropout_mask=mask, upcast=True)
    ref = [yr] + grads_of(yr, g.double(), [x, a, bb])
    err = max(rel_err(o, r) for o, r in zip(got, ref))
    return err, standalone_bound(torch.float32, x.shape[-1] + w.shape[0] + a.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_with_seed_draws_the_call_mask(backend, dtype):
    """lora_linear_ref(..., seed=s) uses the very mask lora_linear(..., seed=s) draws (forward and backward):
    the kernels' Philox mask for fp32 under the interpreter, torch's for float64 and on the PyTorch path.
    (float64 is held to the fp32 bound, a looser one.)"""
    case = make_case(6, 37, 20, 5, dtype, lead=(2,))
    err, bound = _agree(*case, 0.5, 0.3, seed=2**32 + 9)
    assert err <= bound
    other, _ = _agree(*case, 0.5, 0.3, seed=2**32 + 9, mask=dropout_mask(2**32 + 10, (12, 37), 0.3, "cpu",
                                                                          dtype=dtype).reshape(2, 6, 37))
    assert other > 1e3 * bound, "another seed's mask must not pass"


@pytest.mark.parametrize("r", [4, 300], ids=["r4-kernels", "r300-torch-path"])
def test_dropout_mask_names_the_mask_the_call_used(backend, r):
    """dropout_mask(seed, shape, p, device, dtype=, r=) is the mask lora_linear used for that dtype and rank:
    r = 300 > MAX_KERNEL_RANK runs the PyTorch path (torch's generator) even where the kernels serve r = 4."""
    assert 4 <= dispatch.MAX_KERNEL_RANK < 300  # the premise of the two cases
    n, d_in, d_out, seed, p = 9, 40, 30, 21, 0.4
    case = make_case(n, d_in, d_out, r, torch.float32)
    mask = dropout_mask(seed, (n, d_in), p, "cpu", dtype=torch.float32, r=r)
    err, bound = _agree(*case, 0.5, p, seed, mask=mask)
    assert err <= bound
    kernels_serve = backend == "triton" and r <= dispatch.MAX_KERNEL_RANK
    assert np.array_equal(mask.numpy(), philox_keep_mask(seed, (n, d_in), p)) == kernels_serve
