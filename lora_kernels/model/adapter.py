"""Adapter files in PEFT's format, both ways: ``save_adapter`` writes what ``peft.PeftModel.from_pretrained`` loads,
``load_adapter`` reads what PEFT's ``save_pretrained`` writes.

Layout (checked against peft 0.21 output): ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and ``base_model.model.<path>.<param>`` for
modules_to_save), and ``adapter_config.json`` with peft_type "LORA", r, lora_alpha, lora_dropout, target_modules
(full module names), use_rslora, rank_pattern, alpha_pattern (full names → value, for layers that differ from the
defaults), modules_to_save, bias "none" (``LoRAConfig.to_peft_dict`` / ``from_peft_dict``).  Each layer's mode
is ours, not PEFT's: it travels in the safetensors metadata.  Only safetensors is read: a pickled
``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels.config import MODES, LoRAConfig, is_saved_module, within_saved_module
from lora_kernels.model.inject import CONFIG_ATTR, inject_lora, named_lora_layers
from lora_kernels.modules import FusedLoRALinear

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_MODES_KEY = "lora_kernels_modes"


def _named_lora(model: nn.Module) -> Dict[str, FusedLoRALinear]:
    return dict(named_lora_layers(model))


def _saved_config(layers: Dict[str, FusedLoRALinear], modules_to_save) -> LoRAConfig:
    """The LoRAConfig describing ``layers`` as saved: targets are their full names, the most common r / alpha are
    the defaults and the others go to rank_pattern / alpha_pattern under the layer's full name."""
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("layers mix use_rslora=True and False, which one PEFT config cannot express")
    r_default = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha_default = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    return LoRAConfig(
        r=r_default, lora_alpha=alpha_default, lora_dropout=next(iter(layers.values())).lora_dropout,
        use_rslora=rslora.pop(), target_modules=tuple(sorted(layers)),
        rank_pattern={n: m.r for n, m in layers.items() if m.r != r_default},
        alpha_pattern={n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha_default},
        modules_to_save=tuple(modules_to_save) or None)


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` (PEFT LoRA format)."""
    from safetensors.torch import save_file

    layers = _named_lora(model)
    if not layers:
        raise ValueError("model has no FusedLoRALinear layer: nothing to save")
    model_config: Optional[LoRAConfig] = getattr(model, CONFIG_ATTR, None)
    to_save = list(model_config.modules_to_save or ()) if model_config else []
    config = _saved_config(layers, to_save)
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().clone()
    for mname, mod in model.named_modules():
        if is_saved_module(mname, to_save):
            for pname, p in mod.named_parameters(recurse=True, remove_duplicate=False):
                tensors[f"{PREFIX}{mname}.{pname}"] = p.detach().contiguous().clone()
    modified = sorted({m.base_modified_by for m in layers.values() if getattr(m, "base_modified_by", None)})
    if modified:
        warnings.warn(f"save_adapter: {', '.join(modified)} changed the base weights; this adapter is only valid on "
                      f"the modified base model (save the model's weights too)", stacklevel=2)
    os.makedirs(path, exist_ok=True)
    modes = {n: m.mode for n, m in layers.items()}
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt", _MODES_KEY: json.dumps(modes)})
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config.to_peft_dict(base_model_name_or_path=base_model_name_or_path), f, indent=2, sort_keys=True)


def _read_config(path: str) -> Tuple[LoRAConfig, dict]:
    """The adapter's LoRAConfig (``LoRAConfig.from_peft_dict``, errors naming the file) and the raw json."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG} in {path!r}")
    with open(cfg_path) as f:
        raw = json.load(f)
    return LoRAConfig.from_peft_dict(raw, path_for_errors=cfg_path), raw


def load_adapter(model: nn.Module, path: str, *, mode: Optional[str] = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (plain: adapters are injected per the config first).

    Every key and shape is checked before anything is written; a missing, unexpected or mis-shaped tensor raises an
    error naming the key, and the model is left as it was (a plain model stays plain).  Each layer's scale is set from
    the config (``LoRAConfig.scaling``); merged layers are unmerged, loaded and merged again.
    ``mode`` ("AB", "B", "A") sets which factors train afterwards (default: as saved by lora_kernels, else "AB").
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lora_kernels.model.inject import unload_lora

    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    cfg, raw = _read_config(path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"{path!r} has only adapter_model.bin (pickle); lora_kernels loads safetensors only")
        raise FileNotFoundError(f"no {WEIGHTS} in {path!r}")
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata() or {}
    saved_modes = json.loads(meta.get(_MODES_KEY, "{}"))
    state = load_file(weights)

    layers = _named_lora(model)
    injected_here = not layers
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        if injected_here:
            inject_lora(model, cfg)
            layers = _named_lora(model)
        plan = _plan_load(model, layers, state, cfg, weights, saved_modes)
    except Exception:
        if injected_here and _named_lora(model):  # leave a plain model as it was given
            unload_lora(model, merge=False)
        for p, f in flags.items():
            p.requires_grad_(f)
        raise
    # A file without lora_dropout keeps each layer's own (PEFT always writes it).
    _write(layers, plan, cfg, "lora_dropout" in raw, mode, saved_modes, injected_here)
    return model


def _plan_load(model: nn.Module, layers: Dict[str, FusedLoRALinear], state: Dict[str, torch.Tensor], cfg: LoRAConfig,
               weights: str, saved_modes: dict):
    """Check every key, shape and saved mode; return [(parameter, value)] to copy.  Raises naming the offender."""
    plan = []
    expected = set()
    for name, m in layers.items():
        for factor, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            key = f"{PREFIX}{name}.{factor}.weight"
            expected.add(key)
            if key not in state:
                raise KeyError(f"adapter file {weights!r} is missing {key!r}")
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} in the file, {tuple(param.shape)} in the "
                                 f"model (wrong rank or a different base model?)")
            plan.append((param, state[key]))
    to_save = cfg.modules_to_save or ()
    named_params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        if key in expected:
            continue
        if ".lora_" in key:
            raise ValueError(f"adapter file has {key!r}, which matches no FusedLoRALinear of the model")
        pname = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if pname not in named_params or not within_saved_module(pname.rpartition(".")[0], to_save):
            raise ValueError(f"adapter file has unexpected tensor {key!r}")
        if tuple(value.shape) != tuple(named_params[pname].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, "
                             f"{tuple(named_params[pname].shape)} in the model")
        plan.append((named_params[pname], value))
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} has NaN/Inf entries")
    for name, saved in saved_modes.items():
        if saved not in MODES:
            raise ValueError(f"adapter file {weights!r}: layer {name!r} was saved with mode {saved!r}, not one of "
                             f"{MODES}")
    return plan


def _write(layers: Dict[str, FusedLoRALinear], plan, cfg: LoRAConfig, has_dropout: bool, mode: Optional[str],
           saved_modes: dict, injected_here: bool) -> None:
    merged = [m for m in layers.values() if m.merged]
    for m in merged:  # a merged weight still contains the old factors: take them out before replacing them
        m.unmerge()
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(param))
        for name, m in layers.items():
            _, alpha = cfg.for_module(name)
            m.reconfigure(lora_alpha=alpha, use_rslora=cfg.use_rslora,
                          lora_dropout=cfg.lora_dropout if has_dropout else m.lora_dropout,
                          mode=mode or saved_modes.get(name) or ("AB" if injected_here else m.mode))
    for m in merged:
        m.merge()
