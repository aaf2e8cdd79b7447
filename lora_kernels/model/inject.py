"""Model surgery: put FusedLoRALinear adapters into any model, count, merge, unmerge and remove them.

Matching follows PEFT so that configs carry over:
  * ``target_modules`` as a list: a module matches if its full name equals an entry or ends with "." + entry;
  * as a string: a regular expression that must match the full module name (``re.fullmatch``);
  * ``"all-linear"`` (any case): every nn.Linear except the output head ``model.get_output_embeddings()`` when the
    model has one, as PEFT does for transformers models;
  * modules inside ``modules_to_save`` are never targeted (PEFT excludes them too); the rule for which modules are
    saved is ``lora_kernels.config.is_saved_module``;
  * only exact ``nn.Linear`` modules are replaced: a subclass (a quantised linear, a custom forward) would lose its
    own forward, so it is skipped with a warning.
  * ``rank_pattern`` / ``alpha_pattern``: {pattern: value}; a module takes the value of the first pattern p with
    ``re.fullmatch(rf"(.*\\.)?(?:{p})", name)`` (``LoRAConfig.for_module``).

``named_lora_layers`` / ``lora_layers`` are how every part of the package finds its layers.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from lora_kernels.config import LoRAConfig, is_saved_module, non_default_fields, within_saved_module
from lora_kernels.modules import FusedLoRALinear

Targets = Union[str, Sequence[str]]
CONFIG_ATTR = "_lora_kernels_config"  # the model's LoRAConfig, set by inject_lora (targets: the replaced names)


def named_lora_layers(model: nn.Module) -> List[Tuple[str, FusedLoRALinear]]:
    """(full name, layer) of every FusedLoRALinear in ``model``, in ``named_modules`` order: the one way the package
    finds its layers (surgery, adapter files, inits, optimizers)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)]


def lora_layers(model: nn.Module) -> List[FusedLoRALinear]:
    """Every FusedLoRALinear in ``model`` (``named_lora_layers`` without the names)."""
    return [m for _, m in named_lora_layers(model)]


def _matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_head_names(model: nn.Module) -> set:
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def _shared_weight_owners(model: nn.Module) -> Dict[int, List[str]]:
    owners: Dict[int, List[str]] = {}
    for n, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{n}.{pn}" if n else pn)
    return owners


def _config_from_call(target_modules, config: Optional[LoRAConfig], keywords: dict) -> LoRAConfig:
    """inject_lora's LoRAConfig: ``config`` (given as ``config=`` or as the second positional argument), or one
    built, and so validated, from ``target_modules`` and the keywords.  Both at once is refused."""
    if isinstance(target_modules, LoRAConfig):
        if config is not None:
            raise TypeError("inject_lora got a LoRAConfig both as target_modules and as config=")
        target_modules, config = "all-linear", target_modules
    if config is None:
        return LoRAConfig(target_modules=target_modules, **keywords)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    given = non_default_fields(keywords)
    if not (isinstance(target_modules, str) and target_modules == "all-linear"):
        given.insert(0, "target_modules")
    if given:
        raise TypeError(f"pass the LoRA settings either as config= or as arguments, not both (got config and "
                        f"{', '.join(given)})")
    return config


