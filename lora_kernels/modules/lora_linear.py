"""``FusedLoRALinear``: a drop-in replacement for ``nn.Linear`` with a LoRA adapter on the fused kernels.

Parameter names follow ``nn.Linear`` (``weight``, ``bias``, both frozen) so existing checkpoints load, and PEFT
(``lora_A`` of shape r×in, ``lora_B`` of shape out×r).  The layer's settings live in one ``LoRAConfig``
(``lora_config``); the class docstring tells the whole story.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels.config import LoRAConfig, math_dtype, non_default_fields, trainable_factors
from lora_kernels.ops import lora_linear

# What reconfigure may change: r fixes the factors' shapes, so a new r needs a new layer.
_RECONFIGURABLE = ("lora_alpha", "lora_dropout", "mode", "use_rslora", "init_A")


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


def _resolve_config(config: Optional[LoRAConfig], **keywords) -> LoRAConfig:
    """The layer's LoRAConfig: ``config`` (its per-layer part) or one built, and so validated, from the keywords.
    Both at once is refused rather than silently preferring one."""
    if config is None:
        return LoRAConfig(**keywords)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    given = non_default_fields(keywords)
    if given:
        raise TypeError(f"pass the LoRA settings either as config= or as keywords, not both (got config and "
                        f"{', '.join(given)})")
    return config.for_layer()


class FusedLoRALinear(nn.Module):
    """y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ: a frozen ``nn.Linear`` (W: out×in, b) plus a rank-r adapter
    (A = ``lora_A``: r×in, B = ``lora_B``: out×r), run as one fused kernel.

    Scale: s = lora_alpha / r, or lora_alpha / √r with ``use_rslora`` (``lora_kernels.config.scaling``, PEFT's
    formula); ``scaling`` holds it.  Dropout (inverted, as nn.Dropout, only in training) acts on the adapter's input
    only; its mask is regenerated from a seed, never stored.

    Modes (which factor trains, ``trainable_factors``) and their initialisation; the trained factor starts at zero,
    so every fresh layer computes exactly its base ``nn.Linear``:
      * ``"AB"``: both train; A random (``init_A``), B = 0.  (A's gradient is zero at the first step, as in every LoRA.)
      * ``"B"``: B trains, A frozen random (Zhu et al. 2024, arXiv 2402.16842); A's gradient is never computed.
      * ``"A"``: A trains, B frozen random; here A = 0 and B takes the random init (a frozen zero B would give A a
        zero gradient forever): the "train A, freeze random B" arm of the same paper.

    ``init_A`` (the random factor's draw): ``"kaiming"`` PEFT's default kaiming-uniform (a = √5), ``"gaussian"``
    N(0, 1/r²) as PEFT's "gaussian", ``"orthogonal"`` rows (or columns) of a Haar-random orthogonal matrix.

    Saved for backward (W, A, B are parameters, kept by reference; the seed is a CPU int64 scalar tensor):
      * ``"AB"``: x (the input itself, same storage, no copy), t = s·dropout(x)Aᵀ (N×r) and the seed;
      * ``"B"``: t and the seed, never x (unless W itself was made trainable): B-only training keeps N×r per layer
        instead of N×in;
      * ``"A"``: x and the seed;
      * under ``torch.no_grad`` / inference mode (or when nothing requires grad): nothing.  ``eval()`` only turns
        dropout off.

    ``merge()`` folds s·BA into W (computed in fp32, fp64 for fp64 weights, then cast) so inference is one plain
    GEMM; ``unmerge()`` takes it out again (exact up to one rounding of W in its own dtype).

    Settings: keywords (``r``, ``lora_alpha``, ``lora_dropout``, ``mode``, ``use_rslora``, ``init_A``) or
    ``config=LoRAConfig(...)`` (its model-level fields, targets, patterns and modules_to_save, are inject_lora's and
    dropped here), validated by ``LoRAConfig.validate`` and kept in ``lora_config``; the attributes of the same names
    read it.  ``reconfigure(**changes)`` changes them in place.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, mode: str = "AB", use_rslora: bool = False,
                 init_A: str = "kaiming", device=None, dtype=None, *, config: Optional[LoRAConfig] = None):
        super().__init__()
        self._check_features(in_features, out_features)
        cfg = _resolve_config(config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode,
                              use_rslora=use_rslora, init_A=init_A)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._reset_base()
        self._init_adapter(cfg, **factory)

    # -- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _check_features(in_features, out_features) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def _reset_base(self) -> None:
        # nn.Linear.reset_parameters, so a freshly built layer matches nn.Linear's init.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def _init_adapter(self, cfg: LoRAConfig, device=None, dtype=None) -> None:
        self.lora_config = cfg
        self.lora_A = nn.Parameter(torch.empty((cfg.r, self.in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, cfg.r), device=device, dtype=dtype))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-draw the adapter: the random factor with ``init_A``'s scheme, the trained factor at zero (class doc)."""
        with torch.no_grad():
            if not self.lora_config.trains_B:  # mode "A": B is the frozen random factor
                _init_random_factor(self.lora_B, self.init_A, self.r)
                self.lora_A.zero_()
            else:
                _init_random_factor(self.lora_A, self.init_A, self.r)
                self.lora_B.zero_()
        self.set_trainable()

    def set_trainable(self) -> None:
        """``lora_A`` / ``lora_B`` require grad as ``mode`` says (``trainable_factors``); W and b are left alone."""
        train_A, train_B = trainable_factors(self.mode)
        self.lora_A.requires_grad_(train_A)
        self.lora_B.requires_grad_(train_B)

    def reconfigure(self, **changes) -> None:
        """Change lora_alpha, lora_dropout, use_rslora, mode or init_A in place (validated by LoRAConfig): the factors
        are kept, ``scaling`` follows, and so does which factor trains.  Not while merged (W holds the old s·BA)."""
        bad = sorted(set(changes) - set(_RECONFIGURABLE))
        if bad:
            raise ValueError(f"reconfigure can change {', '.join(_RECONFIGURABLE)}; not {', '.join(bad)}")
        if self.merged:
            raise RuntimeError("reconfigure a merged layer: unmerge() first (W holds the old scale's s·BA)")
        self.lora_config = self.lora_config.replace(**changes)
        self.set_trainable()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    mode: str = "AB", use_rslora: bool = False, init_A: str = "kaiming", *,
                    config: Optional[LoRAConfig] = None) -> "FusedLoRALinear":
        """Wrap an existing ``nn.Linear``: its ``weight``/``bias`` Parameters are shared (not copied) and frozen."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear (not a subclass, whose own forward would be lost), got "
                            f"{type(linear).__name__}")
        cls._check_features(linear.in_features, linear.out_features)
        cfg = _resolve_config(config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode,
                              use_rslora=use_rslora, init_A=init_A)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(cfg, device=linear.weight.device, dtype=linear.weight.dtype)
        return self

    # -- settings, read from lora_config -------------------------------------------------------------------
    @property
    def r(self) -> int:
        return self.lora_config.r

    @property
    def lora_alpha(self) -> float:
        return self.lora_config.lora_alpha

    @property
    def lora_dropout(self) -> float:
        return self.lora_config.lora_dropout

    @property
    def mode(self) -> str:
        return self.lora_config.mode

    @property
    def use_rslora(self) -> bool:
        return self.lora_config.use_rslora

    @property
    def init_A(self) -> str:
        return self.lora_config.init_A

    @property
    def scaling(self) -> float:
        return self.lora_config.scaling

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, p)

    # -- merge -------------------------------------------------------------------------------------------
    def _delta_weight(self) -> torch.Tensor:
        dt = math_dtype(self.weight)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·BA into ``weight`` (in fp32, fp64 for fp64 weights, then cast) so inference is a plain linear."""
        if self.merged:
            return
        self.weight.copy_((self.weight.to(math_dtype(self.weight)) + self._delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to one rounding of ``weight`` in its own dtype)."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.to(math_dtype(self.weight)) - self._delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, mode={self.mode!r}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
