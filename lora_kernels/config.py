"""``LoRAConfig`` and the rules every part of the package shares, each in one place.

The config speaks PEFT's vocabulary (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``...) so that a PEFT
``LoraConfig`` carries over field for field; ``mode`` and ``init_A`` are ours (which factor trains, how the random
factor is drawn) and are not part of PEFT's adapter_config.json.

The shared rules:
  * ``MODES`` / ``INITS``: the known modes and random-factor inits;
  * ``scaling(alpha, r, use_rslora)``: the adapter's scale s = alpha / r, or alpha / √r with rsLoRA;
  * ``trainable_factors(mode)``: which of (A, B) trains in a mode;
  * ``pattern_value(name, pattern, default)``: PEFT's rank_pattern / alpha_pattern lookup;
  * ``is_saved_module`` / ``within_saved_module``: PEFT's modules_to_save matching;
  * ``math_dtype(x)``: the precision of adapter-side arithmetic (fp64 stays fp64, everything else in fp32);
  * ``default_init(mode)``: the random factor's default draw per mode (orthogonal in "B", PEFT's kaiming otherwise);
  * ``exact_targets`` / ``exact_pattern_key``: how a saved adapter names exactly its layers, so that PEFT's matching
    (suffixes, regexes) reloads exactly those modules and no others;
  * ``peft_default_targets(model_type)``: PEFT's per-architecture targets for ``target_modules: null``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Set
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

MODES = ("AB", "B", "A")
INITS = ("kaiming", "gaussian", "orthogonal")

Targets = Union[str, Tuple[str, ...]]

# PEFT adapter_config.json entries lora_kernels cannot honour: a true flag, or any value set at all.
# (ensure_weight_tying: PEFT then trains a saved module's weight tied to the embeddings; lora_kernels always trains
# an untied copy, PEFT's default.)
_PEFT_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_bdlora", "use_qalora", "ensure_weight_tying")
_PEFT_UNSUPPORTED_SET = ("layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices",
                         "alora_invocation_tokens", "arrow_config", "kasa_config", "velora_config", "monteclora_config")
# init_lora_weights values that only set A/B; the others (pissa, olora, loftq, corda, eva, lora_ga...) also change
# the base weights, so their adapters are meaningless on the original base model and are refused.
_PEFT_PLAIN_INITS = (True, False, "gaussian", "kaiming")


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """The adapter's scale s in y = x Wᵀ + s·x AᵀBᵀ: alpha / r, or alpha / √r with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def trainable_factors(mode: str) -> Tuple[bool, bool]:
    """(A trains, B trains) in ``mode``: "AB" both, "B" only B (A frozen random), "A" only A (B frozen random)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode in ("AB", "A"), mode in ("AB", "B")


def math_dtype(x: Union[torch.dtype, torch.Tensor]) -> torch.dtype:
    """Precision for adapter-side math (merges, preconditioners, gradient accumulators, SVDs) on ``x`` (a tensor or
    a dtype): fp64 stays fp64, fp32/fp16/bf16 go to fp32, so a half-precision model never accumulates in half and an
    fp64 model is never silently downcast."""
    dt = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dt == torch.float64 else torch.float32


def default_init(mode: str) -> str:
    """The random factor's draw when ``init_A`` is not given: "orthogonal" in mode "B" (the asymmetry paper's frozen A
    has orthonormal rows, σ = 1; kaiming-uniform would give σ ≈ 0.58 and so a ≈ 0.58× smaller effective step),
    PEFT's "kaiming" in modes "AB" and "A"."""
    return "orthogonal" if mode == "B" else "kaiming"


def exact_pattern_key(name: str, names: Sequence[str]) -> str:
    """A rank_pattern / alpha_pattern key that selects the module ``name`` and no other of ``names`` under PEFT's
    rule (``pattern_value``): the name itself when, read as that rule's regex, it selects no other name (e.g. none
    ends with "." + name), else "^" + the escaped name (in ``(.*\\.)?(?:^…)`` the caret only matches at the start,
    so the prefix must be empty)."""
    if any(n != name and pattern_value(n, {name: True}, False) for n in names):
        return "^" + re.escape(name)
    return name


def exact_targets(names: Sequence[str], all_names: Sequence[str]) -> Targets:
    """``target_modules`` that match exactly ``names`` among the model's module names ``all_names`` under PEFT's
    rules (and ours): the sorted list of full names when their suffix matching picks no other module, else a regex
    (``re.fullmatch``) alternating the escaped full names."""
    chosen = tuple(sorted(set(names)))
    extra = [n for n in all_names if n not in chosen and any(n.endswith("." + t) for t in chosen)]
    if not extra:
        return chosen
    return "^(?:" + "|".join(re.escape(n) for n in chosen) + ")$"


