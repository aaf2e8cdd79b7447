"""The 4-bit NF4 weight format (QLoRA, bitsandbytes' ``Params4bit`` / ``QuantState`` layout) and its reference
dequantization.

Layout of an out×in weight W (row-major, flattened: element (o, i) is number f = o·in + i):
  * ``packed``: uint8, ⌈numel/2⌉ bytes; element f is the high nibble of byte f // 2 when f is even, the low nibble
    when f is odd (an odd element count pads the last byte with the code of the 0.0 level, 7).
  * ``absmax``: one scale per ``blocksize`` consecutive elements (block f // blocksize; the last block may be short):
    fp32, or, with double quantization ("nested"), uint8 codes of (absmax - offset) quantized blockwise with 256
    blocks per fp32 ``nested_absmax`` and the 256-entry signed dynamic table ``nested_code``.
  * ``code``: the 16 NF4 levels (fp32).
Dequantization, in fp32 exactly as bitsandbytes does it, then one rounding to the compute dtype:
    scale[b] = absmax[b]                                                     (plain)
    scale[b] = nested_code[absmax[b]] · nested_absmax[b // nested_blocksize] + offset   (nested)
    W[f]     = code[nibble(f)] · scale[f // blocksize]
Blocks run over the flat index, so they may straddle rows when in is not a multiple of the blocksize.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import torch

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA, Dettmers et al. 2023),
# as fp32 values (bitsandbytes' table, bit for bit).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@dataclasses.dataclass
class NF4Tensor:
    """A quantized out×in weight in the layout of the module docstring.  ``dtype`` is the compute dtype (x, y and
    the dequantized values); the tensors are read, never copied, from a bitsandbytes layer (``quant.bnb``)."""

    packed: torch.Tensor                  # uint8, ⌈numel/2⌉ elements (any shape: read flat)
    absmax: torch.Tensor                  # fp32 [n_blocks], or uint8 [n_blocks] when nested
    shape: Tuple[int, int]                # (out_features, in_features)
    dtype: torch.dtype                    # compute dtype
    blocksize: int = 64
    code: Optional[torch.Tensor] = None   # fp32 [16]; NF4's levels when None
    nested_absmax: Optional[torch.Tensor] = None  # fp32 [⌈n_blocks / nested_blocksize⌉]
    nested_code: Optional[torch.Tensor] = None    # fp32 [256]
    nested_blocksize: int = 256
    offset: Union[float, torch.Tensor] = 0.0     # a float or a 0-d fp32 tensor (no device sync to read it)

    def __post_init__(self):
        if self.code is None:
            self.code = nf4_code(self.packed.device)
        self.validate()

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def validate(self) -> None:
        """Every size and dtype the kernels rely on, each error naming the field."""
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"NF4Tensor.shape must be (out_features, in_features) > 0, got {self.shape}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"NF4Tensor.packed must hold {(self.numel + 1) // 2} uint8 values for shape "
                             f"{self.shape}, got {self.packed.numel()} {self.packed.dtype}")
        if not isinstance(self.blocksize, int) or self.blocksize <= 0:
            raise ValueError(f"NF4Tensor.blocksize must be a positive int, got {self.blocksize!r}")
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != self.n_blocks:
            raise ValueError(f"NF4Tensor.absmax must hold {self.n_blocks} {want} values (blocksize "
                             f"{self.blocksize}{', nested' if self.nested else ''}), got {self.absmax.numel()} "
                             f"{self.absmax.dtype}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"NF4Tensor.code must be 16 float32 levels, got {self.code.numel()} {self.code.dtype}")
        if self.nested:
            n2 = -(-self.n_blocks // self.nested_blocksize)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != n2:
                raise ValueError(f"NF4Tensor.nested_absmax must hold {n2} float32 values, got "
                                 f"{self.nested_absmax.numel()} {self.nested_absmax.dtype}")
            if (self.nested_code is None or self.nested_code.dtype != torch.float32
                    or self.nested_code.numel() != 256):
                raise ValueError("NF4Tensor.nested_code must be 256 float32 values when nested_absmax is given")
        if isinstance(self.offset, torch.Tensor) and (self.offset.numel() != 1 or self.offset.dtype != torch.float32):
            raise ValueError(f"NF4Tensor.offset must be a float or a one-element float32 tensor, got "
                             f"{self.offset.numel()} {self.offset.dtype} values")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"NF4Tensor.dtype (the compute dtype) must be a float dtype, got {self.dtype}")
        for name in ("absmax", "code", "nested_absmax", "nested_code"):
            t = getattr(self, name)
            if t is not None and t.device != self.packed.device:
                raise ValueError(f"NF4Tensor.{name} is on {t.device} but packed is on {self.packed.device}")

    def block_scales(self) -> torch.Tensor:
        """The per-block scales as fp32 [n_blocks] (double quantization undone exactly as bitsandbytes does)."""
        if not self.nested:
            return self.absmax
        blk = torch.arange(self.n_blocks, device=self.device, dtype=torch.int32) // self.nested_blocksize
        offset = self.offset.reshape(()) if isinstance(self.offset, torch.Tensor) else self.offset
        # index_select, not x[idx]: the same values, several times faster on CPU
        return (self.nested_code.index_select(0, self.absmax.int()) * self.nested_absmax.index_select(0, blk)
                + offset)


def dequantize_nf4_ref(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W as a dense out×in tensor of ``dtype`` (default: the compute dtype): the pure-PyTorch reference every NF4
    kernel is tested against, and the PyTorch path's dequantization.  fp32 products, one rounding.

    The levels come from a 256-entry table (both nibbles of every byte value), one ``index_select`` per byte, and the
    scales multiply whole blocks through a reshape: 0.63 ms for a 1024² W on 2 CPU cores (median of 7), against
    1.29 ms for a gather per nibble with a repeated scale vector (advanced indexing ``x[idx]`` alone cost 3.4 ms).
    bitsandbytes' native CPU kernel takes ~0.09 ms: the PyTorch path stays the slow one."""
    byte_levels = torch.stack((q.code.repeat_interleave(16), q.code.repeat(16)), dim=1)  # [256, 2]: hi, lo
    levels = byte_levels.index_select(0, q.packed.reshape(-1).int()).reshape(-1)[: q.numel]  # (x[idx]: 7× slower)
    scales = q.block_scales()
    full = q.numel - q.numel % q.blocksize
    out = torch.empty(q.numel, dtype=torch.float32, device=q.device)
    blocks = out[:full].view(-1, q.blocksize)
    torch.mul(levels[:full].view(-1, q.blocksize), scales[: full // q.blocksize, None], out=blocks)
    if full < q.numel:  # a short last block
        torch.mul(levels[full:], scales[-1], out=out[full:])
    return out.reshape(q.shape).to(dtype or q.dtype)
