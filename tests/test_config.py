"""LoRAConfig: validation, the shared rules (scaling, trainable factors, patterns, modules_to_save, math dtype), the
PEFT adapter_config.json round trip, config= on the layer and on inject_lora, and the package's public surface."""

import inspect
import math
import pydoc
import re

import pytest
import torch
import torch.nn as nn

import lora_kernels
from lora_kernels import FusedLoRALinear, LoRAConfig, inject_lora
from lora_kernels.config import (INITS, MODES, is_saved_module, math_dtype, pattern_value, scaling, trainable_factors,
                                 within_saved_module)
from tests.helpers import tiny


# ------------------------------------------------------------------------------------------------------------
# Validation: every bad field is named in the message
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(r="4"), "r"), (dict(r=4.5), "r"), (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=True), "r"),
    (dict(lora_alpha=None), "lora_alpha"), (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_alpha=float("inf")), "lora_alpha"), (dict(lora_alpha=True), "lora_alpha"),
    (dict(lora_alpha="8"), "lora_alpha"),
    (dict(use_rslora="false"), "use_rslora"), (dict(use_rslora=1), "use_rslora"),
    (dict(lora_dropout=1.5), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout="0.1"), "lora_dropout"),
    (dict(mode="C"), "mode"), (dict(mode=None), "mode"), (dict(init_A="x"), "init_A"),
    (dict(target_modules="q_proj("), "target_modules"), (dict(target_modules=3), "target_modules"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules=["q", 3]), "target_modules"),
    (dict(exclude_modules="[bad"), "exclude_modules"), (dict(exclude_modules=5), "exclude_modules"),
    (dict(rank_pattern={"q(": 4}), "rank_pattern"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(rank_pattern={"q": 2.0}), "rank_pattern"), (dict(rank_pattern={3: 2}), "rank_pattern"),
    (dict(rank_pattern=["q"]), "rank_pattern"),
    (dict(alpha_pattern={"v[": 4}), "alpha_pattern"), (dict(alpha_pattern={"v": float("nan")}), "alpha_pattern"),
    (dict(alpha_pattern={"v": "4"}), "alpha_pattern"),
    (dict(modules_to_save="lm_head"), "modules_to_save"), (dict(modules_to_save=["lm_head", 1]), "modules_to_save"),
])
def test_bad_field_is_named(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=rf"LoRAConfig\.{field}\b") as info:
        LoRAConfig(**kwargs)
    if field == "r":
        assert repr(kwargs["r"]) in str(info.value)  # e.g. "LoRAConfig.r must be a positive int, got '4'"


def test_type_errors_are_also_value_errors():
    """Wrong types raise TypeError; it is also a ValueError, which the layer raised for r=2.5 before LoRAConfig."""
    for kwargs in (dict(r="4"), dict(r=4.5), dict(target_modules=3), dict(use_rslora="false")):
        with pytest.raises(TypeError):
            LoRAConfig(**kwargs)
        with pytest.raises(ValueError):
            LoRAConfig(**kwargs)
    with pytest.raises(ValueError) as info:
        LoRAConfig(r=0)
    assert not isinstance(info.value, TypeError)


def test_defaults_normalisation_and_replace():
    c = LoRAConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, c.target_modules, c.exclude_modules, c.rank_pattern,
            c.alpha_pattern, c.modules_to_save, c.mode, c.init_A) == (
        8, 8, 0.0, False, "all-linear", None, {}, {}, None, "AB", "kaiming")
    c = LoRAConfig(target_modules=["v_proj", "q_proj"], modules_to_save=["lm_head"], rank_pattern=None,
                   lora_dropout=0)
    assert c.target_modules == ("v_proj", "q_proj") and c.modules_to_save == ("lm_head",)
    assert c.rank_pattern == {} and isinstance(c.lora_dropout, float)
    assert LoRAConfig(target_modules={"v", "q"}).target_modules == ("q", "v")  # sets sorted: deterministic
    assert LoRAConfig(modules_to_save=[]).modules_to_save is None
    with pytest.raises(Exception):
        c.r = 4  # frozen
    d = c.replace(r=16)
    assert d.r == 16 and c.r == 8 and d.target_modules == c.target_modules
    with pytest.raises(ValueError, match=r"LoRAConfig\.r"):
        c.replace(r=0)
    assert hash(c) == hash(LoRAConfig(target_modules=("v_proj", "q_proj"), modules_to_save=("lm_head",)))


