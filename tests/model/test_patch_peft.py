"""``patch_peft`` / ``unpatch_peft``: an existing PEFT LoRA model runs on lora_linear, with PEFT's behaviour intact.

Models are built from configs with random weights (nothing downloaded): a 2-layer LLaMA (hidden 32, 2 heads,
intermediate 64, vocab 100) and a 2-layer GPT-2 (Conv1D, ``fan_in_fan_out=True``).  Every test that runs a forward
runs on both backends (kernels under the interpreter, and the PyTorch path).

Numerical bound, as ``run_and_compare`` in tests/helpers.py: the patched fp32 model's relative error against the
unpatched model in float64 is at most 2 × that of the unpatched fp32 model (PEFT's own forward) + ``error_floor``
with k the summed reduction lengths of one path through the network.
"""

import copy
import logging

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_kernels.model.peft_patch import is_peft_patched, patch_peft, unpatch_peft  # noqa: E402
from lora_kernels.ops.lora_linear import function as lora_function  # noqa: E402
from tests.helpers import error_floor, rel_err  # noqa: E402

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=32)
GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
R = 4
# One path through the LLaMA: per layer the q/k/v (hidden), attention (seq, head_dim), o (hidden), MLP (hidden,
# intermediate) reductions, then lm_head (hidden) and the softmax over the vocabulary; plus the adapter rank.
K_LLAMA = 2 * (4 * 32 + 8 + 16 + 64) + 32 + 100 + R
K_GPT2 = 2 * (3 * 32 + 8 + 16 + 4 * 32) + 32 + 100 + R


# ------------------------------------------------------------------------------------------------------------
# builders and measures
# ------------------------------------------------------------------------------------------------------------

def llama(dtype=torch.float32):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(dtype).eval()


def gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).to(dtype).eval()


def randomise_lora(model, seed=1, adapter=None):
    """Every lora_A / lora_B weight random (PEFT starts B at 0, which would make the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("lora_A." in name or "lora_B." in name) and (adapter is None or f".{adapter}." in name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return model


def peft_llama(dtype=torch.float32, targets=LLAMA_TARGETS, dropout=0.0, randomise=True, **kw):
    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=targets, lora_dropout=dropout, **kw)
    model = peft.get_peft_model(llama(dtype), cfg)
    return randomise_lora(model) if randomise else model


def peft_gpt2():
    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return randomise_lora(peft.get_peft_model(gpt2(), cfg))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def logits_and_lora_grads(model, ids=IDS):
    """Logits and {name: grad} of every trainable parameter, from the LM loss (model in train mode, dropout 0)."""
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.eval()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.logits.detach(), grads


def check_against_fp64(patched, unpatched32, ref64, k, what):
    err, base = rel_err(patched, ref64), rel_err(unpatched32, ref64)
    bound = 2 * base + error_floor(torch.float32, k)
    assert err <= bound, f"{what}: rel err {err:.3e} vs PEFT fp32 {base:.3e} (bound {bound:.3e})"


def check_parity(model, k):
    """``model`` (unpatched PEFT, fp32): patched vs unpatched logits and LoRA gradients, against float64."""
    ref64 = logits_and_lora_grads(copy.deepcopy(model).double())
    plain = logits_and_lora_grads(model)
    patch_peft(model)
    got = logits_and_lora_grads(model)
    check_against_fp64(got[0], plain[0], ref64[0], k, "logits")
    assert got[1].keys() == plain[1].keys() == ref64[1].keys()
    for name in got[1]:
        check_against_fp64(got[1][name], plain[1][name], ref64[1][name], k, name)


def lora_linears(model):
    return [(n, m) for n, m in model.named_modules() if type(m) is peft.tuners.lora.layer.Linear]


@pytest.fixture
def calls(monkeypatch):
    """Every call of the op's forward (``function.lora_fwd``): a list of the dropout_p it was called with."""
    seen = []
    real = lora_function.lora_fwd

    def spy(x2d, base, bias, lora_A, lora_B, scale, dropout_p, seed):
        seen.append(dropout_p)
        return real(x2d, base, bias, lora_A, lora_B, scale, dropout_p, seed)

    monkeypatch.setattr(lora_function, "lora_fwd", spy)
    return seen


@pytest.fixture
def patch_log(caplog):
    """The INFO lines patch_peft / unpatch_peft write to the "lora_kernels" logger."""
    caplog.set_level(logging.INFO, logger="lora_kernels")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "lora_kernels" and "patch_peft" in
                    r.getMessage()]


# ------------------------------------------------------------------------------------------------------------
# numerics: LLaMA and GPT-2 (Conv1D), forward and gradients
# ------------------------------------------------------------------------------------------------------------

