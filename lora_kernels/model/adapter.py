"""Adapter files in PEFT's format, both ways: ``save_adapter`` writes what ``peft.PeftModel.from_pretrained`` loads,
``load_adapter`` reads what PEFT's ``save_pretrained`` writes.

Layout (checked against peft 0.21 output): ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``, and ``base_model.model.<name>.<tensor>`` for
each module of modules_to_save (its trained copy, under the module's own name: PEFT writes the
``modules_to_save.default`` copy there); and ``adapter_config.json`` with peft_type "LORA", r, lora_alpha,
lora_dropout, target_modules, use_rslora, rank_pattern, alpha_pattern, modules_to_save, fan_in_fan_out (true when
the adapted layers are transformers Conv1D), bias "none" (``LoRAConfig.to_peft_dict`` / ``from_peft_dict``).

What the files name: target_modules selects exactly the adapted modules under PEFT's matching (and ours), so both
libraries reload the same set: the list of full names when no other module of the model ends with one of them, else a
regex alternating them (``lora_kernels.config.exact_targets``); rank_pattern / alpha_pattern keys are anchored the same
way (``exact_pattern_key``).  Each layer's mode is ours, not PEFT's: it travels in the safetensors metadata.  PEFT has
no per-layer dropout, so layers with different lora_dropout are refused on save.  Only safetensors is read: a pickled
``adapter_model.bin`` is refused.

``load_adapter`` is all-or-nothing: the config, every key, shape, rank and value is checked before the model is
touched, and an error names the file and the key; the model (tensors, requires_grad flags, merged flags, training
modes, configs) is then left as it was.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels.config import MODES, LoRAConfig, exact_pattern_key, exact_targets
from lora_kernels.model.inject import (CONFIG_ATTR, SAVED_COPY_ATTR, apply_injection, make_saved_copies,
                                       named_lora_layers, plan_injection, plan_saved_copies, saved_modules, transaction)
from lora_kernels.modules import FusedLoRALinear
from lora_kernels.modules.lora_linear import base_features

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_MODES_KEY = "lora_kernels_modes"


def _named_lora(model: nn.Module) -> Dict[str, FusedLoRALinear]:
    return dict(named_lora_layers(model))


def _group(values: Dict[str, object]) -> str:
    by_value: Dict[object, List[str]] = {}
    for n, v in values.items():
        by_value.setdefault(v, []).append(n)
    return "; ".join(f"{v!r}: {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}" for v, ns in by_value.items())


def _saved_config(model: nn.Module, layers: Dict[str, FusedLoRALinear], modules_to_save) -> LoRAConfig:
    """The LoRAConfig describing ``layers`` as saved: targets select exactly them (``exact_targets``), the most common
    r / alpha are the defaults and the others go to rank_pattern / alpha_pattern under keys that select exactly their
    layer (``exact_pattern_key``).  Refuses what one PEFT config cannot say: mixed use_rslora or lora_dropout."""
    for attr in ("use_rslora", "lora_dropout"):
        values = {n: getattr(m, attr) for n, m in layers.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"save_adapter: the layers mix {attr} values ({_group(values)}), which one PEFT "
                             f"adapter_config.json cannot express (PEFT has one {attr} per adapter, no per-layer "
                             f"pattern); give them one value (FusedLoRALinear.reconfigure({attr}=...)) before saving")
    names = list(layers)
    r_default = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha_default = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    first = next(iter(layers.values()))
    return LoRAConfig(
        r=r_default, lora_alpha=alpha_default, lora_dropout=first.lora_dropout, use_rslora=first.use_rslora,
        target_modules=exact_targets(names, [n for n, _ in model.named_modules()]),
        rank_pattern={exact_pattern_key(n, names): m.r for n, m in layers.items() if m.r != r_default},
        alpha_pattern={exact_pattern_key(n, names): m.lora_alpha for n, m in layers.items()
                       if m.lora_alpha != alpha_default},
        modules_to_save=tuple(modules_to_save) or None,
        fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()))


def _saved_tensors(model: nn.Module, modules_to_save) -> Dict[str, torch.Tensor]:
    """{full name: tensor} of every parameter and persistent buffer of the saved modules (PEFT saves their
    state_dict)."""
    return {f"{name}.{k}": v for name, mod in saved_modules(model, modules_to_save)
            for k, v in mod.state_dict(keep_vars=True).items()}


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` (PEFT LoRA format)."""
    from safetensors.torch import save_file

    layers = _named_lora(model)
    if not layers:
        raise ValueError("model has no FusedLoRALinear layer: nothing to save")
    model_config: Optional[LoRAConfig] = getattr(model, CONFIG_ATTR, None)
    to_save = list(model_config.modules_to_save or ()) if model_config else []
    config = _saved_config(model, layers, to_save)
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().clone()
    for pname, p in _saved_tensors(model, to_save).items():
        tensors[f"{PREFIX}{pname}"] = p.detach().contiguous().clone()
    modified = sorted({m.base_modified_by for m in layers.values() if getattr(m, "base_modified_by", None)})
    if modified:
        warnings.warn(f"save_adapter: {', '.join(modified)} changed the base weights; this adapter is only valid on "
                      f"the modified base model (save the model's weights too)", stacklevel=2)
    os.makedirs(path, exist_ok=True)
    modes = {n: m.mode for n, m in layers.items()}
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt", _MODES_KEY: json.dumps(modes)})
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config.to_peft_dict(base_model_name_or_path=base_model_name_or_path), f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------
# Loading: read and check everything, then apply
# --------------------------------------------------------------------------------------------------------------

