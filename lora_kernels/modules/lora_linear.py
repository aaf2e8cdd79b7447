"""``FusedLoRALinear``: a drop-in replacement for ``nn.Linear`` with a LoRA adapter on the fused kernels.

Parameter names follow ``nn.Linear`` (``weight``, ``bias``, both frozen) so existing checkpoints load, and PEFT
(``lora_A`` of shape r×in, ``lora_B`` of shape out×r).

Modes (which adapter factor trains):
  * ``"AB"``: both; A random (``init_A``), B zero, so the adapter starts as the identity map of the base layer.
  * ``"B"``: B only, A frozen random (Zhu et al. 2024, arXiv 2402.16842); the backward never computes A's
    gradient and keeps only the N×r activation t = dropout(x)Aᵀ, never x.
  * ``"A"``: A only, B frozen random; here A starts at zero and B takes the random init (a frozen zero B would
    give A a zero gradient forever), which is the "train A, freeze random B" arm of the same paper.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels.ops.fused_lora_linear import lora_linear

_MODES = ("AB", "B", "A")
_INITS = ("kaiming", "gaussian", "orthogonal")


def _init_random_factor(t: torch.Tensor, how: str, r: int) -> None:
    """Fill the random adapter factor in place: PEFT's kaiming-uniform, PEFT's gaussian (std 1/r), or Haar."""
    if how == "kaiming":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    elif how == "gaussian":
        nn.init.normal_(t, std=1.0 / r)
    else:  # orthogonal: rows (or columns) of a Haar-random orthogonal matrix, computed in fp32
        tmp = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        nn.init.orthogonal_(tmp)
        t.copy_(tmp)


class FusedLoRALinear(nn.Module):
    """y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ with s = lora_alpha / r (or lora_alpha / √r with rsLoRA)."""

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, mode: str = "AB", use_rslora: bool = False,
                 init_A: str = "kaiming", device=None, dtype=None):
        super().__init__()
        self._check_config(in_features, out_features, r, lora_alpha, lora_dropout, mode, init_A)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._reset_base()
        self._init_adapter(r, lora_alpha, lora_dropout, mode, use_rslora, init_A, **factory)

    # -- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _check_config(in_features, out_features, r, lora_alpha, lora_dropout, mode, init_A):
        for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if not isinstance(lora_dropout, (int, float)) or not (0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if init_A not in _INITS:
            raise ValueError(f"init_A must be one of {_INITS}, got {init_A!r}")

    def _reset_base(self) -> None:
        # nn.Linear.reset_parameters, so a freshly built layer matches nn.Linear's init.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def _init_adapter(self, r, lora_alpha, lora_dropout, mode, use_rslora, init_A, device=None, dtype=None):
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.mode, self.use_rslora, self.init_A = mode, use_rslora, init_A
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty((r, self.in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, r), device=device, dtype=dtype))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-draw the adapter: the random factor with ``init_A``'s scheme, the trained factor at zero (module doc)."""
        with torch.no_grad():
            if self.mode == "A":
                _init_random_factor(self.lora_B, self.init_A, self.r)
                self.lora_A.zero_()
            else:
                _init_random_factor(self.lora_A, self.init_A, self.r)
                self.lora_B.zero_()
        self.lora_A.requires_grad_(self.mode in ("AB", "A"))
        self.lora_B.requires_grad_(self.mode in ("AB", "B"))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    mode: str = "AB", use_rslora: bool = False, init_A: str = "kaiming") -> "FusedLoRALinear":
        """Wrap an existing ``nn.Linear``: its ``weight``/``bias`` Parameters are shared (not copied) and frozen."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear (not a subclass, whose own forward would be lost), got "
                            f"{type(linear).__name__}")
        cls._check_config(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, mode, init_A)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(r, lora_alpha, lora_dropout, mode, use_rslora, init_A,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        return self

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, p)

    # -- merge -------------------------------------------------------------------------------------------
    def _math_dtype(self) -> torch.dtype:
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _delta_weight(self) -> torch.Tensor:
        dt = self._math_dtype()
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·BA into ``weight`` (in fp32, fp64 for fp64 weights, then cast) so inference is a plain linear."""
        if self.merged:
            return
        self.weight.copy_((self.weight.to(self._math_dtype()) + self._delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to one rounding of ``weight`` in its own dtype)."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.to(self._math_dtype()) - self._delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, mode={self.mode!r}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