def peft_default_targets(model_type: Optional[str], where: str = "") -> Tuple[str, ...]:
    """PEFT's ``target_modules`` for ``target_modules: null``: its per-architecture defaults
    (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) for the model's
    ``config.model_type``.  Raises ValueError (prefixed by ``where``) when there are none or PEFT is not installed."""
    fix = "set target_modules in the adapter config"
    if not model_type:
        raise ValueError(f"{where}target_modules is null: PEFT then uses its per-architecture defaults for the model's "
                         f"config.model_type, and this model has no config.model_type; {fix}")
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        raise ValueError(f"{where}target_modules is null: PEFT's per-architecture defaults "
                         f"(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) are needed to resolve it for "
                         f"model_type {model_type!r}, and peft is not installed; {fix}") from None
    targets = mapping.get(model_type)
    if not targets:
        raise ValueError(f"{where}target_modules is null and PEFT has no default target modules for model_type "
                         f"{model_type!r} (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); {fix}")
    return (targets,) if isinstance(targets, str) else tuple(sorted(targets))


def pattern_value(name: str, pattern: Optional[Mapping[str, Any]], default):
    """PEFT's rank_pattern / alpha_pattern rule: the value of the first key k with
    ``re.fullmatch(rf"(.*\\.)?(?:{k})", name)``, else ``default``."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def is_saved_module(name: str, modules_to_save: Optional[Sequence[str]]) -> bool:
    """PEFT's modules_to_save rule: the module ``name`` is saved if it equals an entry or ends with "." + entry."""
    return any(name == s or name.endswith("." + s) for s in modules_to_save or ())


def within_saved_module(name: str, modules_to_save: Optional[Sequence[str]]) -> bool:
    """Whether the module ``name`` is a saved module or lies below one (``is_saved_module`` of a dotted prefix).

    Used to keep LoRA out of saved modules, and, on a parameter's module path, to tell whether the parameter is
    part of a saved module."""
    if not modules_to_save or not name:
        return False
    parts = name.split(".")
    return any(is_saved_module(".".join(parts[:i]), modules_to_save) for i in range(1, len(parts) + 1))


