"""Adapter files in PEFT's format, both ways: ``save_adapter`` writes what ``peft.PeftModel.from_pretrained`` loads,
``load_adapter`` reads what PEFT's ``save_pretrained`` writes.

Layout (checked against peft 0.21 output): ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and ``base_model.model.<path>.<param>`` for
modules_to_save), and ``adapter_config.json`` with peft_type "LORA", r, lora_alpha, lora_dropout, target_modules
(full module names), use_rslora, rank_pattern, alpha_pattern (full names → value, for layers that differ from the
defaults), modules_to_save, bias "none".  Only safetensors is read: a pickled ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Dict, Optional

import torch
import torch.nn as nn

from lora_kernels.model.inject import CONFIG_ATTR, inject_lora
from lora_kernels.modules import FusedLoRALinear

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "fan_in_fan_out", "use_bdlora", "use_qalora")
_UNSUPPORTED_SET = ("layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices",
                    "alora_invocation_tokens", "arrow_config", "kasa_config", "velora_config", "monteclora_config")
# init_lora_weights values that only set A/B; the others (pissa, olora, loftq, corda, eva, lora_ga...) also change
# the base weights, so their adapters are meaningless on the original base model and are refused.
_PLAIN_INITS = (True, False, "gaussian", "kaiming")


def _named_lora(model: nn.Module) -> Dict[str, FusedLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)}


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` (PEFT LoRA format)."""
    from safetensors.torch import save_file

    layers = _named_lora(model)
    if not layers:
        raise ValueError("model has no FusedLoRALinear layer: nothing to save")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("layers mix use_rslora=True and False, which one PEFT config cannot express")
    r_default = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha_default = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().clone()
    cfg = getattr(model, CONFIG_ATTR, {})
    to_save = list(cfg.get("modules_to_save", []))
    for mname, mod in model.named_modules():
        if any(mname == s or mname.endswith("." + s) for s in to_save):
            for pname, p in mod.named_parameters(recurse=True, remove_duplicate=False):
                tensors[f"{PREFIX}{mname}.{pname}"] = p.detach().contiguous().clone()
    modified = sorted({m.base_modified_by for m in layers.values() if getattr(m, "base_modified_by", None)})
    if modified:
        warnings.warn(f"save_adapter: {', '.join(modified)} changed the base weights; this adapter is only valid on "
                      f"the modified base model (save the model's weights too)", stacklevel=2)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": float(next(iter(layers.values())).lora_dropout),
        "target_modules": sorted(layers),
        "use_rslora": bool(rslora.pop()),
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r_default},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha_default},
        "modules_to_save": to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    os.makedirs(path, exist_ok=True)
    modes = {n: m.mode for n, m in layers.items()}
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt", "lora_kernels_modes": json.dumps(modes)})
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG} in {path!r}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' adapters are supported")
    for key in _UNSUPPORTED_TRUE:
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by lora_kernels")
    for key in _UNSUPPORTED_SET:
        if cfg.get(key) not in (None, [], {}):
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by lora_kernels")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(f"{cfg_path}: init_lora_weights={init!r} also modifies the base weights, which this adapter "
                         f"file does not contain; not supported")
    if "r" not in cfg:
        raise ValueError(f"{cfg_path}: the config has no 'r'")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    return cfg


def load_adapter(model: nn.Module, path: str, *, mode: Optional[str] = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (plain: adapters are injected per the config first).

    Every key and shape is checked before anything is written; a missing, unexpected or mis-shaped tensor raises an
    error naming the key, and the model is left as it was (a plain model stays plain).  Each layer's scale is set from
    the config (lora_alpha / r, or / √r with rsLoRA); merged layers are unmerged, loaded and merged again.
    ``mode`` ("AB", "B", "A") sets which factors train afterwards (default: as saved by lora_kernels, else "AB").
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lora_kernels.model.inject import unload_lora

    if mode is not None and mode not in ("AB", "B", "A"):
        raise ValueError(f"mode must be one of ('AB', 'B', 'A') or None, got {mode!r}")
    cfg = _read_config(path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"{path!r} has only adapter_model.bin (pickle); lora_kernels loads safetensors only")
        raise FileNotFoundError(f"no {WEIGHTS} in {path!r}")
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata() or {}
    saved_modes = json.loads(meta.get("lora_kernels_modes", "{}"))
    state = load_file(weights)

    layers = _named_lora(model)
    injected_here = not layers
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        if injected_here:
            targets = cfg.get("target_modules")
            if isinstance(targets, list) and not targets:
                raise ValueError(f"{path!r}: target_modules is empty")
            inject_lora(model, targets if targets is not None else "all-linear", r=int(cfg["r"]),
                        lora_alpha=cfg.get("lora_alpha", cfg["r"]), lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                        use_rslora=bool(cfg.get("use_rslora", False)), rank_pattern=cfg.get("rank_pattern") or None,
                        alpha_pattern=cfg.get("alpha_pattern") or None,
                        exclude_modules=cfg.get("exclude_modules") or None,
                        modules_to_save=cfg.get("modules_to_save") or None)
            layers = _named_lora(model)
        plan = _plan_load(model, layers, state, cfg, weights)
    except Exception:
        if injected_here and _named_lora(model):  # leave a plain model as it was given
            unload_lora(model, merge=False)
        for p, f in flags.items():
            p.requires_grad_(f)
        raise
    _write(layers, plan, cfg, mode, saved_modes, injected_here)
    return model


def _plan_load(model: nn.Module, layers: Dict[str, FusedLoRALinear], state: Dict[str, torch.Tensor], cfg: dict,
               weights: str):
    """Check every key and shape; return [(parameter, value)] to copy.  Raises naming the offending key."""
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
    to_save = cfg.get("modules_to_save") or []
    named_params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        if key in expected:
            continue
        if ".lora_" in key:
            raise ValueError(f"adapter file has {key!r}, which matches no FusedLoRALinear of the model")
        pname = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if pname not in named_params or not any(("." + s + ".") in ("." + pname) for s in to_save):
            raise ValueError(f"adapter file has unexpected tensor {key!r}")
        if tuple(value.shape) != tuple(named_params[pname].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, "
                             f"{tuple(named_params[pname].shape)} in the model")
        plan.append((named_params[pname], value))
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} has NaN/Inf entries")
    return plan


def _write(layers: Dict[str, FusedLoRALinear], plan, cfg: dict, mode: Optional[str], saved_modes: dict,
           injected_here: bool) -> None:
    from lora_kernels.model.inject import _pattern_value

    merged = [m for m in layers.values() if m.merged]
    for m in merged:  # a merged weight still contains the old factors: take them out before replacing them
        m.unmerge()
    alpha_default = cfg.get("lora_alpha", cfg["r"])
    rslora = bool(cfg.get("use_rslora", False))
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(param))
        for name, m in layers.items():
            alpha = _pattern_value(name, cfg.get("alpha_pattern"), alpha_default)
            m.lora_alpha, m.use_rslora = alpha, rslora
            m.scaling = alpha / m.r ** 0.5 if rslora else alpha / m.r
            m.lora_dropout = float(cfg.get("lora_dropout", m.lora_dropout))
            want = mode or saved_modes.get(name) or ("AB" if injected_here else m.mode)
            m.mode = want
            m.lora_A.requires_grad_(want in ("AB", "A"))
            m.lora_B.requires_grad_(want in ("AB", "B"))
    for m in merged:
        m.merge()
