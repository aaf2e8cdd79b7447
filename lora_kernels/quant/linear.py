"""``NF4Linear``: a frozen 4-bit linear layer in the ``NF4Tensor`` layout (bitsandbytes' ``Linear4bit`` without
bitsandbytes), and ``quantize_model``, which puts it in place of a model's linear layers.

State (buffers, so ``state_dict`` / ``load_state_dict`` carry them; nothing here trains):
  weight          uint8 [⌈out·in / 2⌉]   packed 4-bit codes
  absmax          fp32 [n_blocks], or uint8 [n_blocks] with double quantization
  code            fp32 [16]              the levels (NF4's)
  nested_absmax   fp32 [⌈n_blocks / 256⌉] and nested_code fp32 [256]: only with double quantization (else None,
                  absent from the state dict)
  offset          fp32 0-d               the nested scales' offset (0 without double quantization)
  bias            an nn.Parameter with requires_grad=False, in the linear's dtype, or None
Forward is bitsandbytes' ``Linear4bit.forward``: x cast to ``compute_dtype``, x Wᵀ + b with W dequantized to
``compute_dtype`` (fp32 products, one rounding) and the bias cast to it, the result cast back to x's dtype; W is
dequantized again for dX rather than kept for backward (``_DequantizedLinear``), on the Triton kernel on a GPU.

``module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` move the quantization state between devices but never change
its dtype (the codes and fp32 scales are the format); they do cast the bias, and leave ``compute_dtype`` as it is.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from lora_kernels.quant.nf4 import NF4Tensor, dequantize_nf4_ref, nf4_code
from lora_kernels.quant.quantize import BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_map, quantize_nf4

_STATE = ("weight", "absmax", "code", "nested_absmax", "nested_code", "offset")  # dtype fixed by the format
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _DequantizedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized in the forward and again for dX in the backward, as bitsandbytes' MatMul4Bit
    does: nothing W-sized is saved for backward (F.linear on a dequantized W would keep it, out·in·2-4 bytes per
    layer).  The dequantization is ``nf4_weight.dequantize``: the Triton kernel where the kernels serve x, the
    reference elsewhere.  The codes arrive as tensors (``parts``), the sizes as a constant, so torch.compile traces
    it."""

    @staticmethod
    def forward(ctx, x, bias, meta, *parts):
        from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight

        shape, blocksize, dtype = meta
        packed, absmax, code, nested_absmax, nested_code, offset = parts
        q = NF4Tensor(packed, absmax, shape, dtype, blocksize, code, nested_absmax, nested_code,
                      NESTED_BLOCKSIZE, offset)
        base = NF4Weight(q)
        ctx.base, ctx.has_bias, ctx.x_shape = base, bias is not None, x.shape
        return base.linear(x.reshape(-1, shape[1]), bias).reshape(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, g):
        g2d = g.reshape(-1, g.shape[-1])
        dx = ctx.base.grad_input(g2d).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        db = g2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (dx, db, None) + (None,) * 6


