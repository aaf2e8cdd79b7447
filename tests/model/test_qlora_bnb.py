"""QLoRA interop with bitsandbytes and PEFT (skipped without bitsandbytes): our layers on a bitsandbytes 4-bit model,
adapter files both ways with PEFT's QLoRA layers, and ``patch_peft`` on PEFT's ``lora.Linear4bit``."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from lora_kernels import (FusedLoRALinear, FusedLoRALinear4bit, inject_lora, is_peft_patched, load_adapter,
                          lora_layers, patch_peft, save_adapter)
from tests.helpers import assert_matches_reference, bnb_linear4bit, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def bnb_llama(dtype=torch.float32):
    """tiny_llama with every in_features a multiple of the blocksize: bitsandbytes 0.50's native CPU dequantization
    indexes the block scales per row, which disagrees with its own quantizer (and its CUDA and pure-PyTorch
    kernels, and ours) when the flat blocks straddle rows (``test_bnb_cpu_kernel_differs_across_rows``)."""
    return tiny_llama(dtype=dtype, intermediate=128)


def bnb_quantize(model, compute_dtype=torch.float32, double_quant=True):
    """Replace every nn.Linear but lm_head by a bitsandbytes NF4 Linear4bit (``bnb_linear4bit``), and mark the model
    as from_pretrained(quantization_config=...) does, which PEFT's QLoRA dispatch reads."""
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or name.endswith("lm_head"):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                bnb_linear4bit(m.weight, m.bias, double_quant=double_quant, compute_dtype=compute_dtype))
    model.is_loaded_in_4bit = True
    return model


def _peft_qlora(model, r=4):
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("double_quant", [True, False])
def test_our_layers_on_a_bitsandbytes_model(double_quant):
    model = bnb_quantize(bnb_llama(), double_quant=double_quant)
    want = model(IDS).logits
    inject_lora(model, "all-linear", r=4, mode="B")
    layers = lora_layers(model)
    assert len(layers) == 14 and all(type(m) is FusedLoRALinear4bit for m in layers)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-4, atol=1e-4)  # B = 0: the base model


def test_peft_qlora_adapter_loads_into_ours_and_back(tmp_path):
    base = bnb_quantize(bnb_llama())
    theirs = _peft_qlora(copy.deepcopy(base)).train()
    assert any(type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A") for m in theirs.modules())
    want = theirs(IDS).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "peft")
    assert all(type(m) is FusedLoRALinear4bit for m in lora_layers(ours))
    torch.testing.assert_close(ours(IDS).logits, want, rtol=1e-4, atol=1e-4)
    save_adapter(ours, tmp_path / "ours")
    # Train mode before the first forward: in eval mode bitsandbytes may repack its codes for its CPU kernel (scales
    # rounded to bf16), which would change PEFT's own logits, not ours.
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").train()
    torch.testing.assert_close(back(IDS).logits, want, rtol=1e-4, atol=1e-4)


def _loss_and_grads(model):
    out = model(IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.logits.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_peft_serves_peft_qlora_layers(dtype):
    """Patched PEFT QLoRA layers (model and compute dtype ``dtype``, fp32 adapters as PEFT's default) against PEFT's
    own forward, logits and LoRA gradients.  fp32: summation order only.  bf16: both judged against the same model
    in fp32 (the same codes and adapters), ours within 2 × PEFT's own error + ``error_floor`` (PEFT rounds the LoRA
    term to bf16 before adding it, the op rounds once; under the interpreter its bf16 stores truncate)."""
    model = _peft_qlora(bnb_quantize(bnb_llama(dtype=dtype), compute_dtype=dtype)).train()
    want, want_grads = _loss_and_grads(model)
    patch_peft(model)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert len(layers) == 14 and all(is_peft_patched(m) for m in layers)
    calls = []
    with _counting_lora_linear(calls):
        got, got_grads = _loss_and_grads(model)
    assert len(calls) == 14, "every layer must take the fast path"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for n, g in got_grads.items():
            torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-4)
        return
    # The bf16 weights in fp32: bitsandbytes quantizes in fp32, so the codes and scales are the bf16 model's.
    ref_model = _peft_qlora(bnb_quantize(bnb_llama(dtype=dtype).float(), compute_dtype=torch.float32)).train()
    with torch.no_grad():
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for n, p in ref_model.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    ref, ref_grads = _loss_and_grads(ref_model)
    k = 64 + 128 + 4  # the longest reduction on a layer's path: in + out + r
    assert_matches_reference(got, want, ref, k, "logits")
    # All LoRA gradients as one vector: per tensor, the first layers' gradients pass back through two bf16 attention
    # blocks, where two different bf16 roundings of the same network differ by 3-8% on small tensors either way.
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(grads)])  # noqa: E731
    assert_matches_reference(flat(got_grads), flat(want_grads), flat(ref_grads), k, "LoRA gradients")


