"""Model surgery, adapter files, checkpointing, DDP / FSDP2 on 2 gloo processes, and trainers.

Most models here are float64 (the PyTorch path: exact comparisons, fast under the interpreter); the PEFT interop
and Trainer tests run fp32 through the kernels (interpreted in CI).
"""

import copy
import json
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from lora_kernels import (FusedLoRALinear, inject_lora, load_adapter, merge_lora, save_adapter, trainable_parameters,
                          unload_lora, unmerge_lora)
from tests.helpers import IDX, randomise_adapters, tiny

DT = torch.float64


# ------------------------------------------------------------------------------------------------------------
# Surgery
# ------------------------------------------------------------------------------------------------------------

def test_all_linear_skips_head_shares_weights_and_freezes():
    m = tiny()
    w = m.blocks[0]["q_proj"].weight
    y0 = m(IDX)
    inject_lora(m, r=4, lora_alpha=8)
    names = sorted(n for n, x in m.named_modules() if isinstance(x, FusedLoRALinear))
    assert len(names) == 8 and not any("lm_head" in n for n in names)
    assert m.blocks[0]["q_proj"].weight is w
    assert torch.allclose(m(IDX), y0)  # B = 0 at init
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in names for f in ("lora_A", "lora_B")}
    s = trainable_parameters(m)
    assert s.trainable == sum(4 * (x.in_features + x.out_features) for x in m.modules() if isinstance(x, FusedLoRALinear))
    assert "trainable%" in str(s) and 0 < s.percent < 100


def test_suffix_regex_exclude_patterns_and_modules_to_save():
    m = inject_lora(tiny(), ["q_proj", "blocks.1.up_proj"], r=2, rank_pattern={"q_proj": 6}, alpha_pattern={"up_proj": 3},
                    exclude_modules=["blocks.1.q_proj"], modules_to_save=["lm_head"], mode="B")
    lora = {n: x for n, x in m.named_modules() if isinstance(x, FusedLoRALinear)}
    assert set(lora) == {"blocks.0.q_proj", "blocks.1.up_proj"}
    assert lora["blocks.0.q_proj"].r == 6 and lora["blocks.1.up_proj"].lora_alpha == 3
    assert not lora["blocks.0.q_proj"].lora_A.requires_grad and lora["blocks.0.q_proj"].lora_B.requires_grad
    assert m.lm_head.weight.requires_grad and not m.embed.weight.requires_grad
    m2 = inject_lora(tiny(), r"blocks\.\d+\.(v|down)_proj")
    assert {n for n, x in m2.named_modules() if isinstance(x, FusedLoRALinear)} == {
        "blocks.0.v_proj", "blocks.0.down_proj", "blocks.1.v_proj", "blocks.1.down_proj"}


def test_matching_nothing_lists_available_names():
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*q_proj"):
        inject_lora(tiny(), ["attn.c_attn"])
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_lora(tiny(), ["q_proj"], modules_to_save=["classifier"])
    with pytest.raises(TypeError, match="target_modules"):
        inject_lora(tiny(), 3)


def test_merge_unmerge_unload():
    m = inject_lora(tiny(), r=4)
    randomise_adapters(m)
    y = m(IDX)
    merge_lora(m)
    assert torch.allclose(m(IDX), y, atol=1e-12)
    unmerge_lora(m)
    assert torch.allclose(m(IDX), y, atol=1e-12)
    base = copy.deepcopy(m)
    unload_lora(m, merge=True)
    assert not any(isinstance(x, FusedLoRALinear) for x in m.modules())
    assert isinstance(m.blocks[0]["q_proj"], nn.Linear) and torch.allclose(m(IDX), y, atol=1e-12)
    unload_lora(base, merge=False)
    assert torch.allclose(base(IDX), tiny()(IDX), atol=1e-12)  # the original model back


# ------------------------------------------------------------------------------------------------------------
# Adapter files (own round trip and error messages; PEFT interop is in test_peft_interop.py)
# ------------------------------------------------------------------------------------------------------------

def test_save_load_roundtrip_into_plain_and_injected_models(tmp_path):
    m = inject_lora(tiny(), r=4, lora_alpha=8, rank_pattern={"up_proj": 2}, modules_to_save=["lm_head"], mode="B")
    randomise_adapters(m)
    with torch.no_grad():
        m.lm_head.weight.add_(0.5)
    y = m(IDX)
    save_adapter(m, str(tmp_path), base_model_name_or_path="tiny")
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["rank_pattern"] == {
        "blocks.0.up_proj": 2, "blocks.1.up_proj": 2}
    plain = load_adapter(tiny(), str(tmp_path), is_trainable=True)
    assert torch.allclose(plain(IDX), y, atol=1e-12)
    q = plain.blocks[0]["q_proj"]
    assert q.mode == "B" and q.lora_B.requires_grad and not q.lora_A.requires_grad  # mode B from the file's metadata
    assert plain.lm_head.weight.requires_grad  # the saved module's copy trains
    injected = load_adapter(inject_lora(tiny(), r=4, rank_pattern={"up_proj": 2}, modules_to_save=["lm_head"]),
                            str(tmp_path))
    assert torch.allclose(injected(IDX), y, atol=1e-12)