class NF4Linear(nn.Module):
    """y = x Wᵀ + b with W frozen as NF4 codes (module docstring).

    ``NF4Linear(in_features, out_features, ...)`` builds a blank layer of the right buffer shapes (all codes 0) to
    ``load_state_dict`` into; ``from_linear`` quantizes an ``nn.Linear``; ``from_nf4`` wraps an existing
    ``NF4Tensor`` without copying it (e.g. one read from a bitsandbytes layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"NF4Linear: {name} must be a positive int, got {v!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Linear: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"NF4Linear: compute_dtype must be a float dtype, got {compute_dtype!r}")
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        kw = dict(device=device)
        nested = None
        if double_quant:
            nested = dict(nested_absmax=torch.zeros(-(-n_blocks // NESTED_BLOCKSIZE), **kw),
                          nested_code=dynamic_map(signed=True).to(device))
        self._set_state(torch.zeros((n + 1) // 2, dtype=torch.uint8, **kw),
                        torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, **kw),
                        nf4_code(device), nested, torch.zeros((), **kw))
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.compute_dtype = blocksize, compute_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    def _set_state(self, packed, absmax, code, nested, offset):
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", code)
        self.register_buffer("nested_absmax", nested["nested_absmax"] if nested else None)
        self.register_buffer("nested_code", nested["nested_code"] if nested else None)
        self.register_buffer("offset", offset)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_nf4(cls, q: NF4Tensor, bias: Optional[torch.Tensor] = None) -> "NF4Linear":
        """A layer holding ``q``'s own tensors (``weight`` is ``q.packed`` viewed flat: no copy) and ``bias`` (used
        as given, frozen; None for none).  ``q.nested_blocksize`` must be 256 (bitsandbytes' only one)."""
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"NF4Linear.from_nf4: q must be an NF4Tensor, got {type(q).__name__}")
        q.validate()
        if q.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Linear.from_nf4: q.blocksize must be one of {BLOCKSIZES}, got {q.blocksize}")
        if q.nested and q.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4Linear.from_nf4: q.nested_blocksize must be {NESTED_BLOCKSIZE}, got "
                             f"{q.nested_blocksize}")
        out_f, in_f = q.shape
        if bias is not None and (bias.dim() != 1 or bias.numel() != out_f):
            raise ValueError(f"NF4Linear.from_nf4: bias must have shape ({out_f},), got {tuple(bias.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        nested = dict(nested_absmax=q.nested_absmax, nested_code=q.nested_code) if q.nested else None
        offset = (q.offset.detach().reshape(()) if isinstance(q.offset, torch.Tensor)
                  else torch.tensor(q.offset, dtype=torch.float32, device=q.device))
        self._set_state(q.packed.reshape(-1), q.absmax, q.code, nested, offset)
        self.in_features, self.out_features = in_f, out_f
        self.blocksize, self.compute_dtype = q.blocksize, q.dtype
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """Quantize ``linear.weight`` (``quantize_nf4``, on its device); the bias is copied, frozen, in its dtype.
        ``compute_dtype`` defaults to the weight's dtype.  ``linear`` itself is left as it was."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant,
                         compute_dtype=compute_dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_nf4(q, bias).train(linear.training)

    # -- the format ------------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def nf4_tensor(self) -> NF4Tensor:
        """The layer's weight as an ``NF4Tensor`` over its own buffers (no copy; validated)."""
        nested = {}
        if self.double_quant:
            nested = dict(nested_absmax=self.nested_absmax, nested_code=self.nested_code,
                          nested_blocksize=NESTED_BLOCKSIZE, offset=self.offset)
        return NF4Tensor(packed=self.weight, absmax=self.absmax, shape=(self.out_features, self.in_features),
                         dtype=self.compute_dtype, blocksize=self.blocksize, code=self.code, **nested)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W as a new dense out×in tensor of ``dtype`` (default: ``compute_dtype``)."""
        return dequantize_nf4_ref(self.nf4_tensor(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        bias = self.bias if self.bias is None or self.bias.dtype == dt else self.bias.to(dt)
        q = self.nf4_tensor()
        parts = (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset)
        y = _DequantizedLinear.apply(x.to(dt), bias, (q.shape, q.blocksize, dt), *parts)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Device moves reach the quantization state, dtype casts do not (module docstring)."""
        before = {n: self._buffers[n] for n in _STATE if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).replace('torch.', '')}")


def quantize_model(model: nn.Module, *, skip: Iterable[str] = ("lm_head",), blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every module of ``model`` whose type is exactly ``nn.Linear`` (subclasses keep their own
    forward, so they are left alone) and whose name's last component is not in ``skip`` by
    ``NF4Linear.from_linear(..., blocksize, double_quant, compute_dtype)``; returns ``model``.  The replaced
    layers can be listed afterwards with ``[n for n, m in model.named_modules() if isinstance(m, NF4Linear)]``.
    ``model`` itself is never replaced (an ``nn.Linear`` model is refused).  Every layer is quantized before any
    is swapped in, so an error leaves the model as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        raise TypeError(f"quantize_model: skip must be a collection of names, got the string {skip!r}")
    skip = set(skip)
    if type(model) is nn.Linear:
        raise TypeError("quantize_model: model is itself an nn.Linear; use NF4Linear.from_linear(model)")
    targets = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
               if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip]
    new = {}
    for name, lin in targets:
        if id(lin) not in new:  # one module reached under two names is quantized once
            new[id(lin)] = NF4Linear.from_linear(lin, blocksize, double_quant, compute_dtype)
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new[id(lin)])
    return model


__all__ = ["NF4Linear", "quantize_model"]
