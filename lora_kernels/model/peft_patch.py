"""Run an existing PEFT LoRA model on the fused kernels: ``patch_peft(model)`` / ``unpatch_peft(model)``.

Nothing is replaced.  Each supported ``peft.tuners.lora.Linear`` instance gets an instance-level ``forward`` (a bound
method in its ``__dict__``; the class and every other instance are untouched) that reads PEFT's live state at call
time and calls ``lora_linear`` when that state is one the op computes exactly, and PEFT's own forward (the class's
``forward``) otherwise.  The module tree, parameter names, ``state_dict``, ``save_pretrained``, ``merge_and_unload``,
``set_adapter``, ``disable_adapter()`` and ``enable/disable_adapter_layers`` are PEFT's, unchanged.
``unpatch_peft`` deletes the instance attribute, so ``layer.forward.__func__`` is the class's function again.

PEFT 0.21's ``Linear.forward`` (peft/tuners/lora/layer.py), which the fast path reproduces::

    result = self.base_layer(x)                       # nn.Linear: x Wᵀ + b;  transformers Conv1D: x W + b (W in×out)
    for name in self.active_adapters (those this layer has):
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        result = result + lora_B(lora_A(dropout(x))) * self.scaling[name]     # a LoraVariant (DoRA...) instead
    result = result.to(base dtype)

The fast path is ``lora_linear(x, W, b, A, B, scaling, p)``, with W = ``base.weight.t()`` (a strided view, no copy)
for Conv1D (PEFT's ``fan_in_fan_out=True``) and p = the adapter's ``nn.Dropout`` p in training mode (the mask is the
kernels' own, drawn from torch's generator), 0 for ``nn.Identity`` or in eval mode.

Decided at each call (PEFT's forward runs instead; that is exact, since it *is* PEFT's forward):
  * adapters disabled, or merged (PEFT then runs the base layer; with both it also unmerges);
  * extra positional or keyword arguments (e.g. ``adapter_names`` for mixed batches);
  * not exactly one active adapter present in this layer (none: base only; several: PEFT sums them);
  * the active adapter uses a LoRA variant (DoRA, ...) or ``lora_bias``;
  * the base layer is not a plain ``nn.Linear`` / transformers ``Conv1D`` (quantized, another wrapper), or any of
    base / lora_A / lora_B / dropout has hooks or an overridden forward (they would be skipped), or global module
    hooks are registered;
  * dtypes that ``lora_linear`` does not take outside autocast: x, W, b must share one dtype and A, B another, equal
    to it or float32 on a float16 / bfloat16 base (PEFT's default ``autocast_adapter_dtype=True``, served as PEFT
    computes it: the LoRA branch in fp32, the sum cast back to the base dtype); under autocast all operands run in
    the autocast dtype, as PEFT's layers do there;
  * devices differ, an empty input, a non-float dtype, or a tensor subclass.

QLoRA: PEFT's bitsandbytes 4-bit ``lora.Linear4bit`` with an NF4 ``Linear4bit`` base is served too (``_nf4_operands``):
the op reads the layer's codes in place (``NF4Tensor``) and decodes W inside its GEMM.  PEFT's 4-bit forward differs
from ``lora.Linear``'s in one place: it rounds the LoRA term to the result's dtype before adding it.

Never patched (reported): LoRA layers that are not ``lora.Linear`` / ``lora.Linear4bit`` (Embedding, Conv,
MultiheadAttention, 8-bit and other quantized classes, ParamWrapper...), layers whose base is none of nn.Linear,
Conv1D or an NF4 Linear4bit (FP4 codes included), or whose every adapter is a variant (DoRA...) or has lora_bias,
and instances whose forward was already overridden (e.g. an accelerate hook).
"""

from __future__ import annotations

import collections
import functools
import sys
import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels._backend import logger
from lora_kernels.ops.lora_linear import function as _function
from lora_kernels.quant.bnb import is_bnb_linear4bit, nf4_from_bnb

