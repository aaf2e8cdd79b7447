"""``FusedLoRALinear``: a drop-in replacement for ``nn.Linear`` with a LoRA adapter on the fused kernels.

Parameter names follow ``nn.Linear`` (``weight``, ``bias``, both frozen) so existing checkpoints load, and PEFT
(``lora_A`` of shape r×in, ``lora_B`` of shape out×r).  The layer's settings live in one ``LoRAConfig``
(``lora_config``); the class docstring tells the whole story.

What it wraps (``weight_layout``): an exact ``nn.Linear`` (W stored out×in) or an exact ``transformers`` ``Conv1D``
(GPT-2's layers: W stored in×out, PEFT's ``fan_in_fan_out``), whose weight reaches the op as the strided view
``weight.t()``, no copy.

``_KERNELS_ACCEPT_FP32_ADAPTERS`` (True): ``lora_linear`` takes fp32 adapters with a 16-bit base, so
``autocast_adapter_dtype`` (default True, PEFT's) makes fp16/bf16 layers create fp32 lora_A / lora_B, and
``autocast_adapter_dtype=False`` keeps them in the base weight's dtype.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels.config import LoRAConfig, math_dtype, non_default_fields, trainable_factors
from lora_kernels.ops import lora_linear

# What reconfigure may change: r fixes the factors' shapes, so a new r needs a new layer (and the weight's layout
# and the adapters' dtype are fixed at construction).
_RECONFIGURABLE = ("lora_alpha", "lora_dropout", "mode", "use_rslora", "init_A")

# lora_linear accepts fp32 lora_A / lora_B with an fp16 / bf16 weight and input (the LoRA branch in fp32, as PEFT:
# docs/design.md decision 14), so autocast_adapter_dtype is honoured.  False would create every adapter in the base
# weight's dtype.
_KERNELS_ACCEPT_FP32_ADAPTERS = True


def conv1d_class():
    """transformers' ``Conv1D`` class, or None when transformers is not loaded (then no Conv1D instance can exist)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Linear or a transformers Conv1D, subclasses included, or a 4-bit linear (what
    "all-linear" means in PEFT); only the exact classes (``weight_layout``) and the 4-bit linears
    (``is_quantized_linear``) can be wrapped."""
    conv1d = conv1d_class()
    return (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
            or is_quantized_linear(module))


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a 4-bit linear that ``FusedLoRALinear4bit`` wraps (bitsandbytes Linear4bit, our
    NF4Linear)."""
    from lora_kernels.modules.lora_linear_4bit import is_quantized_linear as quantized

    return quantized(module)


def weight_layout(module: nn.Module) -> Optional[bool]:
    """``fan_in_fan_out`` of a module FusedLoRALinear can wrap: False for an exact nn.Linear (W out×in), True for an
    exact transformers Conv1D (W in×out), None for anything else (subclasses too: their own forward would be lost)."""
    if type(module) is nn.Linear:
        return False
    conv1d = conv1d_class()
    if conv1d is not None and type(module) is conv1d:
        return True
    return None