def _read_config(path: str, model_type: Optional[str], autocast_adapter_dtype: bool) -> Tuple[LoRAConfig, dict]:
    """The adapter's LoRAConfig (``LoRAConfig.from_peft_dict``, errors naming the file) and the raw json."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG} in {path!r}")
    with open(cfg_path) as f:
        try:
            raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = LoRAConfig.from_peft_dict(raw, path_for_errors=cfg_path, model_type=model_type,
                                    autocast_adapter_dtype=autocast_adapter_dtype)
    return cfg, raw


def _read_weights(path: str) -> Tuple[str, Dict[str, torch.Tensor], Dict[str, str]]:
    """(file, tensors, per-layer modes saved by lora_kernels) of the adapter's safetensors, errors naming the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"{path!r} has only adapter_model.bin (pickle); lora_kernels loads safetensors only")
        raise FileNotFoundError(f"no {WEIGHTS} in {path!r}")
    try:
        with safe_open(weights, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        modes = json.loads(meta.get(_MODES_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{weights}: metadata {_MODES_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(modes, dict):
        raise ValueError(f"{weights}: metadata {_MODES_KEY!r} must map layer names to modes, got {modes!r}")
    for name, saved in modes.items():
        if saved not in MODES:
            raise ValueError(f"adapter file {weights!r}: layer {name!r} was saved with mode {saved!r}, not one of "
                             f"{MODES}")
    return weights, state, modes


def load_adapter(model: nn.Module, path: str, *, is_trainable: bool = False, mode: Optional[str] = None,
                 autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, as ``peft.PeftModel.from_pretrained`` does.

    A plain model is injected per the adapter's config first (``target_modules: null`` takes PEFT's defaults for
    ``model.config.model_type``); a model that already has LoRA layers gets their factors, whose ranks must agree with
    the config's r / rank_pattern.  Each layer's scale and dropout are set from the config (``LoRAConfig.scaling``);
    merged layers are unmerged, loaded and merged again.  Saved modules get their trained copies (see inject_lora).

    ``is_trainable=False`` (default, PEFT's): for inference.  Every adapter and saved copy is frozen and the whole
    model is put in eval mode (``model.eval()``, as PEFT's from_pretrained), so dropout is off.
    ``is_trainable=True``: the adapters train as their mode says and saved copies train; the model's train/eval mode
    is left as it is.  ``mode`` ("AB", "B", "A") sets each layer's mode (default: as saved by lora_kernels, else
    "AB" for a plain model and the layer's own for an injected one).

    All-or-nothing: every key, shape, rank and value is checked before anything is written; an error names the file
    and the key, and the model is left as it was (a plain model stays plain)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable must be a bool, got {is_trainable!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    path = os.fspath(path)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cfg, raw = _read_config(path, model_type if isinstance(model_type, str) else None, autocast_adapter_dtype)
    weights, state, saved_modes = _read_weights(path)

    layers = _named_lora(model)
    plan = None
    if layers:
        expected = {}
        for name, m in layers.items():
            r_cfg = cfg.for_module(name)[0]
            if r_cfg != m.r:
                key = f"{PREFIX}{name}.lora_A.weight"
                in_file = f", the file's {key} has rank {state[key].shape[0]}" if key in state else ""
                raise ValueError(f"{key}: {CONFIG} gives {name} r={r_cfg} (r / rank_pattern) but the model's layer "
                                 f"has r={m.r}{in_file}")
            expected[name] = (m.in_features, m.out_features, m.r, m.lora_config)
        copies = _named_errors(plan_saved_copies, model, cfg.modules_to_save, path=path)
    else:
        plan = _named_errors(plan_injection, model, cfg, path=path)
        for note in plan.notes:
            warnings.warn(note, stacklevel=2)
        expected = {}
        for name, base, layer_cfg in plan.layers:
            expected[name] = (*base_features(base), layer_cfg.r, layer_cfg)
        copies = plan.saved
    lora_values, saved_values = _check_tensors(model, expected, state, cfg, weights)
    has_dropout = "lora_dropout" in raw  # a file without it keeps each layer's own (PEFT always writes it)
    settings = {}
    for name, (_, _, _, layer_cfg) in expected.items():
        _, alpha = cfg.for_module(name)
        layer_mode = mode or saved_modes.get(name) or layer_cfg.mode
        try:
            settings[name] = layer_cfg.replace(lora_alpha=alpha, use_rslora=cfg.use_rslora, mode=layer_mode,
                                               lora_dropout=cfg.lora_dropout if has_dropout else layer_cfg.lora_dropout)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{weights}: layer {name!r}: {e}") from None

    with transaction(model) as tx:
        if plan is not None:
            apply_injection(tx, plan)
        else:
            make_saved_copies(tx, copies)
            if cfg.modules_to_save:
                recorded = getattr(model, CONFIG_ATTR, None) or LoRAConfig(target_modules=tuple(layers))
                kept = list(recorded.modules_to_save or ())
                setattr(model, CONFIG_ATTR, recorded.replace(
                    modules_to_save=tuple(kept + [s for s in cfg.modules_to_save if s not in kept])))
        _write(model, lora_values, saved_values, settings)
        recorded = getattr(model, CONFIG_ATTR, None)
        _set_trainable(model, recorded.modules_to_save if recorded else None, is_trainable)
    return model


def _named_errors(fn, *args, path: str):
    """``fn(*args)``, its ValueError / TypeError prefixed with the adapter config's path (what was being applied)."""
    try:
        return fn(*args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{os.path.join(path, CONFIG)}: {e}") from None


def _check_tensors(model: nn.Module, expected: Dict[str, tuple], state: Dict[str, torch.Tensor], cfg: LoRAConfig,
                   weights: str):
    """Check every key, shape and value of the file against the layers to load (``expected``: name → (in, out, r,
    config)) and the saved modules; return ({(layer, factor): value}, {tensor name: value}).  Raises naming the key."""
    lora_values = {}
    for name, (in_f, out_f, r, _) in expected.items():
        for factor, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
            key = f"{PREFIX}{name}.{factor}.weight"
            if key not in state:
                raise KeyError(f"adapter file {weights!r} is missing {key!r}")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} in the file, {shape} expected from the "
                                 f"model and {CONFIG}'s r={r} for {name} (wrong rank or a different base model?)")
            lora_values[(name, factor)] = state[key]
    expected_keys = {f"{PREFIX}{name}.{factor}.weight" for name, factor in lora_values}
    saved_targets = _saved_tensors(model, cfg.modules_to_save)
    saved_values = {}
    for key, value in state.items():
        if key in expected_keys:
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        layer, _, tail = name.rpartition(".base_layer.")
        if layer in expected and tail == "weight":
            # PEFT's save_pretrained (save_embedding_layers="auto") also writes a targeted lm_head's or embedding's
            # base weight; PeftModel.from_pretrained loads it into the base layer, and so do we.
            base_weight = model.get_submodule(layer).weight
            if tuple(value.shape) != tuple(base_weight.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(base_weight.shape)} in the "
                                 f"model")
            saved_values[f"{layer}.weight"] = value
            continue
        if ".lora_" in key:
            raise ValueError(f"adapter file {weights!r} has {key!r}, which matches no FusedLoRALinear of the model "
                             f"(nor a module that {CONFIG}'s target_modules select)")
        if name not in saved_targets:
            raise ValueError(f"adapter file {weights!r} has unexpected tensor {key!r} (neither a LoRA factor nor a "
                             f"tensor of modules_to_save={list(cfg.modules_to_save or ())!r})")
        if tuple(value.shape) != tuple(saved_targets[name].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(saved_targets[name].shape)} in "
                             f"the model")
        saved_values[name] = value
    params = {id(p) for p in model.parameters()}
    for name, t in saved_targets.items():
        if name not in saved_values and id(t) in params:
            raise KeyError(f"adapter file {weights!r} is missing {PREFIX + name!r} (modules_to_save="
                           f"{list(cfg.modules_to_save)!r})")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{weights}: {key} has NaN/Inf entries")
    return lora_values, saved_values


def _write(model: nn.Module, lora_values, saved_values, settings: Dict[str, LoRAConfig]) -> None:
    """Copy the checked values in and set each layer's config (its merged weight follows)."""
    layers = _named_lora(model)
    merged = [m for m in layers.values() if m.merged]
    for m in merged:  # a merged weight still contains the old factors: take them out before replacing them
        m.unmerge()
    targets = _saved_tensors(model, list(getattr(model, CONFIG_ATTR).modules_to_save or ())) if saved_values else {}
    targets.update({f"{n}.weight": m.weight for n, m in layers.items() if f"{n}.weight" in saved_values})
    with torch.no_grad():
        for (name, factor), value in lora_values.items():
            param = getattr(layers[name], factor)
            param.copy_(value.to(param))
        for name, value in saved_values.items():
            targets[name].copy_(value.to(targets[name]))
        for name, cfg in settings.items():
            layers[name].lora_config = cfg
    for m in merged:
        m.merge()


def _set_trainable(model: nn.Module, modules_to_save, is_trainable: bool) -> None:
    """PEFT's from_pretrained: frozen adapters and the model in eval mode, unless ``is_trainable``."""
    copies = [m for _, m in saved_modules(model, modules_to_save) if getattr(m, SAVED_COPY_ATTR, False)]
    for m in _named_lora(model).values():
        m.set_trainable()
        if not is_trainable:
            m.lora_A.requires_grad_(False)
            m.lora_B.requires_grad_(False)
    for c in copies:
        for p in c.parameters():
            p.requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()