__all__ = ["patch_peft", "unpatch_peft", "is_peft_patched"]

_SERVED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_EXAMPLES = 3  # layer names shown per group in the log line


# --------------------------------------------------------------------------------------------------------------
# PEFT / transformers classes, imported lazily (lora_kernels imports without them)
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _peft_classes():
    """(LoraLayer, lora Linear) of the installed PEFT."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as e:  # pragma: no cover - peft is installed where this is used
        raise ImportError("patch_peft needs peft installed (pip install peft)") from e
    return LoraLayer, LoraLinear


@functools.lru_cache(maxsize=None)
def _peft_bnb4_class():
    """PEFT's bitsandbytes 4-bit LoRA layer class (QLoRA), or None when PEFT has none (bitsandbytes missing)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


@functools.lru_cache(maxsize=None)
def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - peft depends on transformers
        return None
    return Conv1D


def _base_kind(base: nn.Module) -> Optional[str]:
    """"linear" (y = x Wᵀ + b), "conv1d" (transformers Conv1D: y = x W + b, W in×out), "nf4" (bitsandbytes
    Linear4bit with NF4 codes, its own forward), or None (anything else, including subclasses that override
    forward)."""
    fwd = type(base).forward
    if fwd is nn.Linear.forward:
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and fwd is conv1d.forward:
        return "conv1d"
    if is_bnb_linear4bit(base):
        bnb_forward = getattr(sys.modules["bitsandbytes"].nn.Linear4bit, "forward", None)
        if fwd is bnb_forward and getattr(base.weight, "quant_type", None) == "nf4":
            return "nf4"
    return None


def _has_own_forward_or_hooks(m: nn.Module) -> bool:
    return ("forward" in m.__dict__ or bool(m._forward_hooks) or bool(m._forward_pre_hooks)
            or bool(m._backward_hooks) or bool(m._backward_pre_hooks))