def test_llama_logits_and_grads_match_peft(backend, calls):
    model = peft_llama()
    check_parity(model, K_LLAMA)
    assert len(calls) == 2 * len(LLAMA_TARGETS)  # one fused forward per LoRA layer, all on our op


def test_gpt2_conv1d_logits_and_grads_match_peft(backend, calls, monkeypatch):
    model = peft_gpt2()
    layers = lora_linears(model)
    assert len(layers) == 8 and all(m.fan_in_fan_out for _, m in layers)
    check_parity(model, K_GPT2)
    assert len(calls) == 8
    # W is passed as the transposed view of Conv1D's in×out weight: same storage, no copy.
    weights = []
    real = lora_function.lora_linear
    monkeypatch.setattr(lora_function, "lora_linear", lambda x, w, *a, **k: weights.append(w) or real(x, w, *a, **k))
    logits(model)
    for (_, m), w in zip(layers, weights):
        conv = m.base_layer
        assert w.data_ptr() == conv.weight.data_ptr() and w.shape == conv.weight.t().shape
        assert w.stride() == conv.weight.t().stride()


def test_training_matches_peft_and_saves_the_same_adapter(backend, calls, tmp_path):
    """20 AdamW steps (PEFT's init, dropout 0): the patched model's losses follow PEFT's; the adapter files that
    ``save_pretrained`` writes are PEFT's (bitwise the trained parameters, whether saved patched or not)."""
    from safetensors.torch import load_file

    def train(model, steps=20):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        losses = []
        for _ in range(steps):
            loss = model(input_ids=IDS, labels=IDS).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return model.eval(), torch.tensor(losses, dtype=torch.float64)

    ours, ours_losses = train(patch_peft(peft_llama(randomise=False)))
    theirs, their_losses = train(peft_llama(randomise=False))
    assert len(calls) == 20 * 2 * len(LLAMA_TARGETS)
    assert their_losses[-1] < 0.9 * their_losses[0]  # it trains
    assert torch.allclose(ours_losses, their_losses, rtol=1e-5, atol=0), (ours_losses - their_losses).abs().max()

    ours.save_pretrained(str(tmp_path / "patched"))
    theirs.save_pretrained(str(tmp_path / "peft"))
    unpatch_peft(ours).save_pretrained(str(tmp_path / "unpatched"))
    files = {k: load_file(str(tmp_path / k / "adapter_model.safetensors")) for k in ("patched", "unpatched", "peft")}
    assert files["patched"].keys() == files["unpatched"].keys() == files["peft"].keys()
    live = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    for key, saved in files["patched"].items():
        assert torch.equal(saved, files["unpatched"][key]), key
        live_name = key.replace(".weight", ".default.weight")
        assert torch.equal(saved, live[live_name].detach()), key
        assert saved.dtype == files["peft"][key].dtype and saved.shape == files["peft"][key].shape, key
        assert torch.allclose(saved, files["peft"][key], rtol=1e-4, atol=1e-5), key
    reloaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "patched")).eval()
    assert torch.allclose(logits(reloaded), logits(ours), rtol=1e-5, atol=1e-5)


