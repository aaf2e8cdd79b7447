"""Reading bitsandbytes' 4-bit layers (``bitsandbytes.nn.Linear4bit`` and its ``Params4bit`` weight) as an
``NF4Tensor``, in place: every tensor of the result is the layer's own storage (no copy, no re-quantization).

bitsandbytes is optional and never imported here: a layer can only be one of its classes if the caller has
imported it already, so the checks look in ``sys.modules``.

What is read (``QuantState`` of the weight):
  packed            the weight's data, flat, viewed as uint8 (``quant_storage`` may be bf16/fp32/...: a view)
  absmax, code      ``quant_state.absmax`` (fp32, or uint8 codes when nested), ``quant_state.code`` (16 levels)
  nested            ``state2.absmax``, ``state2.code``, ``state2.blocksize`` and ``quant_state.offset`` (its 0-d
                    tensor itself: reading it needs no device sync)
  shape, blocksize  ``quant_state.shape`` (out, in), ``quant_state.blocksize``
  dtype             the layer's ``compute_dtype`` when set, else ``quant_state.dtype`` (the weight's dtype before
                    quantization)
FP4 layers (``quant_type="fp4"``) are read too: the format differs from NF4 only by the 16-entry table, which
travels in ``code`` (unsorted for FP4, which only matters to a quantizer; dequantization just indexes it).

Layers this refuses, each with its own message: a weight not quantized yet (bitsandbytes quantizes a
``Params4bit`` when it is first moved to a device: ``layer.to("cpu")``, ``.cpu()``, ``.cuda()``), and a weight
bitsandbytes has repacked for its CPU inference kernel (``packing_format_for_cpu``: done in place by
``Linear4bit.forward`` on a CPU with AVX512-BF16 in eval mode when the input needs no grad; the nibbles are
reordered and the scales rounded to bf16, so the NF4 layout is gone; ``state_dict()`` converts it back).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from lora_kernels.quant.nf4 import NF4Tensor

_QUANT_TYPES = ("nf4", "fp4")


def _bnb_class(name: str):
    """``bitsandbytes.nn.<name>`` if bitsandbytes has been imported, else None (never imports it)."""
    mod = sys.modules.get("bitsandbytes.nn")
    return getattr(mod, name, None) if mod is not None else None


def is_bnb_linear4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (``LinearNF4`` / ``LinearFP4`` included).  False when
    bitsandbytes has not been imported: no object can be one then."""
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def _is_params4bit(t) -> bool:
    cls = _bnb_class("Params4bit")
    return cls is not None and isinstance(t, cls)


def nf4_from_bnb(module_or_param) -> NF4Tensor:
    """The ``NF4Tensor`` of a quantized bitsandbytes ``Linear4bit`` or of its ``Params4bit`` weight, sharing every
    tensor with it (``packed.data_ptr() == layer.weight.data_ptr()``).  Errors name what is wrong (module
    docstring: not quantized yet, repacked for the CPU kernel, a quant_type other than nf4 / fp4, a shape that is
    not 2-D, storage that cannot be viewed flat)."""
    if is_bnb_linear4bit(module_or_param):
        layer, param = module_or_param, module_or_param.weight
        what = f"{type(layer).__name__}.weight"
    elif _is_params4bit(module_or_param):
        param = module_or_param
        layer = getattr(param, "module", None)
        what = "Params4bit"
    else:
        raise TypeError(f"nf4_from_bnb: expected a bitsandbytes Linear4bit or Params4bit, got "
                        f"{type(module_or_param).__name__}")
    if not _is_params4bit(param):
        raise TypeError(f"nf4_from_bnb: {what} must be a bitsandbytes Params4bit, got {type(param).__name__}")
    state = getattr(param, "quant_state", None)
    if state is None or not getattr(param, "bnb_quantized", False):
        raise ValueError(f"nf4_from_bnb: {what} is not quantized yet: bitsandbytes quantizes a Params4bit when it "
                         f"is first moved to a device (layer.to('cpu'), .cpu() or .cuda())")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"nf4_from_bnb: {what} was repacked for bitsandbytes' CPU inference kernel "
                         f"(quant_state.packing_format_for_cpu: nibbles reordered, scales rounded to bf16), so it "
                         f"no longer holds the NF4 layout; an eval-mode forward without grad repacks it on a CPU "
                         f"with AVX512-BF16 (layer.state_dict() converts it back)")
    quant_type = getattr(state, "quant_type", None)
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"nf4_from_bnb: {what} has quant_type {quant_type!r}; only {_QUANT_TYPES} are read")
    shape = tuple(int(s) for s in state.shape)
    if len(shape) != 2:
        raise ValueError(f"nf4_from_bnb: {what} quant_state.shape must be 2-D (out, in), got {shape}")
    data = param.data
    if not data.is_contiguous():
        raise ValueError(f"nf4_from_bnb: {what} data must be contiguous to be read in place, got strides "
                         f"{data.stride()}")
    packed = data.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # quant_storage other than uint8: the same bytes
    dtype = getattr(layer, "compute_dtype", None) if isinstance(layer, nn.Module) else None
    fields = dict(packed=packed, absmax=state.absmax, shape=shape, dtype=dtype or state.dtype,
                  blocksize=int(state.blocksize), code=state.code)
    state2 = getattr(state, "state2", None)
    if state2 is not None:
        fields.update(nested_absmax=state2.absmax, nested_code=state2.code, nested_blocksize=int(state2.blocksize),
                      offset=state.offset)
    return NF4Tensor(**fields)
