"""QLoRA: LoRA layers on a frozen 4-bit NF4 base (our NF4Linear here; bitsandbytes' Linear4bit and PEFT's QLoRA
layers in test_qlora_bnb.py): wrapping, every mode, training, inject_lora, adapter files, merge policy, saved
tensors."""

import pytest
import torch
import torch.nn as nn

from lora_kernels import (FusedLoRALinear, FusedLoRALinear4bit, NF4Linear, inject_lora, load_adapter, lora_layers,
                          quantize_model, save_adapter, trainable_parameters, unload_lora)
from tests.helpers import assert_unchanged, snapshot, tiny_llama


def _nf4_layer(d_in=100, d_out=70, bias=True, dtype=torch.float32, **kw):
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    return NF4Linear.from_linear(lin, **kw)


def test_from_linear_wraps_the_4bit_layer_without_copies():
    base = _nf4_layer()
    layer = FusedLoRALinear.from_linear(base, r=4, mode="B")
    assert type(layer) is FusedLoRALinear4bit and layer.base_layer is base
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.lora_A.shape == (4, 100) and layer.lora_B.shape == (70, 4)
    x = torch.randn(7, 100)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)  # B = 0: exactly the base (up to summation)
    with pytest.raises(TypeError, match="out×in"):
        layer.out_in_weight
    with pytest.raises(TypeError, match="4-bit linear"):
        FusedLoRALinear4bit.from_linear(nn.Linear(4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["AB", "B", "A"])
def test_layer_matches_the_dense_dequantized_layer(dtype, mode):
    """Every mode: the 4-bit layer computes what a FusedLoRALinear on the dequantized W computes, gradients too."""
    base = _nf4_layer(dtype=dtype, compute_dtype=dtype)
    q_layer = FusedLoRALinear.from_linear(base, r=5, lora_alpha=10, mode=mode)
    dense = nn.Linear(100, 70).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(base.dequantize())
        dense.bias.copy_(base.bias)
    d_layer = FusedLoRALinear.from_linear(dense, r=5, lora_alpha=10, mode=mode)
    with torch.no_grad():
        for f in ("lora_A", "lora_B"):
            v = torch.randn_like(getattr(q_layer, f)) * 0.1
            getattr(q_layer, f).copy_(v)
            getattr(d_layer, f).copy_(v)
    x = torch.randn(2, 9, 100, dtype=dtype)
    xq, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    yq, yd = q_layer(xq), d_layer(xd)
    g = torch.randn_like(yq)
    yq.backward(g)
    yd.backward(g)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)  # bf16: a few ulps of O(1)
    torch.testing.assert_close(yq, yd, **tol)
    torch.testing.assert_close(xq.grad, xd.grad, **tol)
    for f in ("lora_A", "lora_B"):
        gq, gd = getattr(q_layer, f).grad, getattr(d_layer, f).grad
        assert (gq is None) == (gd is None)
        if gq is not None:
            torch.testing.assert_close(gq, gd, rtol=1e-4, atol=1e-4)


def test_b_only_saves_t_and_the_seed_only():
    layer = FusedLoRALinear.from_linear(_nf4_layer(), r=4, mode="B", lora_dropout=0.1).train()
    x = torch.randn(12, 100, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {layer.lora_A.data_ptr(), layer.lora_B.data_ptr()}
    assert sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params) == [(), (12, 4)]


@pytest.mark.parametrize("mode", ["AB", "B"])
def test_tiny_llama_trains_on_a_4bit_base(mode):
    model = tiny_llama()
    quantize_model(model)
    inject_lora(model, "all-linear", r=8, lora_alpha=16, mode=mode, lora_dropout=0.05)
    layers = lora_layers(model)
    assert len(layers) == 14 and all(type(m) is FusedLoRALinear4bit for m in layers)  # 7 projections × 2 layers
    assert type(model.lm_head) is nn.Linear  # the output head is skipped, as PEFT's "all-linear"
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = torch.randint(0, 64, (4, 1), generator=torch.Generator().manual_seed(1))
    ids = (start + torch.arange(16)) % 64  # a learnable rule: each token is the previous one plus one
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_adapter_files_round_trip_on_a_4bit_model(tmp_path):
    model = tiny_llama()
    quantize_model(model)
    inject_lora(model, "all-linear", r=4)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 64, (2, 10))
    want = model(ids).logits
    save_adapter(model, tmp_path)
    fresh = tiny_llama()
    quantize_model(fresh)
    load_adapter(fresh, tmp_path)
    assert all(type(m) is FusedLoRALinear4bit for m in lora_layers(fresh))
    assert torch.equal(fresh(ids).logits, want)


def test_merge_is_refused_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    quantize_model(model)
    inject_lora(model, "all-linear", r=4)
    snap = snapshot(model)
    layer = lora_layers(model)[0]
    with pytest.raises(RuntimeError, match="re-quantize"):
        layer.merge()
    with pytest.raises(RuntimeError, match="re-quantize"):
        unload_lora(model)  # merges by default
    assert_unchanged(model, snap)
    unload_lora(model, merge=False)
    assert type(model.model.layers[0].self_attn.q_proj) is NF4Linear


def test_dequantized_linear_carries_the_merged_adapter():
    layer = FusedLoRALinear.from_linear(_nf4_layer(), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 100)
    torch.testing.assert_close(layer.dequantized_linear(merge=True)(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantized_linear(merge=False)(x), layer.base_layer(x), rtol=1e-5, atol=1e-5)


def test_compute_dtype_casts_like_bitsandbytes():
    """x in another dtype than the base's compute dtype: cast on entry, y back in x's dtype (Linear4bit's rule)."""
    layer = FusedLoRALinear.from_linear(_nf4_layer(compute_dtype=torch.bfloat16), r=4)
    assert layer.lora_A.dtype == torch.float32  # fp32 adapters on a 16-bit compute dtype, as PEFT
    x = torch.randn(3, 100)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer.base_layer(x), rtol=0, atol=2e-2)


def test_trainable_parameters_counts_4bit_weights_by_their_logical_size():
    model = tiny_llama()
    dense_total = trainable_parameters(model).total
    quantize_model(model)
    assert trainable_parameters(model).total == dense_total  # as PEFT counts a 4-bit model
