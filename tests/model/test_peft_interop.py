"""Adapter files both ways with PEFT, on a 2-layer LLaMA built from a config with random weights (nothing downloaded).

lora_kernels → PEFT: inject, train a few steps (through the kernels, interpreted in CI), save_adapter, then
``peft.PeftModel.from_pretrained`` on a fresh copy of the same base gives the same logits.  PEFT → lora_kernels:
``get_peft_model`` + a few training steps + ``save_pretrained``, then ``load_adapter`` into a fresh plain base.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_kernels import inject_lora, load_adapter, save_adapter  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def base():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()


def train(model, steps=3, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        out = model(input_ids=IDS, labels=IDS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("rslora, rank_pattern", [(False, None), (True, {"q_proj": 2})])
def test_lora_kernels_adapter_loads_in_peft(tmp_path, rslora, rank_pattern):
    ours = train(inject_lora(base(), r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=rslora,
                             rank_pattern=rank_pattern))
    save_adapter(ours, str(tmp_path), base_model_name_or_path="tiny-llama")
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    a, b = logits(ours), logits(theirs)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_peft_adapter_loads_in_lora_kernels(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    theirs = train(peft.get_peft_model(base(), cfg))
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(base(), str(tmp_path), is_trainable=True)
    a, b = logits(theirs), logits(ours)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad)
    frozen = load_adapter(base(), str(tmp_path))  # for inference, as PeftModel.from_pretrained
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
