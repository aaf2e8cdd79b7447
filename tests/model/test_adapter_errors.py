"""Bad input to load_adapter / inject_lora: one test per input, each checking that the error names the file and the
key (or the argument), and that the model is left bit-identical (``snapshot`` / ``assert_unchanged``: tensors,
requires_grad flags, merged flags, training modes, configs), whether it was plain, injected or merged."""

import json
import os

import pytest

from lora_kernels import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter
from tests.helpers import assert_unchanged, randomise_adapters, snapshot, tiny

KINDS = ["plain", "injected", "merged"]


def target(kind):
    """The model a load goes into: plain, injected (r=4, as the saved adapter), or injected and merged."""
    model = tiny()
    if kind != "plain":
        inject_lora(model, r=4, modules_to_save=["lm_head"])
        randomise_adapters(model, seed=7)
        if kind == "merged":
            merge_lora(model)
    return model


@pytest.fixture
def adapter(tmp_path):
    """A valid adapter directory (all-linear, r=4, modules_to_save lm_head); returns (dir, config file, config)."""
    model = inject_lora(tiny(), r=4, lora_alpha=8, modules_to_save=["lm_head"])
    randomise_adapters(model)
    save_adapter(model, str(tmp_path))
    cfg_file = str(tmp_path / "adapter_config.json")
    return str(tmp_path), cfg_file, json.load(open(cfg_file))


def refused(kind, path, exc, pattern):
    """load_adapter into a model of ``kind`` raises ``exc`` matching ``pattern`` and leaves the model unchanged."""
    model = target(kind)
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        load_adapter(model, path)
    assert_unchanged(model, snap)


def with_config(cfg_file, cfg, **changes):
    json.dump(dict(cfg, **changes), open(cfg_file, "w"))


def named(cfg_file, key):
    return rf"^{cfg_file}: .*{key}"


@pytest.mark.parametrize("kind", KINDS)
def test_lora_alpha_null(adapter, kind):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, lora_alpha=None)
    refused(kind, path, ValueError, named(cfg_file, r"LoRAConfig\.lora_alpha.*None"))


@pytest.mark.parametrize("kind", KINDS)
def test_rank_pattern_zero(adapter, kind):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, rank_pattern={"v_proj": 0})
    refused(kind, path, ValueError, named(cfg_file, r"LoRAConfig\.rank_pattern\['v_proj'\]"))


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_json(adapter, kind):
    path, cfg_file, _ = adapter
    open(cfg_file, "w").write('{"peft_type": "LORA", "r": 4,')
    refused(kind, path, ValueError, rf"^{cfg_file}: not valid JSON")


@pytest.mark.parametrize("kind", KINDS)
def test_config_is_a_list(adapter, kind):
    path, cfg_file, cfg = adapter
    json.dump([cfg], open(cfg_file, "w"))
    refused(kind, path, TypeError, rf"^{cfg_file}: the adapter config must be a JSON object.*list")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key, value, field", [
    ("target_modules", "q_proj(", "target_modules"), ("exclude_modules", "[bad", "exclude_modules"),
    ("rank_pattern", {"q(": 2}, "rank_pattern"), ("alpha_pattern", {"v[": 4}, "alpha_pattern"),
])
def test_bad_regex(adapter, kind, key, value, field):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, **{key: value})
    refused(kind, path, ValueError, named(cfg_file, rf"LoRAConfig\.{field}.*not a valid regular expression"))


@pytest.mark.parametrize("kind", KINDS)
def test_target_modules_null_without_peft_defaults(adapter, kind):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, target_modules=None)
    refused(kind, path, ValueError, named(cfg_file, r"target_modules is null.*per-architecture defaults.*model_type"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key, value", [("r", "4"), ("r", 4.5), ("use_rslora", "false"), ("lora_dropout", 1.5)])
def test_bad_value(adapter, kind, key, value):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, **{key: value})
    refused(kind, path, (TypeError, ValueError), named(cfg_file, rf"LoRAConfig\.{key}\b.*{value!r}"))


@pytest.mark.parametrize("kind", KINDS)
def test_ensure_weight_tying_refused(adapter, kind):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, ensure_weight_tying=True)
    refused(kind, path, ValueError, named(cfg_file, "ensure_weight_tying"))