def _saved(tmp_path):
    m = inject_lora(tiny(), r=4)
    randomise_adapters(m)
    save_adapter(m, str(tmp_path))
    return tmp_path


def _edit_tensors(path, fn):
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "adapter_model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


@pytest.mark.parametrize("corruption, exc, word", [
    (lambda sd: sd.pop("base_model.model.blocks.0.q_proj.lora_A.weight"), KeyError, "blocks.0.q_proj.lora_A"),
    (lambda sd: sd.update({"base_model.model.blocks.1.v_proj.lora_B.weight": torch.zeros(16, 3, dtype=DT)}),
     ValueError, r"blocks.1.v_proj.lora_B.*\(16, 3\)"),
    (lambda sd: sd.update({"base_model.model.blocks.0.q_proj.lora_A.weight": torch.zeros(5, 16, dtype=DT)}),
     ValueError, r"blocks.0.q_proj.lora_A.*wrong rank"),
    (lambda sd: sd.update({"base_model.model.blocks.7.q_proj.lora_A.weight": torch.zeros(4, 16, dtype=DT)}),
     ValueError, "blocks.7.q_proj"),
    (lambda sd: sd.update({"base_model.model.blocks.0.q_proj.lora_B.weight": torch.full((16, 4), float("nan"),
                                                                                        dtype=DT)}),
     ValueError, "NaN"),
])
def test_corrupted_adapter_names_the_key_and_changes_nothing(tmp_path, corruption, exc, word):
    path = _saved(tmp_path)
    _edit_tensors(path, corruption)
    target = inject_lora(tiny(), r=4)
    snap = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(exc, match=word):
        load_adapter(target, str(path))
    assert all(torch.equal(v, snap[k]) for k, v in target.state_dict().items())


def test_adapter_config_and_pickle_refused(tmp_path):
    path = _saved(tmp_path)
    cfg = json.load(open(path / "adapter_config.json"))
    for key, value, word in (("use_dora", True, "use_dora"), ("peft_type", "IA3", "peft_type"), ("bias", "all", "bias")):
        bad = dict(cfg, **{key: value})
        json.dump(bad, open(path / "adapter_config.json", "w"))
        with pytest.raises(ValueError, match=word):
            load_adapter(tiny(), str(path))
    json.dump(cfg, open(path / "adapter_config.json", "w"))
    os.remove(path / "adapter_model.safetensors")
    (path / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors only"):
        load_adapter(tiny(), str(path))


# ------------------------------------------------------------------------------------------------------------
# Activation checkpointing: same gradients, dropout mask regenerated identically on recompute
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_same_gradients_with_dropout(backend, reentrant):
    dt = torch.float32
    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 16, r=4, lora_dropout=0.3, dtype=dt)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24, dtype=dt, requires_grad=True)

    def run(ckpt):
        for p in (x, layer.lora_A, layer.lora_B):
            p.grad = None
        torch.manual_seed(7)
        if ckpt:
            y = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(layer(t)), x, use_reentrant=reentrant)
        else:
            y = torch.tanh(layer(x))
        y.sum().backward()
        return [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]

    plain, ck = run(False), run(True)
    for a, b in zip(plain, ck):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# DDP and FSDP2 on 2 CPU processes (gloo) against one process on the same global batch
# ------------------------------------------------------------------------------------------------------------

def _global_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 50, (8, 7), generator=g), torch.randint(0, 50, (8, 7), generator=g)


def _step(model, idx, tgt, opt):
    logits = model(idx)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 50), tgt.reshape(-1))
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return grads


def _dist_worker(rank, world, init_file, out_dir, kind):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = inject_lora(tiny(), r=4)
        randomise_adapters(model)
        idx, tgt = _global_batch()
        mine = slice(rank * 4, rank * 4 + 4)
        if kind == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for blk in model.blocks:  # shard every fused LoRA layer, then the root
                for layer in blk.values():
                    fully_shard(layer)
            wrapped = fully_shard(model)
        opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
        grads = _step(wrapped, idx[mine], tgt[mine], opt)
        if kind == "fsdp2":
            grads = {n: g.full_tensor() for n, g in grads.items()}
            state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        else:
            state = model.state_dict()
        state = {k.replace("module.", ""): v.detach().clone() for k, v in state.items() if "lora_" in k}
        grads = {k.replace("module.", ""): v for k, v in grads.items()}
        torch.save({"grads": grads, "state": state}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_process_training_matches_single_process(kind):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), tmp, kind), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    single = inject_lora(tiny(), r=4)
    randomise_adapters(single)
    idx, tgt = _global_batch()
    opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.5)
    grads = _step(single, idx, tgt, opt)
    state = {k: v for k, v in single.state_dict().items() if "lora_" in k}
    for res in results:
        for n, g in grads.items():
            assert torch.allclose(res["grads"][n], g, atol=1e-12, rtol=1e-10), f"{kind} grad {n}"
        for k, v in state.items():
            assert torch.allclose(res["state"][k], v, atol=1e-12, rtol=1e-10), f"{kind} weight {k}"


