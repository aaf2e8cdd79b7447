"""Model surgery: put FusedLoRALinear adapters into any model, count, merge, unmerge and remove them.

Matching follows PEFT so that configs carry over:
  * ``target_modules`` as a list: a module matches if its full name equals an entry or ends with "." + entry;
  * as a string: a regular expression that must match the full module name (``re.fullmatch``);
  * ``"all-linear"`` (any case): every nn.Linear and transformers ``Conv1D`` except the output head
    ``model.get_output_embeddings()`` when the model has one, as PEFT does for transformers models;
  * modules inside ``modules_to_save`` are never targeted (PEFT excludes them too); the rule for which modules are
    saved is ``lora_kernels.config.is_saved_module``;
  * only exact ``nn.Linear`` and ``Conv1D`` modules are replaced (``weight_layout``; a Conv1D becomes a layer with
    ``fan_in_fan_out``, set from the type as PEFT does), and 4-bit linears (bitsandbytes ``Linear4bit``, our
    ``NF4Linear``: ``FusedLoRALinear4bit``, QLoRA); any other subclass (a custom forward) would lose its own forward,
    so it is skipped with a warning;
  * a module that already holds an adapter is refused ("already injected"), never adapted twice;
  * ``rank_pattern`` / ``alpha_pattern``: {pattern: value}; a module takes the value of the first pattern p with
    ``re.fullmatch(rf"(.*\\.)?(?:{p})", name)`` (``LoRAConfig.for_module``).

``modules_to_save`` as PEFT: each saved module is replaced by a deep copy whose parameters are new and trainable;
the original module is frozen and left as it was, so a weight tied to the embeddings stays tied there and the copy
trains untied (PEFT's ``ModulesToSaveWrapper``, default ``ensure_weight_tying=False``).  The copy sits at the
module's own path, so the adapter file's keys are PEFT's (``base_model.model.<name>.weight``).

Everything is checked before the model is touched (``plan_injection``), and ``transaction`` puts the structure,
flags and modes back should applying still fail.

``named_lora_layers`` / ``lora_layers`` are how every part of the package finds its layers.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from lora_kernels.config import LoRAConfig, is_saved_module, non_default_fields, within_saved_module
from lora_kernels.modules import FusedLoRALinear
from lora_kernels.modules.lora_linear import is_linear_like, is_quantized_linear, weight_layout

Targets = Union[str, Sequence[str]]
CONFIG_ATTR = "_lora_kernels_config"  # the model's LoRAConfig, set by inject_lora (targets: the replaced names)
SAVED_COPY_ATTR = "_lora_kernels_saved_copy"  # marks the trainable copy that stands for a module of modules_to_save


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


def _is_all_linear(targets: Targets) -> bool:
    return isinstance(targets, str) and targets.lower() == "all-linear"


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


# --------------------------------------------------------------------------------------------------------------
# Plan (pure: checks everything, touches nothing), then apply
# --------------------------------------------------------------------------------------------------------------

@dataclass
class InjectionPlan:
    """What ``inject_lora`` will do to a model, decided and validated without touching it.

    layers: (name, base module, the layer's LoRAConfig) of every module to replace, in ``named_modules`` order;
    saved: (name, module) of every saved module to replace by a trainable copy (those not copied yet);
    config: the LoRAConfig the model records afterwards (targets: every adapted module's full name, modules_to_save:
    this call's entries added to earlier calls')."""

    layers: List[Tuple[str, nn.Module, LoRAConfig]]
    saved: List[Tuple[str, nn.Module]]
    config: LoRAConfig
    notes: List[str] = field(default_factory=list)


def saved_modules(model: nn.Module, modules_to_save: Optional[Sequence[str]]) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the outermost modules of ``model`` that ``modules_to_save`` names (``is_saved_module``)."""
    found: List[Tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if n and is_saved_module(n, modules_to_save) and not any(n.startswith(f + ".") for f, _ in found):
            found.append((n, m))
    return found


def plan_saved_copies(model: nn.Module, modules_to_save: Optional[Sequence[str]]) -> List[Tuple[str, nn.Module]]:
    """The saved modules that ``modules_to_save`` names and that are not trainable copies yet; raises ValueError when
    an entry matches nothing (PEFT's task presets list several heads, e.g. ["classifier", "score"]: one must exist)
    or a saved module holds LoRA layers."""
    names = list(modules_to_save or ())
    if not names:
        return []
    found = saved_modules(model, names)
    if not found:
        raise ValueError(f"modules_to_save={names!r} matches no module of the model")
    for n, m in found:
        inner = [f"{n}.{k}" if k else n for k, x in m.named_modules() if isinstance(x, FusedLoRALinear)]
        if inner:
            raise ValueError(f"modules_to_save entry {n!r} holds LoRA layers ({', '.join(inner[:3])}) injected "
                             f"earlier; a saved module is trained in full, not adapted")
    return [(n, m) for n, m in found if not getattr(m, SAVED_COPY_ATTR, False)]


def plan_injection(model: nn.Module, config: LoRAConfig) -> InjectionPlan:
    """Decide which modules ``config`` adapts in ``model`` and check everything, without touching the model.

    Raises ValueError naming the problem: no module matched (listing nn.Linear / Conv1D names that exist), a matched
    module already holds an adapter, fan_in_fan_out=True for nn.Linear targets only, modules_to_save matching
    nothing; and whatever the per-layer configs raise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    previous: Optional[LoRAConfig] = getattr(model, CONFIG_ATTR, None)
    keep_saved = list(previous.modules_to_save or ()) if previous else []
    save_names = list(config.modules_to_save or ())
    all_saved = keep_saved + [s for s in save_names if s not in keep_saved]
    saved = plan_saved_copies(model, save_names)
    targets = config.target_modules
    candidates = [(n, m) for n, m in model.named_modules() if is_linear_like(m) or isinstance(m, FusedLoRALinear)]
    if _is_all_linear(targets):
        heads = _output_head_names(model)
        chosen = [(n, m) for n, m in candidates if n not in heads]
    else:
        chosen = [(n, m) for n, m in candidates if _matches(n, targets)]
    if config.exclude_modules:
        chosen = [(n, m) for n, m in chosen if not _matches(n, config.exclude_modules)]
    chosen = [(n, m) for n, m in chosen if not within_saved_module(n, all_saved)]
    again = [n for n, m in chosen if isinstance(m, FusedLoRALinear)]
    if again:
        raise ValueError(f"target_modules={targets!r}: {', '.join(again[:5])} already injected (a LoRA layer from an "
                         f"earlier inject_lora / load_adapter); exclude it (exclude_modules) or unload_lora first")
    notes = []
    layouts = {n: False if is_quantized_linear(m) else weight_layout(m) for n, m in chosen}
    subclasses = [n for n, m in chosen if layouts[n] is None]
    if subclasses:
        notes.append(f"inject_lora: skipping nn.Linear / Conv1D subclasses (their own forward would be lost): "
                     f"{', '.join(subclasses[:5])}")
        chosen = [(n, m) for n, m in chosen if layouts[n] is not None]
    if not chosen:
        available = [n for n, m in candidates if not isinstance(m, FusedLoRALinear)]
        sample = ", ".join(available[:8]) or "(the model has no nn.Linear or Conv1D)"
        raise ValueError(f"target_modules={targets!r} matched no nn.Linear or Conv1D module; some available: {sample}")
    layouts = {n: layouts[n] for n, _ in chosen}
    if config.fan_in_fan_out and not any(layouts.values()):
        raise ValueError(f"fan_in_fan_out=True is for weights stored in×out (transformers Conv1D), but the targeted "
                         f"modules are nn.Linear (out×in): {', '.join(list(layouts)[:5])}")
    owners = _shared_weight_owners(model)
    tied = [n for n, m in chosen if len(owners.get(id(m.weight), [])) > 1]
    if tied:
        notes.append(f"inject_lora: {', '.join(tied[:5])} share their weight with another module (tied weights); "
                     f"merge_lora / PiSSA / LoRA-GA would change that module too")
    layers = [(n, m, config.for_layer(n).replace(fan_in_fan_out=layouts[n])) for n, m in chosen]
    names = (tuple(previous.target_modules) if previous else ()) + tuple(n for n, _ in chosen)
    recorded = config.replace(target_modules=names, modules_to_save=tuple(all_saved) or None,
                              fan_in_fan_out=any(layouts.values()) or bool(previous and previous.fan_in_fan_out))
    return InjectionPlan(layers, saved, recorded, notes)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class _Transaction:
    """The journal of one change to a model: module swaps (undone in reverse), and the requires_grad flags, training
    modes, layer configs, merged flags and recorded config as they were at the start."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swaps: List[Tuple[str, nn.Module]] = []
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.layers = [(m, m.lora_config, m.merged) for m in lora_layers(model)]
        self.had_config = hasattr(model, CONFIG_ATTR)
        self.config = getattr(model, CONFIG_ATTR, None)

    def swap(self, name: str, new: nn.Module) -> nn.Module:
        old = _set_child(self.model, name, new)
        self.swaps.append((name, old))
        return old

    def rollback(self) -> None:
        for name, old in reversed(self.swaps):
            _set_child(self.model, name, old)
        for p, f in self.flags:
            p.requires_grad_(f)
        for m, t in self.modes:
            m.training = t
        for m, cfg, merged in self.layers:
            m.lora_config, m.merged = cfg, merged
        if self.had_config:
            setattr(self.model, CONFIG_ATTR, self.config)
        elif hasattr(self.model, CONFIG_ATTR):
            delattr(self.model, CONFIG_ATTR)


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[_Transaction]:
    """Apply a planned change: on an exception, module swaps, flags, modes and configs are put back (tensor writes
    are not journaled: plan them so that they cannot fail)."""
    tx = _Transaction(model)
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise


def make_saved_copies(tx: _Transaction, saved: Sequence[Tuple[str, nn.Module]]) -> None:
    """Replace each saved module by a deep copy whose parameters are new and trainable (PEFT's
    ModulesToSaveWrapper); the original keeps its parameters, frozen, so a weight tied elsewhere stays tied there."""
    for name, module in saved:
        new = copy.deepcopy(module)
        for p in new.parameters():
            p.requires_grad_(True)
        setattr(new, SAVED_COPY_ATTR, True)
        for p in module.parameters():
            p.requires_grad_(False)
        tx.swap(name, new)


def apply_injection(tx: _Transaction, plan: InjectionPlan) -> None:
    """Carry out ``plan`` (from ``plan_injection``) inside the transaction ``tx``."""
    model = tx.model
    replacements = [(name, FusedLoRALinear.from_linear(base, config=cfg)) for name, base, cfg in plan.layers]
    earlier = [q for x in lora_layers(model) for q in (x.lora_A, x.lora_B) if q.requires_grad]
    copies = [q for _, m in saved_modules(model, plan.config.modules_to_save) if getattr(m, SAVED_COPY_ATTR, False)
              for q in m.parameters() if q.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for q in earlier + copies:  # a second inject_lora call keeps the first call's adapters and copies trainable
        q.requires_grad_(True)
    for name, new in replacements:
        tx.swap(name, new)
        new.set_trainable()  # the freeze above also froze the new adapters
    make_saved_copies(tx, plan.saved)
    setattr(model, CONFIG_ATTR, plan.config)


def inject_lora(model: nn.Module, target_modules: Union[Targets, LoRAConfig] = "all-linear", *, r: int = 8,
                lora_alpha: float = 8, lora_dropout: float = 0.0, mode: str = "AB", use_rslora: bool = False,
                init_A: Optional[str] = None, rank_pattern: Optional[Dict[str, int]] = None,
                alpha_pattern: Optional[Dict[str, float]] = None, exclude_modules: Optional[Targets] = None,
                modules_to_save: Optional[Iterable[str]] = None, autocast_adapter_dtype: bool = True,
                config: Optional[LoRAConfig] = None) -> nn.Module:
    """Replace matching nn.Linear / transformers Conv1D modules of ``model`` in place by FusedLoRALinear (sharing
    their weights), freeze every other parameter, replace each module of ``modules_to_save`` by a trainable copy
    (PEFT's rule: a weight tied to the embeddings stays tied and frozen there), and return ``model``.

    Settings: the arguments (PEFT's names) or a ``LoRAConfig``, as ``config=`` or as the second positional
    argument (``inject_lora(model, config)``).  Everything is validated before the model is touched
    (``plan_injection``): on an error the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = _config_from_call(target_modules, config, dict(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, mode=mode, use_rslora=use_rslora, init_A=init_A,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, exclude_modules=exclude_modules,
        modules_to_save=modules_to_save, autocast_adapter_dtype=autocast_adapter_dtype))
    plan = plan_injection(model, config)
    for note in plan.notes:
        warnings.warn(note, stacklevel=2)
    with transaction(model) as tx:
        apply_injection(tx, plan)
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
    """Count of trainable and all parameters (shared parameters counted once).  A 4-bit weight counts its logical
    out×in elements, as PEFT counts them: a bitsandbytes Params4bit holds two per byte, our NF4Linear keeps its
    codes as buffers."""
    from lora_kernels.quant import NF4Linear

    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * 2 * p.element_size() if getattr(p, "quant_state", None) is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for m in model.modules():
        if type(m) is NF4Linear and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.in_features * m.out_features
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
    """Give back the plain modules (nn.Linear, or Conv1D for ``fan_in_fan_out`` layers; sharing the base weights),
    merged with their adapters if ``merge``.  Saved modules keep their trained copies, as PEFT's unload does."""
    for name, m in named_lora_layers(model):
        if merge:
            m.merge()
        else:
            m.unmerge()
        _set_child(model, name, m.to_base_module())
    for m in model.modules():
        if getattr(m, SAVED_COPY_ATTR, False):
            delattr(m, SAVED_COPY_ATTR)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