@pytest.mark.parametrize("kind", KINDS)
def test_unreadable_safetensors(adapter, kind):
    path, _, _ = adapter
    weights = os.path.join(path, "adapter_model.safetensors")
    open(weights, "wb").write(b"\x00" * 16)
    refused(kind, path, ValueError, rf"^{weights}: not a readable safetensors file")


@pytest.mark.parametrize("kind", KINDS)
def test_missing_saved_module_tensor(adapter, kind):
    from safetensors.torch import load_file, save_file

    path, _, _ = adapter
    weights = os.path.join(path, "adapter_model.safetensors")
    state = load_file(weights)
    state.pop("base_model.model.lm_head.weight")
    save_file(state, weights)
    refused(kind, path, KeyError, "base_model.model.lm_head.weight")


@pytest.mark.parametrize("kind", ["injected", "merged"])
def test_rank_disagreeing_with_the_layers(adapter, kind):
    path, cfg_file, cfg = adapter
    with_config(cfg_file, cfg, rank_pattern={"q_proj": 2})
    refused(kind, path, ValueError, r"base_model\.model\.blocks\.0\.q_proj\.lora_A\.weight: .*r=2 \(r / rank_pattern\)"
                                    r".*r=4.*rank 4")


def test_inject_twice_into_the_same_module_says_already_injected():
    model = inject_lora(tiny(), ["q_proj"], r=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.q_proj, blocks\.1\.q_proj already injected"):
        inject_lora(model, ["q_proj", "v_proj"], r=2)
    with pytest.raises(ValueError, match="already injected"):
        inject_lora(model, "all-linear")
    assert_unchanged(model, snap)
    inject_lora(model, "all-linear", exclude_modules=["q_proj"])  # the way to add the rest


@pytest.mark.parametrize("kwargs, word", [
    (dict(rank_pattern={"v_proj": 0}), r"rank_pattern\['v_proj'\]"), (dict(r="4"), r"LoRAConfig\.r\b"),
    (dict(target_modules="q_proj("), "target_modules"), (dict(modules_to_save=["classifier"]), "modules_to_save"),
    (dict(target_modules=["nothing"]), "matched no nn.Linear or Conv1D"),
])
@pytest.mark.parametrize("kind", ["plain", "injected", "merged"])
def test_failed_inject_leaves_the_model_unchanged(kind, kwargs, word):
    model = target(kind)
    snap = snapshot(model)
    kwargs = dict(dict(target_modules=["up_proj"]), **kwargs)
    with pytest.raises((TypeError, ValueError), match=word):
        inject_lora(model, **kwargs)
    assert_unchanged(model, snap)


def test_rollback_when_applying_fails(monkeypatch):
    """Even an error while applying a checked plan (here: a failing deep copy) puts the model back."""
    import copy

    model = inject_lora(tiny(), ["q_proj"], r=2)
    merge_lora(model)
    snap = snapshot(model)

    def broken(*_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(copy, "deepcopy", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        inject_lora(model, ["v_proj"], modules_to_save=["lm_head"])
    assert_unchanged(model, snap)


def test_config_from_peft_dict_names_every_field_before_touching_anything():
    bad = LoRAConfig(target_modules=("q_proj",)).to_peft_dict()
    for key, value in (("r", "4"), ("lora_alpha", None), ("use_rslora", "false"), ("lora_dropout", 1.5),
                       ("fan_in_fan_out", "yes")):
        with pytest.raises((TypeError, ValueError), match=rf"^f: LoRAConfig\.{key}"):
            LoRAConfig.from_peft_dict(dict(bad, **{key: value}), path_for_errors="f")
