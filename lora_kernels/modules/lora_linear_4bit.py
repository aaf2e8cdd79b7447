"""``FusedLoRALinear4bit``: LoRA on a frozen 4-bit NF4 base (QLoRA), on the fused kernels.

It wraps the quantized layer itself as ``base_layer`` (PEFT's name and state-dict keys, ``base_layer.weight``),
either bitsandbytes' ``Linear4bit`` (``load_in_4bit=True``, nf4, with or without double quantization) or our own
``lora_kernels.quant.NF4Linear``, and reads its codes and scales in place (``NF4Tensor``: no copy, no
re-quantization).  Everything else -- modes, dropout, scaling, fp32 adapters, reconfigure -- is
``FusedLoRALinear``'s.

Compute dtype: the base layer's (bitsandbytes' ``compute_dtype``): x is cast to it on entry and y back to x's dtype,
as ``Linear4bit.forward`` does.  The adapters are fp32 on a 16-bit compute dtype (``autocast_adapter_dtype``, PEFT's
default) or in the compute dtype.

``merge()`` is refused: folding s·BA into 4-bit codes means re-quantizing W + s·BA, which changes W by up to half a
quantization step everywhere (far more than s·BA itself early in training) and cannot be undone exactly.  To export,
load the base in 16 bits and merge there, or use ``dequantized_linear(merge=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lora_kernels.config import LoRAConfig
from lora_kernels.modules.lora_linear import FusedLoRALinear, _resolve_config
from lora_kernels.ops import lora_linear
from lora_kernels.quant.bnb import is_bnb_linear4bit, nf4_from_bnb
from lora_kernels.quant.linear import NF4Linear
from lora_kernels.quant.nf4 import NF4Tensor


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a 4-bit linear FusedLoRALinear4bit can wrap: our NF4Linear or bitsandbytes' Linear4bit
    (its LinearNF4 / LinearFP4 subclasses only change defaults, so they count)."""
    return type(module) is NF4Linear or is_bnb_linear4bit(module)


def nf4_of(module: nn.Module) -> NF4Tensor:
    """The ``NF4Tensor`` view (no copy) of a quantized linear's weight."""
    if type(module) is NF4Linear:
        return module.nf4_tensor()
    return nf4_from_bnb(module)


class FusedLoRALinear4bit(FusedLoRALinear):
    """y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ with W frozen as 4-bit NF4 codes (module docstring).

    Saved for backward: as ``FusedLoRALinear`` (B-only: t' and the seed; AB: x, t' and the seed); the codes are the
    base layer's frozen buffers, kept by reference.  The kernels never hold a dequantized copy of W past one call:
    the fused arrangement decodes W tiles in registers, the scratch arrangement dequantizes W into a compute-dtype
    buffer (out·in·2 bytes for 16-bit) for one cuBLAS product and frees it.
    """

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    mode: str = "AB", use_rslora: bool = False, init_A: Optional[str] = None, *,
                    autocast_adapter_dtype: bool = True,
                    config: Optional[LoRAConfig] = None) -> "FusedLoRALinear4bit":
        """Wrap a quantized linear (``is_quantized_linear``); its parameters are frozen and shared, not copied."""
        if not is_quantized_linear(linear):
            raise TypeError(f"linear must be a 4-bit linear (bitsandbytes Linear4bit or lora_kernels NF4Linear), got "
                            f"{type(linear).__name__}")
        q = nf4_of(linear)  # validates the layout (quant type, sizes) before anything is built
        cfg = _resolve_config(config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode,
                              use_rslora=use_rslora, init_A=init_A, autocast_adapter_dtype=autocast_adapter_dtype)
        if cfg.fan_in_fan_out:
            raise ValueError("config.fan_in_fan_out is True but a 4-bit linear stores W out×in")
        out_f, in_f = q.shape
        cls._check_features(in_f, out_f)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_f, out_f
        self.base_layer = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        self._init_adapter(cfg, device=q.device, dtype=q.dtype)
        self.train(linear.training)
        return self

    # -- the frozen base -----------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's packed codes (a uint8 / bitsandbytes Params4bit tensor), not a dense W."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def out_in_weight(self) -> torch.Tensor:
        raise TypeError("a 4-bit base has no dense out×in weight to view or write; dequantized_weight() returns a "
                        "dense copy")

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.nf4().dtype

    def nf4(self) -> NF4Tensor:
        """The base weight as an ``NF4Tensor`` over the base layer's own tensors (no copy, no device sync), built at
        each call, so it always describes the layer's current codes."""
        return nf4_of(self.base_layer)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W as a dense out×in tensor (a new one) of ``dtype`` (default: the compute dtype)."""
        from lora_kernels.ops.lora_linear.nf4_weight import dequantize

        return dequantize(self.nf4(), dtype=dtype)

    def dequantized_linear(self, merge: bool = True) -> nn.Linear:
        """A dense nn.Linear in the compute dtype holding the dequantized W (+ s·BA when ``merge``) and the bias."""
        w = self.dequantized_weight(torch.float32 if self.compute_dtype != torch.float64 else torch.float64)
        if merge:
            w = w + self._delta_weight().to(w.dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=self.compute_dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False).train(self.training)

    def to_base_module(self) -> nn.Module:
        """The wrapped 4-bit layer itself (the adapter is not applied)."""
        return self.base_layer.train(self.training)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.nf4()
        p = self.lora_dropout if self.training else 0.0
        xc = x if x.dtype == q.dtype else x.to(q.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        y = lora_linear(xc, q, bias, self.lora_A, self.lora_B, self.scaling, p)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    # -- merge ---------------------------------------------------------------------------------------------
    def _delta_weight(self) -> torch.Tensor:
        dt = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling

    def merge(self) -> None:
        raise RuntimeError("merge() on a 4-bit base is refused: it would re-quantize W + s·BA (lossy, not undoable). "
                           "Load the base model in 16 bits and merge the adapter there, or use "
                           "dequantized_linear(merge=True) / unload_lora(model, merge=False)")

    def unmerge(self) -> None:
        return None  # never merged

    def extra_repr(self) -> str:
        q = self.nf4()
        return (super().extra_repr() + f", base=NF4(blocksize={q.blocksize}, double_quant={q.nested}, "
                f"compute_dtype={str(q.dtype).replace('torch.', '')})")


__all__ = ["FusedLoRALinear4bit", "is_quantized_linear", "nf4_of"]
