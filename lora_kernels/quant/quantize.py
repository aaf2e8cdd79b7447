"""Quantizing a dense weight to NF4 (the ``NF4Tensor`` layout of ``quant.nf4``), value for value as bitsandbytes'
``quantize_4bit(..., quant_type="nf4")`` does it, with or without double quantization of the block scales.

Algorithm (QLoRA, Dettmers et al. 2023), on the weight flattened row-major and rounded to fp32:
  * split into ``blocksize`` consecutive elements (the last block may be short, and blocks may straddle rows);
  * absmax[b] = max |w| over block b (fp32);
  * s = w · (1 / absmax[b]) for full blocks, w / absmax[b] for the short tail block, clamped to [-1, 1];
  * the 4-bit code of s is its nearest NF4 level, decided against the 15 midpoints between sorted levels
    (``torch.bucketize``: a value exactly on a midpoint goes to the lower level);
  * two codes per byte, the even element in the high nibble; an odd element count is padded with the code of 0.0
    (NF4 level 7), so the last byte's low nibble is 0b0111.
Double quantization ("nested"): offset = mean(absmax); (absmax - offset) is quantized by the same blockwise
rule, 256 scales per fp32 ``nested_absmax`` value, with the signed 8-bit dynamic table (``dynamic_map``).

Matching bitsandbytes bit for bit took three of its details that look accidental, kept on purpose: the full blocks
multiply by the reciprocal of their absmax while the tail block divides; absmax is floored at 1e-38 for scaling,
and the floored value is what the tail block stores (a full all-zero block stores 0); and the nested step
quantizes (absmax - offset) computed in fp32 with ``offset`` the fp32 mean.

Which bitsandbytes: its reference kernels (the "default" backend, which its GPU kernels follow).  Its native CPU
library (0.50) quantizes the nested 8-bit step with a search that sometimes lands on the farther of two table
neighbours (about 0.1% of the scale codes of random weights); there our codes are the nearer ones.  The 4-bit
codes and every fp32 field are the same whichever bitsandbytes kernel ran.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lora_kernels.quant.nf4 import NF4Tensor, nf4_code

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' accepted 4-bit block sizes
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the 8-bit quantization of the scales
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TINY = 1e-38  # the floor on a block's absmax when scaling (an all-zero block)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-value 8-bit "dynamic" data type (Dettmers 2015, *8-bit approximations for parallelism in deep
    learning*) as a sorted fp32 tensor: for each decade e = 0..6, the midpoints of 2^e (signed; 2^(e+1) unsigned)
    equal steps of [0.1, 1] scaled by 10^(e-6), mirrored to negative values when ``signed``; plus 0 and 1.
    Signed, it runs from -0.99297 to 1 (there is no -1); it is the table of the nested scales."""
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for e in range(7):
        steps = 2 ** e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float32)
        mags = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        parts += [mags, -mags] if signed else [mags]
    table = torch.cat(parts).sort().values
    assert table.numel() == 256
    return table


def _nearest_blockwise(flat: torch.Tensor, levels: torch.Tensor, blocksize: int,
                       pad_to_even: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 [n, or n+1 when padded], absmax fp32 [⌈n / blocksize⌉]) of fp32 ``flat`` against the sorted
    ``levels``: the rule of the module docstring."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = [(head * torch.reciprocal(absmax.clamp(min=_TINY)).unsqueeze(1)).clamp(-1.0, 1.0).reshape(-1)]
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax().clamp(min=_TINY)
        scaled.append((tail / tail_max).clamp(-1.0, 1.0))
        absmax = torch.cat((absmax, tail_max.reshape(1)))
    if pad_to_even and n % 2:
        scaled.append(flat.new_zeros(1))
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(torch.cat(scaled), midpoints, out_int32=True), absmax


def _check(w, blocksize, compute_dtype):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"quantize_nf4: w must be a non-empty 2-D (out_features, in_features) weight, got shape "
                         f"{tuple(w.shape)}")
    if w.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"quantize_nf4: w must be float16, bfloat16, float32 or float64, got {w.dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {BLOCKSIZES} (bitsandbytes' block sizes), got "
                         f"{blocksize!r}")
    if compute_dtype is not None and compute_dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"quantize_nf4: compute_dtype must be a float dtype, got {compute_dtype!r}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_nf4: w has non-finite values (inf or nan)")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 compute_dtype: Optional[torch.dtype] = None) -> NF4Tensor:
    """Quantize the out×in weight ``w`` to NF4 on its own device; returns a new ``NF4Tensor`` (1-D ``packed``).

    ``w``: 2-D, float16 / bfloat16 / float32 / float64 (float64 is rounded to fp32 first, as every dtype is;
    bitsandbytes itself refuses float64).  ``blocksize``: one of ``BLOCKSIZES`` (32 ... 4096, powers of two, as
    bitsandbytes accepts), so a byte never straddles two blocks.  ``double_quant``: quantize the block scales too
    (bitsandbytes' ``compress_statistics``).  ``compute_dtype``: the dtype the layer computes in (default: w's).
    The values equal bitsandbytes' ``quantize_4bit(w, blocksize, compress_statistics=double_quant,
    quant_type="nf4")``: packed bytes, absmax and, when nested, the scale codes, nested_absmax and offset.
    """
    _check(w, blocksize, compute_dtype)
    code = nf4_code(w.device)
    flat = w.detach().reshape(-1).float()
    q, absmax = _nearest_blockwise(flat, code, blocksize, pad_to_even=True)
    q = q.to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    fields = dict(packed=packed, shape=(int(w.shape[0]), int(w.shape[1])), dtype=compute_dtype or w.dtype,
                  blocksize=blocksize, code=code)
    if not double_quant:
        return NF4Tensor(absmax=absmax, **fields)
    offset = absmax.mean()
    nested_code = dynamic_map(signed=True).to(w.device)
    codes, nested_absmax = _nearest_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Tensor(absmax=codes.to(torch.uint8), nested_absmax=nested_absmax, nested_code=nested_code,
                     nested_blocksize=NESTED_BLOCKSIZE, offset=offset, **fields)