# ------------------------------------------------------------------------------------------------------------
# Trainers: a plain loop and Hugging Face Trainer (tiny LLaMA from a config, random weights, nothing downloaded)
# ------------------------------------------------------------------------------------------------------------

def test_plain_training_loop_reduces_loss():
    m = inject_lora(tiny(), r=4, lora_alpha=8)
    idx, tgt = _global_batch()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(m(idx).reshape(-1, 50), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_hf_trainer_runs_and_loss_decreases(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    inject_lora(model, r=4, lora_alpha=16)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.arange(i, i + 12) % 64 for i in torch.randint(0, 64, (32,), generator=g).tolist()]
    data = [{"input_ids": s, "labels": s} for s in seqs]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                          learning_rate=2e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 10 and min(losses[-3:]) < 0.95 * losses[0]


# ------------------------------------------------------------------------------------------------------------
# Regressions from the review of the surgery / adapter code
# ------------------------------------------------------------------------------------------------------------

def test_failed_load_leaves_a_plain_model_plain(tmp_path):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda sd: sd.pop("base_model.model.blocks.0.q_proj.lora_A.weight"))
    plain = tiny()
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    with pytest.raises(KeyError):
        load_adapter(plain, str(path))
    assert not any(isinstance(x, FusedLoRALinear) for x in plain.modules())
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    assert torch.allclose(plain(IDX), tiny()(IDX))


def test_load_into_merged_model_then_unmerge_restores_base(tmp_path):
    path = _saved(tmp_path)
    m = inject_lora(tiny(), r=4)
    randomise_adapters(m, seed=5)
    merge_lora(m)
    load_adapter(m, str(path))
    unmerge_lora(m)
    unload_lora(m, merge=False)
    assert torch.allclose(m(IDX), tiny()(IDX), atol=1e-12)


def test_init_variants_that_change_the_base_and_bad_mode_are_refused(tmp_path):
    path = _saved(tmp_path)
    cfg = json.load(open(path / "adapter_config.json"))
    for key, value in (("init_lora_weights", "pissa"), ("init_lora_weights", "olora"),
                       ("alora_invocation_tokens", [1, 2])):
        json.dump(dict(cfg, **{key: value}), open(path / "adapter_config.json", "w"))
        with pytest.raises(ValueError, match=key):
            load_adapter(tiny(), str(path))
    json.dump(cfg, open(path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="mode"):
        load_adapter(tiny(), str(path), mode="BA")


def test_tied_head_in_modules_to_save_trains_an_untied_copy_and_round_trips(tmp_path):
    """PEFT's rule: the saved module is a trainable copy; the tied original stays frozen and tied to the embeddings."""
    m = tiny()
    m.lm_head.weight = m.embed.weight  # tied, as in many LMs
    original, embed = m.lm_head, m.embed.weight.detach().clone()
    inject_lora(m, ["q_proj"], r=2, modules_to_save=["lm_head"])
    assert m.lm_head is not original and original.weight is m.embed.weight
    assert m.lm_head.weight is not m.embed.weight and torch.equal(m.lm_head.weight, m.embed.weight)
    assert m.lm_head.weight.requires_grad and not m.embed.weight.requires_grad
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        m(IDX).pow(2).mean().backward()
        opt.step()
    assert torch.equal(m.embed.weight, embed) and not torch.equal(m.lm_head.weight, embed)
    save_adapter(m, str(tmp_path))
    other = tiny()
    other.lm_head.weight = other.embed.weight
    load_adapter(other, str(tmp_path))
    assert torch.allclose(other(IDX), m(IDX), atol=1e-12)
    assert torch.equal(other.embed.weight, embed) and other.lm_head.weight is not other.embed.weight


def test_targets_inside_modules_to_save_are_not_injected():
    m = inject_lora(tiny(), ["q_proj", "down_proj"], modules_to_save=["blocks.1"])
    lora = {n for n, x in m.named_modules() if isinstance(x, FusedLoRALinear)}
    assert lora == {"blocks.0.q_proj", "blocks.0.down_proj"}


def test_linear_subclasses_are_skipped_and_all_linear_is_case_insensitive():
    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    m = tiny()
    m.blocks[0]["q_proj"] = Doubling(16, 16, dtype=DT)
    y = m(IDX)
    with pytest.warns(UserWarning, match="subclasses"):
        inject_lora(m, "ALL-LINEAR")
    assert type(m.blocks[0]["q_proj"]) is Doubling and torch.allclose(m(IDX), y)
    with pytest.raises(TypeError, match="subclass"):
        FusedLoRALinear.from_linear(Doubling(4, 4))


def test_second_inject_keeps_first_adapters_trainable():
    m = inject_lora(tiny(), ["q_proj"], r=2, modules_to_save=["lm_head"])
    inject_lora(m, ["v_proj"], r=2)
    assert m.blocks[0]["q_proj"].lora_B.requires_grad and m.blocks[0]["v_proj"].lora_B.requires_grad
    assert m.lm_head.weight.requires_grad