# ------------------------------------------------------------------------------------------------------------
# The shared rules
# ------------------------------------------------------------------------------------------------------------

def test_scaling_both_ways():
    assert scaling(16, 4, False) == 4.0 and scaling(16, 4, True) == 8.0
    assert LoRAConfig(r=4, lora_alpha=16).scaling == 4.0
    assert LoRAConfig(r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    assert LoRAConfig(r=8, lora_alpha=3, use_rslora=True).scaling == 3 / math.sqrt(8)
    layer = FusedLoRALinear(8, 8, r=4, lora_alpha=16, use_rslora=True)
    assert layer.scaling == layer.lora_config.scaling == 8.0


@pytest.mark.parametrize("mode, a, b", [("AB", True, True), ("B", False, True), ("A", True, False)])
def test_trainable_factors_per_mode(mode, a, b):
    assert trainable_factors(mode) == (a, b)
    c = LoRAConfig(mode=mode)
    assert (c.trains_A, c.trains_B) == (a, b)
    layer = FusedLoRALinear(8, 4, r=2, mode=mode)
    assert (layer.lora_A.requires_grad, layer.lora_B.requires_grad) == (a, b)


def test_constants_and_unknown_mode():
    assert MODES == ("AB", "B", "A") and INITS == ("kaiming", "gaussian", "orthogonal")
    with pytest.raises(ValueError, match="mode"):
        trainable_factors("BA")


def test_for_module_follows_peft_pattern_rule():
    c = LoRAConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 6, r"blocks\.1\..*": 2},
                   alpha_pattern={"up_proj": 3, "proj": 5})
    assert c.for_module("blocks.0.q_proj") == (6, 8)
    assert c.for_module("blocks.1.q_proj") == (6, 8)  # the first matching key wins
    assert c.for_module("blocks.1.up_proj") == (2, 3)
    assert c.for_module("blocks.0.v_proj") == (4, 8)  # "proj" must match a whole name component run
    assert c.for_module("blocks.0.proj") == (4, 5)
    assert c.for_module("xq_proj") == (4, 8)
    assert pattern_value("a.b.c", {"b.c": 1}, 0) == 1 and pattern_value("a.xb.c", {"b.c": 1}, 0) == 0
    layer = c.for_layer("blocks.0.q_proj")
    assert (layer.r, layer.lora_alpha, layer.rank_pattern, layer.target_modules) == (6, 8, {}, "all-linear")


def test_modules_to_save_rule():
    assert is_saved_module("lm_head", ["lm_head"]) and is_saved_module("model.lm_head", ["lm_head"])
    assert not is_saved_module("xlm_head", ["lm_head"]) and not is_saved_module("lm_head.proj", ["lm_head"])
    assert is_saved_module("blocks.1", ["blocks.1"]) and not is_saved_module("blocks.11", ["blocks.1"])
    assert within_saved_module("blocks.1.q_proj", ["blocks.1"]) and within_saved_module("blocks.1", ["blocks.1"])
    assert not within_saved_module("blocks.11.q_proj", ["blocks.1"]) and not within_saved_module("", ["blocks.1"])
    # a parameter belongs to a saved module if its module path is within one
    assert within_saved_module("model.lm_head.weight".rpartition(".")[0], ["lm_head"])
    assert not within_saved_module("lm_head_weight".rpartition(".")[0], ["lm_head"])


def test_math_dtype():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert math_dtype(dt) == torch.float32 and math_dtype(torch.zeros(1, dtype=dt)) == torch.float32
    assert math_dtype(torch.float64) == torch.float64
    assert math_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