class _ConfigTypeError(TypeError, ValueError):
    """A field of the wrong type.  Also a ValueError: the layer's checks that came before LoRAConfig raised
    ValueError for e.g. r=2.5, and code catching that keeps working."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_names(v):
    """Lists and sets of names become tuples (sets sorted, so the config is deterministic); anything else as is."""
    if isinstance(v, Set):
        return tuple(sorted(v)) if all(isinstance(s, str) for s in v) else tuple(v)
    if isinstance(v, list):
        return tuple(v)
    return v


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Settings of a LoRA adapter, in PEFT's vocabulary; validated on construction (``validate``).

    r, lora_alpha, lora_dropout, use_rslora: rank, scale numerator (s = ``scaling``), dropout on the adapter's
    input, and s = alpha/√r instead of alpha/r.
    target_modules: ``"all-linear"``, a regex matching full module names, or a tuple of names / name suffixes;
    exclude_modules: the same kinds, removed from the targets.  rank_pattern / alpha_pattern: {regex: value}
    overriding r / lora_alpha per module (``for_module``).  modules_to_save: modules trained and saved in full.
    mode: which factor trains (``MODES``, ``trainable_factors``); init_A: how the random factor is drawn (``INITS``;
    None: ``default_init(mode)``, orthogonal in mode "B", kaiming otherwise; resolved on construction).
    fan_in_fan_out: the base weight is stored in×out (transformers' ``Conv1D``, GPT-2); inject_lora sets it per layer
    from the module's type, as PEFT does, and save_adapter writes it when the adapted layers are Conv1D.
    autocast_adapter_dtype: fp16/bf16 base layers get fp32 adapters (PEFT's name and default; not part of
    adapter_config.json; honoured once the kernels take fp32 adapters, see ``lora_kernels.modules.lora_linear``).
    Lists are stored as tuples and None patterns as {}; ``replace(**changes)`` gives a validated copy.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Targets = "all-linear"
    exclude_modules: Optional[Targets] = None
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Optional[Tuple[str, ...]] = None
    mode: str = "AB"
    init_A: Optional[str] = None
    fan_in_fan_out: bool = False
    autocast_adapter_dtype: bool = True

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        put("target_modules", _as_names(self.target_modules))
        put("exclude_modules", _as_names(self.exclude_modules))
        put("modules_to_save", _as_names(self.modules_to_save) or None)
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            put(name, {} if value is None else dict(value) if isinstance(value, Mapping) else value)
        if self.init_A is None and isinstance(self.mode, str) and self.mode in MODES:
            put("init_A", default_init(self.mode))
        self.validate()
        put("r", int(self.r))
        put("lora_dropout", float(self.lora_dropout))

    def __hash__(self) -> int:
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    # -- validation --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError (a bad value) or TypeError (a bad type; also a ValueError) naming the field."""
        def fail(field: str, what: str, value, exc=ValueError):
            raise exc(f"LoRAConfig.{field} must be {what}, got {value!r}")

        if not _is_int(self.r):
            fail("r", "a positive int", self.r, _ConfigTypeError)
        if self.r <= 0:
            fail("r", "a positive int", self.r)
        if not _is_real(self.lora_alpha):
            fail("lora_alpha", "a finite real number", self.lora_alpha, _ConfigTypeError)
        if not math.isfinite(self.lora_alpha):
            fail("lora_alpha", "a finite real number", self.lora_alpha)
        if not _is_real(self.lora_dropout):
            fail("lora_dropout", "a real number in [0, 1)", self.lora_dropout, _ConfigTypeError)
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", "a real number in [0, 1)", self.lora_dropout)
        if not isinstance(self.use_rslora, bool):
            fail("use_rslora", "a bool", self.use_rslora, _ConfigTypeError)
        if not isinstance(self.mode, str) or self.mode not in MODES:
            fail("mode", f"one of {MODES}", self.mode)
        if not isinstance(self.init_A, str) or self.init_A not in INITS:
            fail("init_A", f"one of {INITS} or None", self.init_A)
        for flag in ("fan_in_fan_out", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, flag), bool):
                fail(flag, "a bool", getattr(self, flag), _ConfigTypeError)
        self._check_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self._check_targets("exclude_modules", self.exclude_modules, allow_empty=True)
        saved = self.modules_to_save
        if saved is not None and not (isinstance(saved, tuple) and all(isinstance(s, str) and s for s in saved)):
            fail("modules_to_save", "None or a sequence of module names", self.modules_to_save, _ConfigTypeError)
        self._check_pattern("rank_pattern", self.rank_pattern, _is_int, lambda v: v > 0, "a positive int")
        self._check_pattern("alpha_pattern", self.alpha_pattern, _is_real, math.isfinite, "a finite real number")

    @staticmethod
    def _check_targets(field: str, value, allow_empty: bool = False) -> None:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"LoRAConfig.{field} {value!r} is not a valid regular expression: {e}") from None
            return
        if not (isinstance(value, tuple) and all(isinstance(t, str) for t in value)):
            raise _ConfigTypeError(f"LoRAConfig.{field} must be 'all-linear', a regex string or a sequence of module "
                                   f"names/suffixes, got {value!r}")
        if not value and not allow_empty:
            raise ValueError(f"LoRAConfig.{field} is empty")

    @staticmethod
    def _check_pattern(field: str, pattern, type_ok, value_ok, what: str) -> None:
        if not isinstance(pattern, dict):
            raise _ConfigTypeError(f"LoRAConfig.{field} must be a dict {{regex: value}}, got {pattern!r}")
        for key, value in pattern.items():
            if not isinstance(key, str):
                raise _ConfigTypeError(f"LoRAConfig.{field} keys must be regex strings, got {key!r}")
            try:
                re.compile(rf"(.*\.)?(?:{key})")
            except re.error as e:
                raise ValueError(f"LoRAConfig.{field} key {key!r} is not a valid regular expression: {e}") from None
            if not type_ok(value):
                raise _ConfigTypeError(f"LoRAConfig.{field}[{key!r}] must be {what}, got {value!r}")
            if not value_ok(value):
                raise ValueError(f"LoRAConfig.{field}[{key!r}] must be {what}, got {value!r}")

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return scaling(self.lora_alpha, self.r, self.use_rslora)

    @property
    def trains_A(self) -> bool:
        return trainable_factors(self.mode)[0]

    @property
    def trains_B(self) -> bool:
        return trainable_factors(self.mode)[1]

    def replace(self, **changes) -> "LoRAConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def for_module(self, name: str) -> Tuple[int, float]:
        """(r, lora_alpha) of the module ``name``: rank_pattern / alpha_pattern if a key matches (PEFT's rule,
        ``pattern_value``), else the defaults."""
        return (int(pattern_value(name, self.rank_pattern, self.r)),
                pattern_value(name, self.alpha_pattern, self.lora_alpha))

    def for_layer(self, name: Optional[str] = None) -> "LoRAConfig":
        """The settings one layer keeps: r and lora_alpha resolved for ``name`` (when given), the model-level fields
        (targets, exclusions, patterns, modules_to_save) back at their defaults; fan_in_fan_out is the layer's own
        (inject_lora sets it from the module's type)."""
        r, alpha = self.for_module(name) if name is not None else (self.r, self.lora_alpha)
        return self.replace(r=r, lora_alpha=alpha, target_modules="all-linear", exclude_modules=None, rank_pattern={},
                            alpha_pattern={}, modules_to_save=None)

    # -- PEFT's adapter_config.json ----------------------------------------------------------------------
    def to_peft_dict(self, *, base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None,
                     inference_mode: bool = True) -> Dict[str, Any]:
        """PEFT's adapter_config.json for this config (``peft.LoraConfig(**d)`` accepts it, minus ``peft_type``).

        mode, init_A and autocast_adapter_dtype are not PEFT's adapter_config.json entries: mode travels in the
        adapter file's metadata, a saved adapter holds trained factors, so its init is moot (``init_lora_weights`` is
        True), and autocast_adapter_dtype is a loading option (PEFT's ``from_pretrained`` argument)."""
        def names(v):
            return v if v is None or isinstance(v, str) else list(v)

        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": names(self.target_modules),
            "exclude_modules": names(self.exclude_modules),
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": names(self.modules_to_save),
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": True,
            "inference_mode": inference_mode,
            "use_dora": False,
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], path_for_errors: Optional[str] = None, *, mode: str = "AB",
                       init_A: Optional[str] = None, model_type: Optional[str] = None,
                       autocast_adapter_dtype: bool = True) -> "LoRAConfig":
        """The config of a PEFT adapter_config.json (or ``peft.LoraConfig(...).to_dict()``); ``mode`` / ``init_A`` /
        ``autocast_adapter_dtype`` are ours and given separately.  ``target_modules: null`` takes PEFT's defaults for
        ``model_type`` (``peft_default_targets``).  Refuses what lora_kernels cannot reproduce (DoRA, bias training,
        base-modifying inits...); errors start with ``path_for_errors`` when given."""
        where = f"{path_for_errors}: " if path_for_errors else ""
        if not isinstance(d, Mapping):
            raise _ConfigTypeError(f"{where}the adapter config must be a JSON object (a mapping of PEFT's LoraConfig "
                                   f"fields), got a {type(d).__name__}")
        if d.get("peft_type") != "LORA":
            raise ValueError(f"{where}peft_type is {d.get('peft_type')!r}, only 'LORA' adapters are supported")
        for key in _PEFT_UNSUPPORTED_TRUE:
            if d.get(key):
                raise ValueError(f"{where}{key}={d[key]!r} is not supported by lora_kernels")
        for key in _PEFT_UNSUPPORTED_SET:
            if d.get(key) not in (None, [], {}):
                raise ValueError(f"{where}{key}={d[key]!r} is not supported by lora_kernels")
        init = d.get("init_lora_weights", True)
        if not isinstance(init, (bool, str)) or init not in _PEFT_PLAIN_INITS:
            raise ValueError(f"{where}init_lora_weights={init!r} also modifies the base weights, which this adapter "
                             f"file does not contain; not supported")
        if "r" not in d:
            raise ValueError(f"{where}the config has no 'r'")
        if d.get("bias", "none") != "none":
            raise ValueError(f"{where}bias={d['bias']!r} is not supported (only 'none')")
        targets = d.get("target_modules")
        if targets is None:
            targets = peft_default_targets(model_type, where)
        try:
            return cls(r=d["r"], lora_alpha=d.get("lora_alpha", d["r"]), lora_dropout=d.get("lora_dropout", 0.0),
                       use_rslora=d.get("use_rslora", False), target_modules=targets,
                       exclude_modules=d.get("exclude_modules") or None, rank_pattern=d.get("rank_pattern") or {},
                       alpha_pattern=d.get("alpha_pattern") or {}, modules_to_save=d.get("modules_to_save") or None,
                       fan_in_fan_out=d.get("fan_in_fan_out", False), mode=mode, init_A=init_A,
                       autocast_adapter_dtype=autocast_adapter_dtype)
        except (TypeError, ValueError) as e:
            if not where:
                raise
            raise type(e)(f"{where}{e}") from None


def non_default_fields(values: Mapping[str, Any]) -> List[str]:
    """Names in ``values`` (LoRAConfig field → value) whose value is not LoRAConfig's default (None counts as the
    default): what a caller passed on top of ``config=``, which the layer and inject_lora refuse as ambiguous."""
    defaults = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(LoRAConfig)}
    return [k for k, v in values.items()
            if v is not None and not (type(v) is type(defaults[k]) and v == defaults[k])]
