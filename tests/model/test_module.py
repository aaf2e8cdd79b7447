"""FusedLoRALinear: drop-in for nn.Linear, modes, inits, merge, and a short fine-tune."""

import math

import pytest
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear, lora_linear_ref
from tests.helpers import rel_err, standalone_bound


def test_from_linear_shares_weight_and_loads_linear_checkpoint(backend):
    lin = nn.Linear(20, 12)
    m = FusedLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    # Fresh adapter (B = 0) leaves the layer's output unchanged.
    x = torch.randn(3, 5, 20)
    assert torch.allclose(m(x), lin(x), atol=1e-6)
    # An nn.Linear checkpoint loads into the fused layer under the same names.
    other = nn.Linear(20, 12)
    fresh = FusedLoRALinear(20, 12, r=4)
    missing, unexpected = fresh.load_state_dict(other.state_dict(), strict=False)
    assert sorted(missing) == ["lora_A", "lora_B"] and unexpected == []
    assert torch.equal(fresh.weight, other.weight)
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


@pytest.mark.parametrize("mode, a_grad, b_grad", [("AB", True, True), ("B", False, True), ("A", True, False)])
def test_modes_and_initial_identity(backend, mode, a_grad, b_grad):
    m = FusedLoRALinear(16, 10, r=4, mode=mode)
    assert m.lora_A.requires_grad == a_grad and m.lora_B.requires_grad == b_grad
    assert (m.lora_B == 0).all() if mode != "A" else (m.lora_A == 0).all()
    trained_random = m.lora_B if mode == "A" else m.lora_A
    assert trained_random.abs().sum() > 0
    x = torch.randn(7, 16)
    assert torch.allclose(m(x), nn.functional.linear(x, m.weight, m.bias), atol=1e-6)
    m(x).pow(2).sum().backward()
    assert (m.lora_A.grad is not None) == a_grad and (m.lora_B.grad is not None) == b_grad
    # The factor paired with the zero one gets a non-zero gradient at init.  In AB mode A's gradient is exactly
    # zero at init (dA = s·(gB)ᵀx with B = 0), as in every LoRA.
    moving = m.lora_A if mode == "A" else m.lora_B
    assert moving.grad.abs().sum() > 0
    if mode == "AB":
        assert (m.lora_A.grad == 0).all()
    assert m.weight.grad is None


def test_inits():
    torch.manual_seed(1)
    orth = FusedLoRALinear(64, 32, r=8, init_A="orthogonal").lora_A
    assert torch.allclose(orth @ orth.t(), torch.eye(8), atol=1e-5)
    gauss = FusedLoRALinear(512, 32, r=16, init_A="gaussian").lora_A
    assert abs(gauss.std().item() - 1 / 16) < 0.1 / 16
    kaim = FusedLoRALinear(100, 32, r=8, init_A="kaiming").lora_A
    assert kaim.abs().max().item() <= 1 / math.sqrt(100) + 1e-6  # kaiming_uniform(a=√5) bound = 1/√fan_in


def test_scaling_and_rslora():
    assert FusedLoRALinear(8, 8, r=4, lora_alpha=16).scaling == 4.0
    assert FusedLoRALinear(8, 8, r=4, lora_alpha=16, use_rslora=True).scaling == 8.0


@pytest.mark.parametrize("mode", ["AB", "B", "A"])
def test_forward_matches_reference_and_merge_roundtrip(backend, mode):
    m = FusedLoRALinear(24, 18, r=6, lora_alpha=12, mode=mode)
    with torch.no_grad():
        m.lora_A.normal_()
        m.lora_B.normal_()
    m.eval()
    x = torch.randn(2, 9, 24)
    ref = lora_linear_ref(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, upcast=True)
    y = m(x)
    bound = standalone_bound(torch.float32, 24 + 18 + 6)  # fp32 vs float64, reductions over in, out and r
    assert rel_err(y, ref) <= bound
    w0 = m.weight.detach().clone()
    m.merge()
    assert m.merged
    assert rel_err(m(x), ref) <= bound
    m.unmerge()
    assert not m.merged and torch.allclose(m.weight, w0, atol=1e-6)
    assert torch.allclose(m(x), y, atol=1e-6)


def test_dropout_only_in_training(backend):
    m = FusedLoRALinear(32, 16, r=4, lora_dropout=0.5)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(10, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_extra_repr():
    s = repr(FusedLoRALinear(8, 4, r=2, lora_alpha=16, lora_dropout=0.1, mode="B"))
    for part in ("r=2", "lora_alpha=16", "mode='B'", "lora_dropout=0.1"):
        assert part in s


@pytest.mark.parametrize("kwargs, word", [
    (dict(r=0), "r must"), (dict(r=2.5), "r must"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(mode="BA"), "mode"), (dict(init_A="xavier"), "init_A"), (dict(lora_alpha=float("inf")), "lora_alpha"),
])
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FusedLoRALinear(8, 4, **kwargs)
    with pytest.raises(ValueError, match=word):
        FusedLoRALinear.from_linear(nn.Linear(8, 4), **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("mode", ["AB", "B", "A"])
def test_short_finetune_reduces_loss(backend, mode):
    """A frozen base plus an adapter learns a reachable rank-r target: the loss must drop well below its start.

    With one factor frozen, only targets in its span are reachable (B-only: ΔW = B·A_frozen), so the target is
    drawn there; in AB mode it is an arbitrary rank-r matrix.
    """
    torch.manual_seed(3)
    d_in, d_out, r = 24, 16, 4
    base = nn.Linear(d_in, d_out)
    m = FusedLoRALinear.from_linear(base, r=r, lora_alpha=r, mode=mode, lora_dropout=0.05)
    b_t = m.lora_B.detach() if mode == "A" else torch.randn(d_out, r)
    a_t = m.lora_A.detach() if mode == "B" else torch.randn(r, d_in) / d_in**0.5
    target_delta = b_t @ a_t
    x = torch.randn(256, d_in)
    y_true = base(x).detach() + x @ target_delta.t()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (m(x) - y_true).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"{mode}: {losses[0]:.4f} -> {losses[-1]:.4f}"