def inject_lora(model: nn.Module, target_modules: Union[Targets, LoRAConfig] = "all-linear", *, r: int = 8,
                lora_alpha: float = 8, lora_dropout: float = 0.0, mode: str = "AB", use_rslora: bool = False,
                init_A: str = "kaiming", rank_pattern: Optional[Dict[str, int]] = None,
                alpha_pattern: Optional[Dict[str, float]] = None, exclude_modules: Optional[Targets] = None,
                modules_to_save: Optional[Iterable[str]] = None, config: Optional[LoRAConfig] = None) -> nn.Module:
    """Replace matching nn.Linear modules of ``model`` in place by FusedLoRALinear (sharing their weights), freeze
    every other parameter except those of ``modules_to_save``, and return ``model``.

    Settings: the arguments (PEFT's names) or a ``LoRAConfig``, as ``config=`` or as the second positional
    argument (``inject_lora(model, config)``).  Everything is validated before the model is touched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = _config_from_call(target_modules, config, dict(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode, use_rslora=use_rslora, init_A=init_A,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, exclude_modules=exclude_modules,
        modules_to_save=modules_to_save))
    target_modules = config.target_modules
    save_names = list(config.modules_to_save or ())
    all_names = dict(model.named_modules())
    if save_names and not any(within_saved_module(n, save_names) for n in all_names):
        # PEFT's task presets list several heads (e.g. ["classifier", "score"]); one of them must exist.
        raise ValueError(f"modules_to_save={save_names!r} matches no module of the model")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        heads = _output_head_names(model)
        chosen = [(n, m) for n, m in linears if n not in heads]
    else:
        chosen = [(n, m) for n, m in linears if _matches(n, target_modules)]
    if config.exclude_modules:
        chosen = [(n, m) for n, m in chosen if not _matches(n, config.exclude_modules)]
    chosen = [(n, m) for n, m in chosen if not within_saved_module(n, save_names)]
    subclasses = [n for n, m in chosen if type(m) is not nn.Linear]
    if subclasses:
        warnings.warn(f"inject_lora: skipping nn.Linear subclasses (their own forward would be lost): "
                      f"{', '.join(subclasses[:5])}", stacklevel=2)
        chosen = [(n, m) for n, m in chosen if type(m) is nn.Linear]
    if not chosen:
        sample = ", ".join(n for n, _ in linears[:8]) or "(the model has no nn.Linear)"
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module; some available: {sample}")
    owners = _shared_weight_owners(model)
    tied = [n for n, m in chosen if len(owners.get(id(m.weight), [])) > 1]
    if tied:
        warnings.warn(f"inject_lora: {', '.join(tied[:5])} share their weight with another module (tied weights); "
                      f"merge_lora / PiSSA / LoRA-GA would change that module too", stacklevel=2)
    tied_saved = [n for n in all_names if within_saved_module(n, save_names)
                  and any(len(owners.get(id(p), [])) > 1 for p in all_names[n].parameters(recurse=False))]
    if tied_saved:
        warnings.warn(f"inject_lora: modules_to_save {', '.join(tied_saved[:5])} have tied weights: training them "
                      f"also trains the tied module (PEFT trains an untied copy)", stacklevel=2)

    # Build every replacement first (they validate their configs), then swap: a failure leaves the model as it was.
    replacements = [(name, FusedLoRALinear.from_linear(lin, config=config.for_layer(name))) for name, lin in chosen]
    earlier = [q for x in lora_layers(model) for q in (x.lora_A, x.lora_B) if q.requires_grad]
    previous: Optional[LoRAConfig] = getattr(model, CONFIG_ATTR, None)
    keep_saved = list(previous.modules_to_save or ()) if previous else []
    for p in model.parameters():
        p.requires_grad_(False)
    for q in earlier:  # a second inject_lora call keeps the first call's adapters trainable
        q.requires_grad_(True)
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        new.set_trainable()  # the freeze above also froze the new adapters
    all_saved = keep_saved + [s for s in save_names if s not in keep_saved]
    for n, m in model.named_modules():
        if is_saved_module(n, all_saved):
            for p in m.parameters():
                p.requires_grad_(True)
    targets = (tuple(previous.target_modules) if previous else ()) + tuple(n for n, _ in replacements)
    setattr(model, CONFIG_ATTR, config.replace(target_modules=targets, modules_to_save=tuple(all_saved) or None))
    return model


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Count of trainable and all parameters (shared parameters counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return TrainableSummary(trainable, total)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``FusedLoRALinear.merge``)."""
    for m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model):
        m.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Give back plain nn.Linear modules (sharing the base weights), merged with their adapters if ``merge``."""
    for name, m in named_lora_layers(model):
        if merge:
            m.merge()
        else:
            m.unmerge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = m.weight
        lin.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
