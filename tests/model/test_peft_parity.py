"""PEFT parity of the model-level behaviour, each checked against PEFT itself (tiny models from configs, random
weights, nothing downloaded):

  * loading for inference (``is_trainable=False``) as ``PeftModel.from_pretrained``: frozen adapters, model in eval;
  * GPT-2's ``Conv1D`` layers (PEFT's ``fan_in_fan_out``): injection, forward, gradients, merge, unload, files;
  * ``modules_to_save`` on a head tied to the embeddings: an untied trainable copy, PEFT's key names;
  * adapter files that reload to exactly the injected modules (and ranks) in both libraries.

Outputs of ours (fp32, through the kernels or the PyTorch path: the ``backend`` fixture) are compared with PEFT's in
float64, within 2 × PEFT's own fp32 error + ``error_floor`` (``assert_matches_reference``).
"""

import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_kernels import (FusedLoRALinear, LoRAConfig, inject_lora, load_adapter, merge_lora,  # noqa: E402
                          named_lora_layers, save_adapter, trainable_parameters, unload_lora)
from tests.helpers import assert_matches_reference, assert_unchanged, snapshot  # noqa: E402

PEFT_PREFIX = "base_model.model."
GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
K_GPT2 = 2 * (32 + 16 + 10 + 32 + 32 + 128 + 3 * 4) + 32  # reductions along the path: c_attn, QKᵀ, PV, c_proj, mlp
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
K_LLAMA = 2 * (32 + 8 + 10 + 32 + 32 + 64 + 3 * 4) + 32
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def gpt2(cls="GPT2LMHeadModel"):
    torch.manual_seed(0)
    return getattr(transformers, cls)(transformers.GPT2Config(**GPT2)).eval()


def llama(tied=False):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tied)).eval()