# ------------------------------------------------------------------------------------------------------------
# PEFT's adapter_config.json
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    LoRAConfig(),
    LoRAConfig(r=4, lora_alpha=16.5, lora_dropout=0.1, use_rslora=True, target_modules=("q_proj", "v_proj"),
               exclude_modules=("blocks.1.q_proj",), rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4},
               modules_to_save=("lm_head",)),
    LoRAConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=r"blocks\.0\..*", mode="B", init_A="orthogonal"),
])
def test_peft_dict_round_trip(config):
    d = config.to_peft_dict(base_model_name_or_path="tiny")
    assert d["peft_type"] == "LORA" and d["bias"] == "none" and d["base_model_name_or_path"] == "tiny"
    assert "mode" not in d and "init_A" not in d  # ours: mode travels in the safetensors metadata
    import json

    d = json.loads(json.dumps(d))  # what the file holds
    assert LoRAConfig.from_peft_dict(d, mode=config.mode, init_A=config.init_A) == config


def test_to_peft_dict_is_accepted_by_peft():
    peft = pytest.importorskip("peft")
    d = LoRAConfig(r=4, lora_alpha=16, target_modules=("q_proj",), rank_pattern={"q_proj": 2}).to_peft_dict()
    d.pop("peft_type")
    theirs = peft.LoraConfig(**d)
    assert theirs.r == 4 and theirs.lora_alpha == 16 and theirs.rank_pattern == {"q_proj": 2}


def test_from_real_peft_config():
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}, modules_to_save=["lm_head"],
                             exclude_modules=["blocks.1.q_proj"], use_rslora=True)
    c = LoRAConfig.from_peft_dict(theirs.to_dict())
    assert c == LoRAConfig(r=4, lora_alpha=16, lora_dropout=0.05, use_rslora=True, target_modules=("q_proj", "v_proj"),
                           exclude_modules=("blocks.1.q_proj",), rank_pattern={"v_proj": 2},
                           alpha_pattern={"q_proj": 4}, modules_to_save=("lm_head",))
    all_linear = peft.LoraConfig(target_modules="all-linear").to_dict()
    assert LoRAConfig.from_peft_dict(all_linear).target_modules == "all-linear"
    for bad, word in ((dict(use_dora=True), "use_dora"), (dict(init_lora_weights="pissa"), "init_lora_weights"),
                      (dict(bias="all"), "bias")):
        with pytest.raises(ValueError, match=word):
            LoRAConfig.from_peft_dict(peft.LoraConfig(target_modules=["q_proj"], **bad).to_dict())


def test_from_peft_dict_errors_name_the_file():
    good = LoRAConfig().to_peft_dict()
    for d, word in ((dict(good, peft_type="IA3"), "peft_type"), ({"peft_type": "LORA"}, "no 'r'"),
                    (dict(good, r="4"), r"LoRAConfig\.r"), (dict(good, rank_pattern={"q": 0}), "rank_pattern"),
                    (dict(good, target_modules=[]), "target_modules")):
        with pytest.raises((ValueError, TypeError), match=rf"^/x/adapter_config.json: .*{word}"):
            LoRAConfig.from_peft_dict(d, path_for_errors="/x/adapter_config.json")
    # target_modules missing or null: PEFT's per-architecture defaults for the model's config.model_type
    assert LoRAConfig.from_peft_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q"]}) == LoRAConfig(
        r=4, lora_alpha=4, target_modules=("q",))
    with pytest.raises(ValueError, match=r"^/x/adapter_config.json: target_modules is null.*model_type"):
        LoRAConfig.from_peft_dict({"peft_type": "LORA", "r": 4}, path_for_errors="/x/adapter_config.json")


# ------------------------------------------------------------------------------------------------------------
# config= on FusedLoRALinear and inject_lora
# ------------------------------------------------------------------------------------------------------------

def test_layer_accepts_config_and_keywords_alike():
    torch.manual_seed(0)
    a = FusedLoRALinear(16, 8, r=4, lora_alpha=12, lora_dropout=0.1, mode="B", use_rslora=True, init_A="gaussian")
    torch.manual_seed(0)
    cfg = LoRAConfig(r=4, lora_alpha=12, lora_dropout=0.1, mode="B", use_rslora=True, init_A="gaussian")
    b = FusedLoRALinear(16, 8, config=cfg)
    assert a.lora_config == b.lora_config == cfg
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (b.r, b.lora_alpha, b.lora_dropout, b.mode, b.use_rslora, b.init_A) == (4, 12, 0.1, "B", True, "gaussian")
    lin = nn.Linear(16, 8)
    c = FusedLoRALinear.from_linear(lin, config=cfg)
    assert c.weight is lin.weight and c.lora_config == cfg
    with pytest.raises(TypeError, match="either"):
        FusedLoRALinear(16, 8, r=2, config=cfg)
    with pytest.raises(TypeError, match="LoRAConfig"):
        FusedLoRALinear.from_linear(lin, config={"r": 4})
    with pytest.raises(ValueError, match=r"LoRAConfig\.r"):
        FusedLoRALinear(16, 8, r="4")