def base_features(module: nn.Module) -> tuple:
    """(in_features, out_features) of a module ``weight_layout`` accepts (a Conv1D stores its weight in×out)."""
    if weight_layout(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def adapter_dtype(weight_dtype: Optional[torch.dtype], config: LoRAConfig) -> Optional[torch.dtype]:
    """The dtype of lora_A / lora_B for a base weight of ``weight_dtype``: fp32 for an fp16 / bf16 base when
    ``config.autocast_adapter_dtype`` (PEFT's rule) and the kernels accept it (``_KERNELS_ACCEPT_FP32_ADAPTERS``),
    else the base weight's dtype."""
    if (_KERNELS_ACCEPT_FP32_ADAPTERS and config.autocast_adapter_dtype
            and weight_dtype in (torch.float16, torch.bfloat16)):
        return torch.float32
    return weight_dtype


def _init_random_factor(t: torch.Tensor, how: str, r: int) -> None:
    """Fill the random adapter factor in place: PEFT's kaiming-uniform, PEFT's gaussian (std 1/r), or Haar."""
    if how == "kaiming":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    elif how == "gaussian":
        nn.init.normal_(t, std=1.0 / r)
    else:  # orthogonal: rows (or columns) of a Haar-random orthogonal matrix, computed in math_dtype (fp32 or fp64)
        tmp = torch.empty(t.shape, dtype=math_dtype(t), device=t.device)
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

    ``fan_in_fan_out=True``: ``weight`` is stored in×out, as transformers' ``Conv1D`` (GPT-2) stores it; the op gets
    the view ``weight.t()`` (no copy) and merges add (s·BA)ᵀ.  ``from_linear`` wraps an nn.Linear or a Conv1D and
    sets it from the module's type.

    ``autocast_adapter_dtype`` (default True, PEFT's): fp32 adapters on an fp16 / bf16 base (y and the input's
    gradient stay in the base dtype, lora_A / lora_B and their gradients are fp32, the LoRA branch runs in fp32 as in
    PEFT); False keeps the adapters in the base weight's dtype.

    Settings: keywords (``r``, ``lora_alpha``, ``lora_dropout``, ``mode``, ``use_rslora``, ``init_A``,
    ``fan_in_fan_out``, ``autocast_adapter_dtype``) or ``config=LoRAConfig(...)`` (its model-level fields, targets,
    patterns and modules_to_save, are inject_lora's and dropped here), validated by ``LoRAConfig.validate`` and kept in
    ``lora_config``; the attributes of the same names read it.  ``init_A=None`` is the mode's default
    (``lora_kernels.config.default_init``: "orthogonal" in mode "B", "kaiming" otherwise).
    ``reconfigure(**changes)`` changes them in place.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, mode: str = "AB", use_rslora: bool = False,
                 init_A: Optional[str] = None, device=None, dtype=None, *, fan_in_fan_out: bool = False,
                 autocast_adapter_dtype: bool = True, config: Optional[LoRAConfig] = None):
        super().__init__()
        self._check_features(in_features, out_features)
        cfg = _resolve_config(config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode,
                              use_rslora=use_rslora, init_A=init_A, fan_in_fan_out=fan_in_fan_out,
                              autocast_adapter_dtype=autocast_adapter_dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (float32, float16, bfloat16, float64), "
                            f"got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features) if cfg.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_config = cfg
        self._reset_base()
        self._init_adapter(cfg, device=device, dtype=self.weight.dtype)

    # -- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _check_features(in_features, out_features) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def _reset_base(self) -> None:
        # nn.Linear.reset_parameters, so a freshly built layer matches nn.Linear's init (on the out×in view).
        nn.init.kaiming_uniform_(self.out_in_weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def _init_adapter(self, cfg: LoRAConfig, device=None, dtype=None) -> None:
        """lora_A / lora_B for a base weight of ``dtype`` (in ``adapter_dtype(dtype, cfg)``), freshly drawn."""
        self.lora_config = cfg
        dtype = adapter_dtype(dtype, cfg)
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
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    mode: str = "AB", use_rslora: bool = False, init_A: Optional[str] = None, *,
                    autocast_adapter_dtype: bool = True, config: Optional[LoRAConfig] = None) -> "FusedLoRALinear":
        """Wrap an existing ``nn.Linear``, or a transformers ``Conv1D`` (``fan_in_fan_out``, set from the type): its
        ``weight``/``bias`` Parameters are shared (not copied) and frozen.  A 4-bit linear (bitsandbytes
        ``Linear4bit``, our ``NF4Linear``) gives a ``FusedLoRALinear4bit`` wrapping it."""
        if is_quantized_linear(linear):
            from lora_kernels.modules.lora_linear_4bit import FusedLoRALinear4bit

            return FusedLoRALinear4bit.from_linear(linear, r, lora_alpha, lora_dropout, mode, use_rslora, init_A,
                                                   autocast_adapter_dtype=autocast_adapter_dtype, config=config)
        layout = weight_layout(linear)
        if layout is None:
            raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D (not a subclass, whose own forward "
                            f"would be lost), got {type(linear).__name__}")
        in_f, out_f = base_features(linear)
        cls._check_features(in_f, out_f)
        cfg = _resolve_config(config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode,
                              use_rslora=use_rslora, init_A=init_A, autocast_adapter_dtype=autocast_adapter_dtype)
        if config is not None and config.fan_in_fan_out and not layout:
            raise ValueError("config.fan_in_fan_out is True but linear is an nn.Linear, whose weight is stored "
                             "out×in (fan_in_fan_out is for transformers Conv1D layers)")
        cfg = cfg.replace(fan_in_fan_out=layout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_f, out_f
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(cfg, device=linear.weight.device, dtype=linear.weight.dtype)
        self.train(linear.training)
        return self

    def to_base_module(self) -> nn.Module:
        """The plain module this layer stands for (nn.Linear, or Conv1D when ``fan_in_fan_out``), sharing ``weight``
        and ``bias``, in this layer's training mode; the adapter is not applied (merge first to keep it)."""
        if self.fan_in_fan_out:
            conv1d = conv1d_class()
            base = conv1d.__new__(conv1d)
            nn.Module.__init__(base)
            base.nf, base.nx = self.out_features, self.in_features
        else:
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight = self.weight
        base.bias = self.bias
        return base.train(self.training)

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

    @property
    def fan_in_fan_out(self) -> bool:
        return self.lora_config.fan_in_fan_out

    @property
    def autocast_adapter_dtype(self) -> bool:
        return self.lora_config.autocast_adapter_dtype

    @property
    def out_in_weight(self) -> torch.Tensor:
        """W as out×in, whatever its storage: ``weight`` itself, or the view ``weight.t()`` when ``fan_in_fan_out``
        (no copy; writing into it writes ``weight``)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.out_in_weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.out_in_weight, self.bias, self.lora_A, self.lora_B, self.scaling, p)

    # -- merge -------------------------------------------------------------------------------------------
    def _delta_weight(self) -> torch.Tensor:
        """s·BA (out×in) in ``math_dtype`` of the weight."""
        dt = math_dtype(self.weight)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        w = self.out_in_weight
        w.copy_((w.to(math_dtype(w)) + sign * self._delta_weight()).to(w.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·BA into ``weight`` (in fp32, fp64 for fp64 weights, then cast) so inference is a plain linear."""
        if self.merged:
            return
        self._add_delta(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to one rounding of ``weight`` in its own dtype)."""
        if not self.merged:
            return
        self._add_delta(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, mode={self.mode!r}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))