def _global_hooks() -> bool:
    mm = nn.modules.module
    return any(bool(getattr(mm, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _is_plain(t) -> bool:
    return t is None or (type(t) in _PLAIN_TENSOR_TYPES and t.dtype in _SERVED_DTYPES)


def _dropout_p(dropout: nn.Module) -> Optional[float]:
    """The adapter's dropout probability now (0 for Identity or eval mode), or None for a module we do not know."""
    if type(dropout) is nn.Identity:
        return 0.0
    if type(dropout) is nn.Dropout:
        if not dropout.training or dropout.p == 0:
            return 0.0
        return float(dropout.p) if 0.0 < dropout.p < 1.0 else None
    return None


def _adapter_unsupported(layer, name: str) -> Optional[str]:
    """Why adapter ``name`` of ``layer`` cannot run on the op (a reason for the log), or None if it can."""
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        variant = getattr(layer, "lora_variant", {}).get(name)
        kind = type(variant).__name__.replace("LinearVariant", "") if variant is not None else "Dora"
        return f"LoRA variant ({kind})"
    a, b = layer.lora_A[name], layer.lora_B[name]
    if getattr(layer, "lora_bias", {}).get(name, False) or getattr(b, "bias", None) is not None:
        return "lora_bias"
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None:
        return "lora_A/lora_B are not plain bias-free nn.Linear"
    return None


# --------------------------------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _note_fallback(reason: str) -> None:
    logger.info("lora_kernels.patch_peft: a patched layer ran PEFT's forward because %s (said once per reason)",
                reason)


def _fast_operands(self, x):
    """(x, W, b, A, B, scale, p) for ``lora_linear``, or a str: why PEFT's forward must run this call."""
    if self.disable_adapters or self.merged:
        return ""  # PEFT's own, well-defined states: no note
    present = [n for n in self.active_adapters if n in self.lora_A]
    if len(present) != 1:
        return "" if not present else "several adapters are active"
    name = present[0]
    why = _adapter_unsupported(self, name)
    if why is not None:
        return why
    base = self.base_layer
    kind = _base_kind(base)
    if kind is None:
        return f"its base layer is a {type(base).__name__}"
    lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    if any(_has_own_forward_or_hooks(m) for m in (base, lora_A, lora_B, dropout)) or _global_hooks():
        return "a module it calls has hooks or an overridden forward"
    p = _dropout_p(dropout)
    if p is None:
        return f"its dropout is a {type(dropout).__name__}"
    scale = self.scaling[name]
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.requires_grad:
        scale = scale.item()
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return f"its scaling is a {type(scale).__name__}"
    w, bias, a, b = base.weight, base.bias, lora_A.weight, lora_B.weight
    if kind == "nf4":
        return _nf4_operands(self, x, base, a, b, float(scale), p)
    if not all(_is_plain(t) for t in (w, bias, a, b)) or not isinstance(x, torch.Tensor) or not _is_plain(x):
        return "an operand is not a plain float tensor"
    if x.dim() < 1 or x.numel() == 0:
        return "its input is empty"
    dev = x.device
    if any(t.device != dev for t in (w, a, b) + ((bias,) if bias is not None else ())):
        return "its operands are on different devices"
    if kind == "conv1d":
        w = w.t()  # Conv1D keeps W as in×out: its transpose is the out×in view lora_linear wants, no copy
    if dev.type in ("cuda", "cpu") and torch.is_autocast_enabled(dev.type):
        # PEFT's layers under autocast (F.linear / addmm) all run in the autocast dtype, whatever the operands are.
        dt = torch.get_autocast_dtype(dev.type)
        x, w, a, b = x.to(dt), w.to(dt), a.to(dt), b.to(dt)
        bias = bias.to(dt) if bias is not None else None
    else:
        why = _dtypes_unsupported(x, w, bias, a, b)
        if why is not None:
            return why
    return (x, w, bias, a, b, float(scale), p), None


def _nf4_operands(self, x, base, a, b, scale, p):
    """The fast path's operands for PEFT's bitsandbytes 4-bit layer: x in the base's compute dtype, W the layer's
    own codes (``NF4Tensor``: no copy, no device sync).  PEFT rounds the LoRA term to the result's dtype before adding
    it; the op adds in fp32 and rounds once (≤ 1 ulp of that dtype apart).

    PEFT's forward runs instead when x's dtype is not the compute dtype (e.g. fp32 hidden states from
    ``prepare_model_for_kbit_training`` on a bf16 compute dtype): bitsandbytes rounds x for the base product only,
    and PEFT runs the LoRA branch on x itself, which one op on one x cannot reproduce; also before bitsandbytes has
    fixed its compute dtype (a layer built without one takes x's on its first call), and under autocast
    (bitsandbytes keeps its compute dtype there, the LoRA branch autocasts)."""
    if not all(_is_plain(t) for t in (base.bias, a, b)) or not isinstance(x, torch.Tensor) or not _is_plain(x):
        return "an operand is not a plain float tensor"
    if x.dim() < 1 or x.numel() == 0:
        return "its input is empty"
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return "autocast is on with a 4-bit base"
    if not getattr(base, "compute_type_is_set", True):
        return "bitsandbytes has not fixed the 4-bit base's compute dtype yet (its first call does)"
    q = nf4_from_bnb(base)
    if x.dtype != q.dtype:
        return (f"x is {str(x.dtype).replace('torch.', '')} but the 4-bit base computes in "
                f"{str(q.dtype).replace('torch.', '')} (PEFT runs the LoRA branch on x itself)")
    dev = x.device
    if any(t.device != dev for t in (a, b) + ((base.bias,) if base.bias is not None else ())) or q.device != dev:
        return "its operands are on different devices"
    if a.dtype != b.dtype or not _adapter_dtype_ok(a.dtype, q.dtype):
        return (f"dtypes differ (lora={str(a.dtype).replace('torch.', '')}, compute="
                f"{str(q.dtype).replace('torch.', '')}); lora_linear takes lora_A, lora_B in the compute dtype or "
                f"float32 on a 16-bit one")
    bias = base.bias if base.bias is None or base.bias.dtype == q.dtype else base.bias.to(q.dtype)
    return (x, q, bias, a, b, scale, p), None


def _adapter_dtype_ok(adapter: torch.dtype, base: torch.dtype) -> bool:
    """Whether lora_linear takes adapters of dtype ``adapter`` on a base (x, W, b) of dtype ``base``: the same
    dtype, or fp32 adapters on an fp16 / bf16 base (PEFT's ``autocast_adapter_dtype``)."""
    return adapter == base or (adapter == torch.float32 and base in (torch.float16, torch.bfloat16))


def _dtypes_unsupported(x, w, bias, a, b) -> Optional[str]:
    """Why lora_linear cannot take these operands' dtypes outside autocast (a reason for the log), or None."""
    base_dtypes = {t.dtype for t in (x, w) + ((bias,) if bias is not None else ())}
    if len(base_dtypes) != 1 or a.dtype != b.dtype or not _adapter_dtype_ok(a.dtype, x.dtype):
        names = " ".join(f"{n}={str(t.dtype).replace('torch.', '')}" for n, t in
                         (("x", x), ("W", w), ("lora", a)))
        return (f"dtypes differ ({names}); lora_linear takes x, W, b in one dtype and lora_A, lora_B in it or in "
                f"float32 on a 16-bit base")
    return None


def _patched_forward(self, x, *args, **kwargs):
    """PEFT's lora.Linear.forward on ``lora_linear`` when the layer's live state allows it (module doc)."""
    if args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    ops = _fast_operands(self, x)
    if isinstance(ops, str):
        if ops:
            _note_fallback(ops)
        return type(self).forward(self, x)
    ops, out_dtype = ops
    y = _function.lora_linear(*ops)
    return y if out_dtype is None else y.to(out_dtype)


def is_peft_patched(module: nn.Module) -> bool:
    """Whether ``module`` (one layer) currently runs through ``patch_peft``'s forward."""
    fwd = module.__dict__.get("forward")
    return getattr(fwd, "__func__", None) is _patched_forward


# --------------------------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------------------------

def _never_supported(layer, lora_linear_cls) -> Optional[str]:
    """Why ``layer`` (a PEFT LoRA layer) is left with PEFT's forward for good, or None if it can be patched."""
    bnb4 = _peft_bnb4_class()
    served = ((isinstance(layer, lora_linear_cls) and type(layer).forward is lora_linear_cls.forward)
              or (bnb4 is not None and isinstance(layer, bnb4) and type(layer).forward is bnb4.forward))
    if not served:
        return f"{type(layer).__name__} layer (only lora.Linear and the bitsandbytes 4-bit lora.Linear4bit are served)"
    if "forward" in layer.__dict__:
        return "forward already overridden on the instance (e.g. an accelerate hook)"
    base = layer.base_layer
    if _base_kind(base) is None:
        return f"base layer is a {type(base).__name__} (not a plain Linear/Conv1D or an NF4 bitsandbytes Linear4bit)"
    adapters = list(layer.lora_A.keys())
    if not adapters:
        return "no lora_A/lora_B adapter in this layer"
    whys = [_adapter_unsupported(layer, n) for n in adapters]
    if all(w is not None for w in whys):
        return whys[0] if len(set(whys)) == 1 else "; ".join(sorted(set(whys)))
    return None


def _call_time_notes(layer) -> List[str]:
    """Reasons a patched layer will still run PEFT's forward in its present state (reported, not fatal)."""
    notes = []
    for n in layer.lora_A.keys():
        why = _adapter_unsupported(layer, n)
        if why is not None:
            notes.append(f"adapter {n!r}: {why}, PEFT's forward while it is active")
            continue
        base = layer.base_layer
        w = base.weight
        a = layer.lora_A[n].weight
        base_dtype = nf4_from_bnb(base).dtype if _base_kind(base) == "nf4" else w.dtype  # the compute dtype
        if not _adapter_dtype_ok(a.dtype, base_dtype):
            notes.append(f"adapter dtype {str(a.dtype).replace('torch.', '')} ≠ base "
                         f"{str(w.dtype).replace('torch.', '')}: PEFT's forward outside autocast")
    return notes


def _group(entries: Dict[str, List[str]]) -> str:
    parts = []
    for reason, names in sorted(entries.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(names[:_EXAMPLES]) + (", ..." if len(names) > _EXAMPLES else "")
        parts.append(f"{len(names)} × {reason} [{shown}]")
    return "; ".join(parts)


def _lora_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    lora_layer_cls, _ = _peft_classes()
    return [(n or "<root>", m) for n, m in model.named_modules() if isinstance(m, lora_layer_cls)]


def patch_peft(model: nn.Module) -> nn.Module:
    """Make every supported PEFT LoRA layer of ``model`` run on ``lora_kernels.lora_linear``; returns ``model``.

    ``model`` is a ``peft.PeftModel`` or any module holding PEFT LoRA layers (e.g. what TRL's SFTTrainer builds from
    a ``peft_config``).  Each supported ``lora.Linear`` (base ``nn.Linear``, or transformers ``Conv1D`` with
    ``fan_in_fan_out=True``) gets an instance-level forward that reads PEFT's live state at every call and runs
    PEFT's own forward whenever that state is one the op does not serve (module doc).  Other LoRA layers keep PEFT's
    forward.  One log line (logger "lora_kernels", INFO) counts what was patched and what was not, and why.
    Idempotent: already patched layers are left as they are (and said so).  ``unpatch_peft`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _, lora_linear_cls = _peft_classes()
    patched: Dict[str, List[str]] = collections.defaultdict(list)
    skipped: Dict[str, List[str]] = collections.defaultdict(list)
    notes: Dict[str, List[str]] = collections.defaultdict(list)
    already = []
    for name, layer in _lora_layers(model):
        if is_peft_patched(layer):
            already.append(name)
            continue
        why = _never_supported(layer, lora_linear_cls)
        if why is not None:
            skipped[why].append(name)
            continue
        layer.forward = types.MethodType(_patched_forward, layer)  # nn.Module.__setattr__: a plain instance attr
        kind = _base_kind(layer.base_layer)
        patched[{"conv1d": "Conv1D base", "nf4": "4-bit NF4 base"}.get(kind, "Linear base")].append(name)
        for note in _call_time_notes(layer):
            notes[note].append(name)
    n_patched = sum(len(v) for v in patched.values())
    if not n_patched and already:
        kept = sum(len(v) for v in skipped.values())
        logger.info("lora_kernels.patch_peft: already patched (%d layers%s); nothing to do", len(already),
                    f", {kept} kept PEFT's forward as reported before" if kept else "")
        return model
    if not n_patched and not skipped:
        logger.info("lora_kernels.patch_peft: no PEFT LoRA layer found in %s; nothing patched", type(model).__name__)
        return model
    line = f"lora_kernels.patch_peft: patched {n_patched} LoRA layers ({_group(patched) or 'none'})"
    if already:
        line += f"; {len(already)} already patched"
    line += f"; kept PEFT's forward for {sum(len(v) for v in skipped.values())} layers"
    line += f" ({_group(skipped)})" if skipped else ""
    if notes:
        line += f"; patched but falling back to PEFT's forward: {_group(notes)}"
    logger.info(line)
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Undo ``patch_peft``: every patched layer's instance-level forward is removed, so ``layer.forward`` is its
    class's own function again (the very same object).  Layers not patched are untouched.  Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n = 0
    for _, layer in _lora_layers(model):
        if is_peft_patched(layer):
            del layer.__dict__["forward"]
            n += 1
    logger.info("lora_kernels.unpatch_peft: restored PEFT's forward on %d layers", n)
    return model