def test_patch_peft_leaves_a_wider_x_to_peft():
    """fp32 hidden states on a bf16 compute dtype (prepare_model_for_kbit_training's setup): PEFT runs the LoRA
    branch on the fp32 x, which the op cannot; the patched layer runs PEFT's forward, so the outputs are PEFT's."""
    model = _peft_qlora(bnb_quantize(bnb_llama(), compute_dtype=torch.bfloat16)).train()
    want, _ = _loss_and_grads(model)
    patch_peft(model)
    calls = []
    with _counting_lora_linear(calls):
        got, _ = _loss_and_grads(model)
    assert not calls and torch.equal(got, want)


@contextlib.contextmanager
def _counting_lora_linear(calls):
    from lora_kernels.ops.lora_linear import function

    real = function.lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    function.lora_linear = counting
    try:
        yield
    finally:
        function.lora_linear = real


def test_from_linear_accepts_a_bitsandbytes_layer_and_reads_it_in_place():
    lin = bnb_quantize(nn.Sequential(nn.Linear(96, 40)))[0]
    layer = FusedLoRALinear.from_linear(lin, r=4)
    assert type(layer) is FusedLoRALinear4bit and layer.nf4().packed.data_ptr() == lin.weight.data_ptr()


def test_bnb_cpu_kernel_differs_across_rows():
    """Why bnb_llama avoids in = 96: with blocks straddling rows, our reading equals bitsandbytes' flat reference
    kernel bit for bit and reconstructs W within NF4's error, while its native CPU kernel does not."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise

    from lora_kernels.quant import dequantize_nf4_ref, nf4_from_bnb

    lin = nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 0, 64)[:, None])  # rows of different scales: a wrong block shows
    q = bnb_quantize(nn.Sequential(copy.deepcopy(lin)))[0]
    st = q.weight.quant_state
    scales = dequantize_blockwise(st.absmax, st.state2) + st.offset
    flat = _dequantize_4bit_compute(q.weight.data.reshape(-1), scales, st.code, 64, st.shape, torch.float32)
    ours = dequantize_nf4_ref(nf4_from_bnb(q), torch.float32)
    assert torch.equal(ours, flat)
    rel = lambda w: ((w - lin.weight).norm() / lin.weight.norm()).item()  # noqa: E731
    assert rel(ours) < 0.15 < rel(dequantize_4bit(q.weight.data, st))


def test_trainable_parameters_counts_bitsandbytes_weights_by_their_logical_size():
    from lora_kernels import trainable_parameters

    model = bnb_llama()
    dense_total = trainable_parameters(model).total
    assert trainable_parameters(bnb_quantize(model)).total == dense_total


def test_fp4_layers_work_through_their_code_table():
    """bitsandbytes' FP4 codes: the same layout with another 16-entry table, which the kernels read from the layer."""
    lin = nn.Linear(128, 48)
    q = bnb_linear4bit(lin.weight, lin.bias, quant_type="fp4", compute_dtype=torch.float32)
    layer = FusedLoRALinear.from_linear(q, r=4)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(5, 128)
    want = q(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