def peft_lora_layers(model):
    """{module name in the base model: PEFT LoRA layer} of a PeftModel."""
    return {n[len(PEFT_PREFIX):]: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def randomise_peft(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in peft_lora_layers(model).values():
            for factor in (layer.lora_A["default"], layer.lora_B["default"]):
                factor.weight.copy_(torch.randn(factor.weight.shape, generator=g) * std)


def copy_factors(theirs, ours):
    """Our factors := PEFT's, layer by layer (same names)."""
    layers = peft_lora_layers(theirs)
    ours_layers = dict(named_lora_layers(ours))
    assert set(layers) == set(ours_layers)
    with torch.no_grad():
        for n, m in ours_layers.items():
            m.lora_A.copy_(layers[n].lora_A["default"].weight)
            m.lora_B.copy_(layers[n].lora_B["default"].weight)


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quiet_peft(fn, *args, **kwargs):
    """PEFT warns about fan_in_fan_out / tied weights; those warnings are PEFT's, not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# 1. Loading for inference, as PeftModel.from_pretrained
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def llama_adapter_with_dropout(tmp_path):
    ours = inject_lora(llama(), r=4, lora_alpha=8, lora_dropout=0.1, mode="B")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in named_lora_layers(ours):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    save_adapter(ours, str(tmp_path))
    return str(tmp_path)


def test_load_for_inference_freezes_and_evals_like_peft(backend, llama_adapter_with_dropout):
    path = llama_adapter_with_dropout
    theirs = peft.PeftModel.from_pretrained(llama(), path)
    assert not theirs.training and trainable_count(theirs) == 0  # what PEFT does
    theirs64 = copy.deepcopy(theirs).double()
    loaded = load_adapter(llama().train(), path)
    assert not loaded.training and not any(m.training for m in loaded.modules())  # model.eval(), as PEFT
    assert trainable_count(loaded) == 0
    first, second = logits(loaded), logits(loaded)
    assert torch.equal(first, second)  # no dropout at inference
    assert_matches_reference(first, logits(theirs), logits(theirs64), K_LLAMA, "logits")
    # into an already-injected model in train mode: frozen and in eval mode too
    injected = inject_lora(llama().train(), r=4, lora_alpha=8, lora_dropout=0.1)
    load_adapter(injected, path)
    assert not injected.training and trainable_count(injected) == 0
    assert torch.equal(logits(injected), logits(injected))


def test_load_trainable_keeps_modes_and_the_models_train_mode(backend, llama_adapter_with_dropout):
    path = llama_adapter_with_dropout
    model = load_adapter(llama().train(), path, is_trainable=True)
    assert model.training  # left as it was, as PEFT's is_trainable=True
    layers = dict(named_lora_layers(model))
    assert all(m.lora_B.requires_grad and not m.lora_A.requires_grad for m in layers.values())  # mode "B" as saved
    assert not torch.equal(logits(model), logits(model))  # dropout on in training
    theirs = peft.PeftModel.from_pretrained(llama(), path, is_trainable=True)
    assert trainable_count(theirs) == sum(m.lora_A.numel() + m.lora_B.numel() for m in layers.values())
    ab = load_adapter(llama(), path, is_trainable=True, mode="AB")
    assert trainable_count(ab) == trainable_count(theirs)
    with pytest.raises(TypeError, match="is_trainable"):
        load_adapter(llama(), path, is_trainable="yes")


# ------------------------------------------------------------------------------------------------------------
# 2. GPT-2: transformers Conv1D (weight stored in×out; PEFT's fan_in_fan_out)
# ------------------------------------------------------------------------------------------------------------

def test_gpt2_all_linear_adapts_conv1d_like_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: Conv1D is adapted, by its type, as PEFT does
        ours = inject_lora(gpt2("GPT2ForSequenceClassification"), "all-linear", r=8)
    theirs = quiet_peft(peft.get_peft_model, gpt2("GPT2ForSequenceClassification"),
                        peft.LoraConfig(target_modules="all-linear", r=8))
    assert {n for n, _ in named_lora_layers(ours)} == set(peft_lora_layers(theirs))
    assert trainable_parameters(ours).trainable == trainable_count(theirs) == 8464
    layers = dict(named_lora_layers(ours))
    assert layers["transformer.h.0.attn.c_attn"].fan_in_fan_out and not layers["score"].fan_in_fan_out
    assert layers["transformer.h.0.attn.c_attn"].weight is not None and \
        layers["transformer.h.0.mlp.c_fc"].lora_A.shape == (8, 32)


def test_conv1d_only_model_names_its_conv1d_layers():
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no nn.Linear or Conv1D module; some available: "
                                         r"transformer\.h\.0\.attn\.c_attn"):
        inject_lora(model, ["q_proj"])
    assert_unchanged(model, snap)


def test_gpt2_forward_gradients_merge_unload_match_peft(backend):
    theirs = quiet_peft(peft.get_peft_model, gpt2(), peft.LoraConfig(target_modules=GPT2_TARGETS, fan_in_fan_out=True,
                                                                     r=4, lora_alpha=8))
    randomise_peft(theirs)
    theirs64 = copy.deepcopy(theirs).double()
    base = gpt2()
    conv_weight = gpt2_weight_of(base)
    ours = inject_lora(base, GPT2_TARGETS, r=4, lora_alpha=8)
    copy_factors(theirs, ours)
    assert trainable_count(ours) == trainable_count(theirs) == 2 * (4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128)
                                                                     + 4 * (128 + 32))
    assert gpt2_weight_of(ours) is conv_weight and conv_weight.shape == (32, 96)  # the Conv1D's own, in×out

    assert_matches_reference(logits(ours), logits(theirs), logits(theirs64), K_GPT2, "logits")

    def lora_grads(model, layers):
        model.zero_grad()
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        return layers(model)

    ours_g = lora_grads(ours, lambda m: {n: (x.lora_A.grad, x.lora_B.grad) for n, x in named_lora_layers(m)})
    peft_g = lambda m: {n: (x.lora_A["default"].weight.grad, x.lora_B["default"].weight.grad)  # noqa: E731
                        for n, x in peft_lora_layers(m).items()}
    theirs_g, theirs64_g = lora_grads(theirs, peft_g), lora_grads(theirs64, peft_g)
    for n in ours_g:
        for i, factor in enumerate(("lora_A", "lora_B")):
            assert_matches_reference(ours_g[n][i], theirs_g[n][i], theirs64_g[n][i], K_GPT2, f"{n}.{factor} grad")

    ours.zero_grad()
    unmerged = logits(ours)
    merge_lora(ours)
    for model in (theirs, theirs64):
        model.merge_adapter()
    merged_ref = (logits(theirs), logits(theirs64))
    assert_matches_reference(logits(ours), *merged_ref, K_GPT2, "merged logits")
    unload_lora(ours, merge=True)
    conv1d = transformers.pytorch_utils.Conv1D
    assert all(type(ours.get_submodule(n)) is conv1d for n in peft_lora_layers(theirs))
    assert not any(isinstance(m, FusedLoRALinear) for m in ours.modules())
    assert_matches_reference(logits(ours), *merged_ref, K_GPT2, "unloaded logits")
    assert_matches_reference(unmerged, *merged_ref, K_GPT2, "logits before merging")


def gpt2_weight_of(model):
    return model.transformer.h[0].attn.c_attn.weight


def test_gpt2_unmerge_and_unload_without_merge_restore_the_base():
    base_logits = logits(gpt2())
    ours = inject_lora(gpt2(), GPT2_TARGETS, r=4, lora_alpha=8)
    with torch.no_grad():
        for _, m in named_lora_layers(ours):
            m.lora_B.normal_()
    w0 = gpt2_weight_of(ours).detach().clone()
    merge_lora(ours)
    assert not torch.equal(gpt2_weight_of(ours), w0)
    unload_lora(ours, merge=False)
    assert torch.allclose(gpt2_weight_of(ours), w0, atol=1e-6)
    assert torch.allclose(logits(ours), base_logits, atol=1e-5)


def test_gpt2_adapter_files_both_ways(backend, tmp_path):
    theirs = quiet_peft(peft.get_peft_model, gpt2(), peft.LoraConfig(target_modules=GPT2_TARGETS, fan_in_fan_out=True,
                                                                     r=4, lora_alpha=8, lora_dropout=0.1))
    randomise_peft(theirs)
    quiet_peft(theirs.save_pretrained, str(tmp_path / "peft"))
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["fan_in_fan_out"] is True
    # PEFT -> lora_kernels
    ours = load_adapter(gpt2(), str(tmp_path / "peft"))
    assert all(m.fan_in_fan_out for _, m in named_lora_layers(ours))
    theirs64 = copy.deepcopy(theirs.eval()).double()
    assert_matches_reference(logits(ours), logits(theirs), logits(theirs64), K_GPT2, "PEFT file in lora_kernels")
    # lora_kernels -> PEFT, and back into lora_kernels
    save_adapter(ours, str(tmp_path / "ours"))
    saved = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert saved["fan_in_fan_out"] is True
    back = quiet_peft(peft.PeftModel.from_pretrained, gpt2(), str(tmp_path / "ours"))
    assert set(peft_lora_layers(back)) == {n for n, _ in named_lora_layers(ours)}
    back64 = copy.deepcopy(back).double()
    assert_matches_reference(logits(ours), logits(back), logits(back64), K_GPT2, "our file in PEFT")
    again = load_adapter(gpt2(), str(tmp_path / "ours"))
    assert torch.equal(logits(again), logits(ours))


def test_gpt2_classifier_mixing_conv1d_and_linear_round_trips(tmp_path):
    ours = inject_lora(gpt2("GPT2ForSequenceClassification"), "all-linear", r=2)
    with torch.no_grad():
        for _, m in named_lora_layers(ours):
            m.lora_B.normal_(std=0.3)
    save_adapter(ours, str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["fan_in_fan_out"] is True  # some targets are Conv1D
    theirs = quiet_peft(peft.PeftModel.from_pretrained, gpt2("GPT2ForSequenceClassification"), str(tmp_path))
    assert set(peft_lora_layers(theirs)) == {n for n, _ in named_lora_layers(ours)}
    assert torch.allclose(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    again = load_adapter(gpt2("GPT2ForSequenceClassification"), str(tmp_path))
    assert torch.equal(logits(again), logits(ours))


def test_fan_in_fan_out_for_linear_targets_is_refused_naming_the_module(tmp_path):
    model = llama()
    snap = snapshot(model)
    cfg = LoRAConfig(target_modules=("q_proj",), fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True.*model\.layers\.0\.self_attn\.q_proj"):
        inject_lora(model, cfg)
    assert_unchanged(model, snap)
    save_adapter(inject_lora(llama(), ["q_proj"]), str(tmp_path))
    cfg_file = tmp_path / "adapter_config.json"
    json.dump(dict(json.load(open(cfg_file)), fan_in_fan_out=True), open(cfg_file, "w"))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/adapter_config.json: fan_in_fan_out=True.*q_proj"):
        load_adapter(model, str(tmp_path))
    assert_unchanged(model, snap)


def test_conv1d_layer_alone(backend):
    conv1d = transformers.pytorch_utils.Conv1D(12, 20)  # nf = out = 12, nx = in = 20
    layer = FusedLoRALinear.from_linear(conv1d, r=4, lora_alpha=8)
    assert layer.weight is conv1d.weight and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (20, 12)
    assert "fan_in_fan_out=True" in repr(layer)
    x = torch.randn(3, 5, 20)
    assert torch.allclose(layer(x), conv1d(x), atol=1e-6)
    built = FusedLoRALinear(20, 12, r=4, fan_in_fan_out=True)
    assert built.weight.shape == (20, 12)
    missing, unexpected = built.load_state_dict(conv1d.state_dict(), strict=False)
    assert sorted(missing) == ["lora_A", "lora_B"] and unexpected == []
    back = layer.to_base_module()
    assert type(back) is type(conv1d) and back.weight is conv1d.weight and (back.nf, back.nx) == (12, 20)


# ------------------------------------------------------------------------------------------------------------
# 3. modules_to_save with a head tied to the embeddings: PEFT trains an untied copy
# ------------------------------------------------------------------------------------------------------------

def test_tied_head_in_modules_to_save_trains_an_untied_copy_like_peft(backend, tmp_path):
    lcfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    theirs = quiet_peft(peft.get_peft_model, llama(tied=True), peft.LoraConfig(**lcfg))
    randomise_peft(theirs, std=0.1)
    theirs64 = copy.deepcopy(theirs).double()
    ours = inject_lora(llama(tied=True), config=LoRAConfig(**lcfg))
    copy_factors(theirs, ours)
    embed = ours.model.embed_tokens.weight
    assert ours.lm_head.weight is not embed and not embed.requires_grad and ours.lm_head.weight.requires_grad
    assert trainable_count(ours) == trainable_count(theirs)

    def train(model, steps=3):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
        return model.eval()

    embed0 = embed.detach().clone()
    for model in (ours, theirs, theirs64):
        train(model)
    assert torch.equal(embed, embed0)  # the tied original is not trained
    assert not torch.equal(ours.lm_head.weight, embed)
    assert_matches_reference(logits(ours), logits(theirs), logits(theirs64), 3 * K_LLAMA, "logits after training")

    save_adapter(ours, str(tmp_path / "ours"))
    quiet_peft(theirs.save_pretrained, str(tmp_path / "peft"))
    from safetensors import safe_open

    def keys(d):
        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(tmp_path / "ours") == keys(tmp_path / "peft")
    assert f"{PEFT_PREFIX}lm_head.weight" in keys(tmp_path / "peft")
    into_ours = load_adapter(llama(tied=True), str(tmp_path / "peft"))
    assert into_ours.lm_head.weight is not into_ours.model.embed_tokens.weight
    assert_matches_reference(logits(into_ours), logits(theirs), logits(theirs64), 3 * K_LLAMA, "PEFT file in ours")
    into_peft = quiet_peft(peft.PeftModel.from_pretrained, llama(tied=True), str(tmp_path / "ours"))
    assert torch.allclose(logits(into_peft), logits(ours), atol=1e-5, rtol=1e-5)
    assert torch.equal(into_peft.base_model.model.model.embed_tokens.weight, embed0)


def test_unload_keeps_the_trained_copy_like_peft():
    ours = inject_lora(llama(tied=True), ["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        ours.lm_head.weight.add_(1.0)
    head = ours.lm_head
    unload_lora(ours)
    assert ours.lm_head is head and not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------------------------
# 4. Files that reload to the same modules (and ranks) in both libraries
# ------------------------------------------------------------------------------------------------------------

class _Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, dtype=torch.float64)


class Nest(nn.Module):
    """fc, sub.fc, a.fc, b.a.fc: names that are suffixes of one another."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, dtype=torch.float64)
        self.sub, self.a = _Sub(), _Sub()
        self.b = nn.Module()
        self.b.a = _Sub()

    def forward(self, x):
        return self.b.a.fc(self.a.fc(self.sub.fc(self.fc(x))))


def nest():
    torch.manual_seed(0)
    return Nest()


def reloaded_sets(path):
    """({name: r} our load_adapter injects, {name: r} PEFT's from_pretrained injects) into fresh models."""
    ours = {n: m.r for n, m in named_lora_layers(load_adapter(nest(), path))}
    theirs = {n: m.r["default"] for n, m in peft_lora_layers(peft.PeftModel.from_pretrained(nest(), path)).items()}
    return ours, theirs


@pytest.mark.parametrize("inject, expected", [
    (lambda m: inject_lora(m, ["fc"], exclude_modules=["sub.fc", "a.fc"], r=2), {"fc": 2}),
    (lambda m: inject_lora(m, r"fc|b\.a\.fc", r=2), {"fc": 2, "b.a.fc": 2}),
    (lambda m: inject_lora(m, ["a.fc"], exclude_modules=["b.a.fc"], r=2), {"a.fc": 2}),
    (lambda m: inject_lora(inject_lora(m, ["sub.fc"], r=4), r"fc", r=2), {"fc": 2, "sub.fc": 4}),
    (lambda m: inject_lora(m, ["fc"], r=4, rank_pattern={"^fc": 2, "^a\\.fc": 3}),
     {"fc": 2, "sub.fc": 4, "a.fc": 3, "b.a.fc": 4}),
])
def test_both_libraries_reload_exactly_the_injected_modules(tmp_path, inject, expected):
    model = inject(nest())
    assert {n: m.r for n, m in named_lora_layers(model)} == expected
    with torch.no_grad():
        for _, m in named_lora_layers(model):
            m.lora_B.normal_()
    save_adapter(model, str(tmp_path))
    ours, theirs = reloaded_sets(str(tmp_path))
    assert ours == expected and theirs == expected
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(load_adapter(nest(), str(tmp_path))(x), model(x))


def test_plain_names_stay_a_list_when_exact(tmp_path):
    save_adapter(inject_lora(llama(), ["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["target_modules"] == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")
    assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 2 for i in range(2)}
    assert cfg["exclude_modules"] is None


def test_rank_disagreeing_with_the_config_names_the_key(tmp_path):
    save_adapter(inject_lora(nest(), ["fc"], exclude_modules=["sub.fc", "a.fc"], r=2), str(tmp_path))
    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.load(open(cfg_file))
    for change in (dict(r=4), dict(rank_pattern={"fc": 4})):
        json.dump(dict(cfg, **change), open(cfg_file, "w"))
        model = inject_lora(nest(), ["fc"], exclude_modules=["sub.fc", "a.fc"], r=2)
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"base_model\.model\.fc\.lora_A\.weight.*r=4.*r / rank_pattern.*r=2"):
            load_adapter(model, str(tmp_path))
        assert_unchanged(model, snap)
        plain = nest()  # into a plain model the config's rank decides the shapes: the tensors disagree
        snap = snapshot(plain)
        with pytest.raises(ValueError, match=r"base_model\.model\.fc\.lora_A\.weight: shape \(2, 8\).*r=4"):
            load_adapter(plain, str(tmp_path))
        assert_unchanged(plain, snap)


def test_mixed_dropout_is_refused_on_save_naming_the_layers(tmp_path):
    model = inject_lora(llama(), ["q_proj", "v_proj"], lora_dropout=0.1)
    model.model.layers[1].self_attn.v_proj.reconfigure(lora_dropout=0.0)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"lora_dropout.*model\.layers\.1\.self_attn\.v_proj.*per-layer"):
        save_adapter(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert_unchanged(model, snap)


def test_target_modules_null_takes_peft_defaults(tmp_path):
    save_adapter(inject_lora(llama(), ["q_proj", "v_proj"], r=2), str(tmp_path))
    cfg_file = tmp_path / "adapter_config.json"
    json.dump(dict(json.load(open(cfg_file)), target_modules=None), open(cfg_file, "w"))
    ours = {n for n, _ in named_lora_layers(load_adapter(llama(), str(tmp_path)))}
    theirs = set(peft_lora_layers(peft.PeftModel.from_pretrained(llama(), str(tmp_path))))
    assert ours == theirs == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"}