def test_layer_reconfigure():
    layer = FusedLoRALinear(16, 8, r=4, lora_alpha=8)
    layer.reconfigure(lora_alpha=16, use_rslora=True, mode="A")
    assert layer.scaling == 8.0 and layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    with pytest.raises(ValueError, match="reconfigure"):
        layer.reconfigure(r=2)
    with pytest.raises(ValueError, match=r"LoRAConfig\.lora_alpha"):
        layer.reconfigure(lora_alpha=float("nan"))
    assert layer.lora_alpha == 16


def test_inject_accepts_config_positionally_and_by_keyword():
    cfg = LoRAConfig(r=2, lora_alpha=4, target_modules=("q_proj", "up_proj"), rank_pattern={"up_proj": 3},
                     modules_to_save=("lm_head",), mode="B")
    kw = inject_lora(tiny(), ["q_proj", "up_proj"], r=2, lora_alpha=4, rank_pattern={"up_proj": 3},
                     modules_to_save=["lm_head"], mode="B")
    for m in (inject_lora(tiny(), cfg), inject_lora(tiny(), config=cfg)):
        assert {n: p.requires_grad for n, p in m.named_parameters()} == {
            n: p.requires_grad for n, p in kw.named_parameters()}
        assert {n: (x.r, x.lora_alpha, x.mode) for n, x in lora_kernels.named_lora_layers(m)} == {
            n: (x.r, x.lora_alpha, x.mode) for n, x in lora_kernels.named_lora_layers(kw)}
    assert m.blocks[0]["up_proj"].r == 3 and m.lm_head.weight.requires_grad
    with pytest.raises(TypeError, match="either"):
        inject_lora(tiny(), ["q_proj"], config=cfg)
    with pytest.raises(TypeError, match="either"):
        inject_lora(tiny(), cfg, r=4)


def test_inject_signature_defaults_match_the_config():
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(LoRAConfig) if f.default is not dataclasses.MISSING}
    for fn in (inject_lora, FusedLoRALinear.__init__, FusedLoRALinear.from_linear):
        for name, p in inspect.signature(fn).parameters.items():
            if name in defaults and name not in ("rank_pattern", "alpha_pattern"):
                assert p.default == defaults[name], (fn.__qualname__, name)


@pytest.mark.parametrize("bad", [
    dict(r="4"), dict(r=0), dict(lora_alpha=float("nan")), dict(use_rslora="false"), dict(lora_dropout=1.5),
    dict(mode="C"), dict(init_A="x"), dict(target_modules="q_proj("), dict(rank_pattern={"q_proj": 0}),
    dict(alpha_pattern={"q(": 1}), dict(exclude_modules=5),
])
def test_inject_rejects_a_bad_config_and_leaves_the_model_unchanged(bad):
    model = tiny()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    kwargs = dict(dict(target_modules=["q_proj"]), **bad)
    with pytest.raises((ValueError, TypeError), match="LoRAConfig"):
        inject_lora(model, **kwargs)
    with pytest.raises((ValueError, TypeError), match="LoRAConfig"):
        inject_lora(model, LoRAConfig(**kwargs))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert not hasattr(model, "_lora_kernels_config")