def test_hf_trainer_on_a_patched_model(backend, calls, tmp_path):
    model = patch_peft(peft_llama(randomise=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (8, 8), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert len(calls) >= 3 * 2 * len(LLAMA_TARGETS)
    assert all(is_peft_patched(m) for _, m in lora_linears(model))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)


def test_autocast_runs_on_the_op_in_the_autocast_dtype(backend, calls):
    """Under bf16 autocast PEFT's layers all run in bf16; so do ours: against the fp32 model, the patched error is
    within 2 × PEFT's own bf16 error + the bf16 floor."""
    model = peft_llama()
    ref32 = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logits(model)
        patch_peft(model)
        got = logits(model)
    assert len(calls) == 2 * len(LLAMA_TARGETS) and got.dtype == want.dtype
    err, base = rel_err(got, ref32), rel_err(want, ref32)
    assert err <= 2 * base + error_floor(torch.bfloat16, K_LLAMA), (err, base)


# ------------------------------------------------------------------------------------------------------------
# PEFT's own switches keep working on a patched model
# ------------------------------------------------------------------------------------------------------------

def test_disable_adapter_and_adapter_layers_give_the_base_model(backend, calls):
    base_logits = logits(llama())
    model = peft_llama()
    want = logits(model)
    patch_peft(model)
    assert torch.allclose(logits(model), want, rtol=1e-5, atol=1e-5)
    n = len(calls)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    assert len(calls) == n  # nothing ran on the op while disabled
    assert torch.allclose(logits(model), want, rtol=1e-5, atol=1e-5) and len(calls) == 2 * n
    model.base_model.disable_adapter_layers()
    assert torch.equal(logits(model), base_logits) and len(calls) == 2 * n
    model.base_model.enable_adapter_layers()
    assert torch.allclose(logits(model), want, rtol=1e-5, atol=1e-5) and len(calls) == 3 * n


def test_set_adapter_switches_between_two_adapters(backend, calls):
    model = peft_llama()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise_lora(model, seed=7, adapter="other")
    want = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        want[name] = logits(model)
    model.base_model.set_adapter(["default", "other"])
    want["both"] = logits(model)
    assert not torch.allclose(want["default"], want["other"])

    patch_peft(model)
    for name, n_calls in (("other", 3 * 2), ("default", len(LLAMA_TARGETS) * 2)):
        calls.clear()
        model.set_adapter(name)
        assert torch.allclose(logits(model), want[name], rtol=1e-5, atol=1e-5), name
        assert len(calls) == n_calls, name
    # Both active: layers holding both run PEFT's forward (it sums them), the others run on the op.
    calls.clear()
    model.base_model.set_adapter(["default", "other"])
    assert torch.allclose(logits(model), want["both"], rtol=1e-5, atol=1e-5)
    assert len(calls) == (len(LLAMA_TARGETS) - 3) * 2


def test_merge_and_unload_after_patching(backend, calls):
    model = peft_llama()
    want = logits(model)
    patch_peft(model)
    model.merge_adapter()
    n = len(calls)
    assert torch.allclose(logits(model), want, rtol=1e-5, atol=1e-5) and len(calls) == n  # merged: base forward
    model.unmerge_adapter()
    assert torch.allclose(logits(model), want, rtol=1e-5, atol=1e-5) and len(calls) == n + 2 * len(LLAMA_TARGETS)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert torch.allclose(logits(merged), want, rtol=1e-5, atol=1e-5)


def test_dropout_runs_in_the_kernels_in_train_mode_only(backend, calls):
    model = patch_peft(peft_llama(dropout=0.3))
    model.train()
    outs = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(input_ids=IDS).logits)
    assert calls and all(p == pytest.approx(0.3) for p in calls)
    assert not torch.allclose(outs[0], outs[1])  # another seed, another mask
    assert torch.equal(outs[0], outs[2])  # torch.manual_seed reproduces it
    calls.clear()
    model.eval()
    a, b = logits(model), logits(model)
    assert torch.equal(a, b) and calls and all(p == 0.0 for p in calls)
    assert torch.allclose(a, logits(unpatch_peft(model)), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(backend, calls):
    """HF gradient checkpointing recomputes each layer with the RNG state restored: the same seeds, so the same
    in-kernel masks and bitwise the same gradients as without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = patch_peft(peft_llama(dropout=0.2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        grads.append(logits_and_lora_grads(model)[1])
    assert calls and all(p == pytest.approx(0.2) for p in calls)
    assert len(calls) == 3 * 2 * len(LLAMA_TARGETS)  # the checkpointed run computed each layer's forward twice
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_dropout_statistics_on_one_layer(backend):
    """A bare model holding a PEFT layer (``inject_adapter_in_model``, as TRL builds): with A = B = I and s = 1 the
    LoRA term is dropout(x) itself: kept entries are x / (1-p), and the kept fraction is 1-p."""
    p, n, d = 0.3, 512, 8
    holder = nn.Sequential()
    holder.add_module("lin", nn.Linear(d, d))
    holder = peft.inject_adapter_in_model(
        peft.LoraConfig(r=d, lora_alpha=d, target_modules=["lin"], lora_dropout=p), holder)
    layer = holder.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(d))
        layer.lora_B["default"].weight.copy_(torch.eye(d))
    patch_peft(holder)
    assert is_peft_patched(layer)
    x = torch.randn(n, d) + 3.0  # away from 0, so a kept entry is never mistaken for a dropped one
    holder.train()
    with torch.no_grad():
        term = holder(x) - layer.base_layer(x)
    kept = term.abs() > 1e-3
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * ((p * (1 - p)) / (n * d)) ** 0.5, frac
    assert torch.allclose(term[kept], (x / (1 - p))[kept], rtol=1e-5, atol=1e-5)
    holder.eval()
    with torch.no_grad():
        assert torch.allclose(holder(x) - layer.base_layer(x), x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# what is patched, what is not, the log line, idempotence, unpatch
# ------------------------------------------------------------------------------------------------------------

def test_unsupported_layers_keep_peft_forward_and_are_reported(backend, calls, patch_log):
    model = peft_llama(targets=["q_proj", "v_proj", "embed_tokens"])
    model.add_adapter("dora", peft.LoraConfig(r=R, target_modules=["o_proj"], use_dora=True))
    model.add_adapter("dq", peft.LoraConfig(r=R, target_modules=["q_proj"], use_dora=True))
    randomise_lora(model, seed=3, adapter="dora")
    randomise_lora(model, seed=4, adapter="dq")
    want = {}
    for name in ("default", "dora", "dq"):
        model.set_adapter(name)
        want[name] = logits(model)
    model.set_adapter("default")

    patch_peft(model)
    (line,) = patch_log()
    assert "patched 4 LoRA layers (4 × Linear base" in line, line
    assert "kept PEFT's forward for 3" in line, line
    assert "2 × LoRA variant (Dora)" in line and "1 × Embedding layer" in line, line
    assert "adapter 'dq': LoRA variant (Dora)" in line, line
    for name, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            patched = name.endswith(("q_proj", "v_proj"))
            assert is_peft_patched(m) == patched, name
            if not patched:
                assert "forward" not in m.__dict__ and m.forward.__func__ is type(m).forward, name
    for name, n_calls in (("default", 4), ("dora", 0), ("dq", 0)):
        calls.clear()
        model.set_adapter(name)
        assert torch.allclose(logits(model), want[name], rtol=1e-5, atol=1e-5), name
        assert len(calls) == n_calls, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_adapters_on_a_16_bit_base_run_on_the_op_and_match_peft(backend, calls, patch_log, dtype):
    """PEFT's default (autocast_adapter_dtype=True) keeps lora_A / lora_B in fp32 on a 16-bit base; lora_linear takes
    them as they are (the LoRA branch in fp32, as PEFT's forward).  Logits and the fp32 LoRA gradients against the
    float64 model: within 2 × PEFT's own error + the 16-bit floor (the gradients flow through a 16-bit network)."""
    model = peft_llama(dtype=dtype, targets=["q_proj", "v_proj"])
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ref64 = logits_and_lora_grads(copy.deepcopy(model).double())
    plain = logits_and_lora_grads(model)
    patch_peft(model)
    (line,) = patch_log()
    assert "patched 4 LoRA layers" in line and "adapter dtype" not in line and "falling back" not in line, line
    calls.clear()
    got = logits_and_lora_grads(model)
    assert len(calls) == 4 and got[0].dtype == plain[0].dtype == dtype
    assert got[1].keys() == plain[1].keys() and all(g.dtype == torch.float32 for g in got[1].values())
    for what, o, theirs, r64 in [("logits", got[0], plain[0], ref64[0])] + [
            (n, got[1][n], plain[1][n], ref64[1][n]) for n in got[1]]:
        err, base = rel_err(o, r64), rel_err(theirs, r64)
        bound = 2 * base + error_floor(dtype, K_LLAMA)
        assert err <= bound, f"{what}: rel err {err:.3e} vs PEFT {base:.3e} (bound {bound:.3e})"


def test_patch_is_idempotent_and_unpatch_restores_everything(backend, patch_log):
    model = peft_llama(targets=["q_proj", "v_proj", "embed_tokens"])
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict().keys())
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    before = [m.forward.__func__ for m in layers]
    hooked = model.base_model.model.model.layers[1].self_attn.v_proj
    hooked.forward = own = (lambda x, *a, **k: type(hooked).forward(hooked, x, *a, **k))  # e.g. an accelerate hook
    want = logits(model)

    patch_peft(model)
    first = {id(m): m.__dict__.get("forward") for m in layers}
    assert sum(is_peft_patched(m) for m in layers) == 3
    assert "forward already overridden on the instance" in patch_log()[0]
    patch_peft(model)
    assert "already patched (3 layers" in patch_log()[1] and "nothing to do" in patch_log()[1]
    assert all(m.__dict__.get("forward") is first[id(m)] for m in layers)  # the same objects: a no-op
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict().keys()) == keys
    assert torch.allclose(logits(model), want, rtol=1e-5, atol=1e-5)

    assert unpatch_peft(model) is model
    assert not any(is_peft_patched(m) for m in layers)
    assert hooked.forward is own
    for m, f in zip(layers, before):
        if m is not hooked:
            assert "forward" not in m.__dict__ and m.forward.__func__ is f is type(m).forward
    assert torch.equal(logits(model), want)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict().keys()) == keys


def test_a_model_without_peft_layers_is_left_alone(patch_log):
    model = llama()
    assert patch_peft(model) is model
    assert "no PEFT LoRA layer found" in patch_log()[0]
    with pytest.raises(TypeError, match="nn.Module"):
        patch_peft("not a model")