def test_model_config_is_recorded():
    m = inject_lora(tiny(), ["q_proj"], r=2, modules_to_save=["lm_head"])
    inject_lora(m, ["v_proj"], r=2)
    cfg = m._lora_kernels_config
    assert isinstance(cfg, LoRAConfig) and cfg.modules_to_save == ("lm_head",)
    assert set(cfg.target_modules) == {f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


# ------------------------------------------------------------------------------------------------------------
# The package's public surface
# ------------------------------------------------------------------------------------------------------------

def test_public_api_and_help():
    assert lora_kernels.optim.PreconditionedAdamW is lora_kernels.PreconditionedAdamW
    assert lora_kernels.init.lora_one_init is lora_kernels.lora_one_init
    for name in lora_kernels.__all__:
        assert hasattr(lora_kernels, name), name
        if not name.startswith("__"):
            assert re.search(rf"\b{name}\b", lora_kernels.__doc__), f"{name} missing from the package docstring"
    assert "LoRALinearFunction" not in lora_kernels.__all__
    assert issubclass(lora_kernels.LoRALinearFunction, torch.autograd.Function)  # still importable
    page = pydoc.render_doc(lora_kernels, renderer=pydoc.plaintext)
    assert "torch.autograd.function" not in page  # no dump of Function's inherited docs
    # The classes' own pages are as long as torch makes them (nn.Module's and Optimizer's inherited methods); the
    # package's own page (API listing, contents, functions, data) must stay short.
    sections = re.split(r"^(?=[A-Z][A-Z ]+$)", page, flags=re.M)
    own = [s for s in sections if not s.startswith("CLASSES")]
    assert sum(len(s.splitlines()) for s in own) < 400


# ------------------------------------------------------------------------------------------------------------
# Rules added for PEFT parity: default init per mode, exact names in saved files, PEFT's default targets
# ------------------------------------------------------------------------------------------------------------

def test_default_init_per_mode():
    from lora_kernels.config import default_init

    assert [default_init(m) for m in MODES] == ["kaiming", "orthogonal", "kaiming"]
    assert LoRAConfig(mode="B").init_A == "orthogonal" and LoRAConfig(mode="B", init_A="gaussian").init_A == "gaussian"
    with pytest.raises(ValueError, match=r"LoRAConfig\.init_A"):
        LoRAConfig(init_A="x")


def test_exact_targets_and_pattern_keys_select_exactly_the_named_modules():
    from lora_kernels.config import exact_pattern_key, exact_targets

    every = ["fc", "sub", "sub.fc", "a", "a.fc", "b", "b.a", "b.a.fc", "q.proj", "qXproj"]

    def peft_list_match(targets, name):
        return name in targets or any(name.endswith("." + t) for t in targets)

    for chosen in (["fc"], ["fc", "b.a.fc"], ["a.fc"], ["sub.fc", "a.fc", "b.a.fc"],
                   ["fc", "sub.fc", "a.fc", "b.a.fc"]):
        t = exact_targets(chosen, every)
        picked = {n for n in every if (re.fullmatch(t, n) if isinstance(t, str) else peft_list_match(t, n))}
        assert picked == set(chosen), (chosen, t)
    assert exact_targets(["sub.fc", "b.a.fc"], every) == ("b.a.fc", "sub.fc")  # a plain list when that is exact
    for name in every:
        key = exact_pattern_key(name, every)
        assert [n for n in every if pattern_value(n, {key: 1}, 0)] == [name], (name, key)
    assert exact_pattern_key("sub.fc", every) == "sub.fc" and exact_pattern_key("fc", every) == "^fc"
    assert exact_pattern_key("q.proj", every) == r"^q\.proj"  # "q.proj" read as a regex also selects "qXproj"


def test_peft_default_targets_and_fan_in_fan_out_in_the_peft_dict():
    pytest.importorskip("peft")
    from lora_kernels.config import peft_default_targets

    assert peft_default_targets("llama") == ("q_proj", "v_proj") and peft_default_targets("gpt2") == ("c_attn",)
    with pytest.raises(ValueError, match="no default target modules for model_type 'nonesuch'"):
        peft_default_targets("nonesuch")
    d = {"peft_type": "LORA", "r": 4, "target_modules": None}
    assert LoRAConfig.from_peft_dict(d, model_type="llama").target_modules == ("q_proj", "v_proj")
    c = LoRAConfig(target_modules=("c_attn",), fan_in_fan_out=True)
    assert c.to_peft_dict()["fan_in_fan_out"] is True and LoRAConfig.from_peft_dict(c.to_peft_dict()) == c
    with pytest.raises(TypeError, match=r"LoRAConfig\.fan_in_fan_out"):
        LoRAConfig(fan_in_fan_out="true")
