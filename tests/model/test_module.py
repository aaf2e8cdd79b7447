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


# ------------------------------------------------------------------------------------------------------------
# Mode "B": the frozen A defaults to orthonormal rows (σ = 1), as the asymmetry paper's
# ------------------------------------------------------------------------------------------------------------

def test_mode_B_defaults_to_orthogonal_A_other_modes_to_kaiming():
    from lora_kernels import LoRAConfig, inject_lora
    from tests.helpers import tiny

    assert LoRAConfig(mode="B").init_A == "orthogonal"
    assert LoRAConfig().init_A == LoRAConfig(mode="A").init_A == "kaiming"  # PEFT's
    assert LoRAConfig(mode="B", init_A="kaiming").init_A == "kaiming"  # an explicit choice is kept
    assert LoRAConfig.from_peft_dict({"peft_type": "LORA", "r": 2, "target_modules": ["q"]}, mode="B").init_A == \
        "orthogonal"
    torch.manual_seed(0)
    b = FusedLoRALinear(64, 32, r=8, mode="B")
    assert b.init_A == "orthogonal"
    assert torch.allclose(torch.linalg.svdvals(b.lora_A), torch.ones(8), atol=1e-5)  # σ = 1
    kaiming = FusedLoRALinear(64, 32, r=8, mode="B", init_A="kaiming")
    s = torch.linalg.svdvals(kaiming.lora_A)
    assert 0.3 < s.mean() < 0.8  # ≈ 0.58 = √(in · (1/√in)²/3): the smaller step the default avoids
    for mode in ("AB", "A"):
        layer = FusedLoRALinear(64, 32, r=8, mode=mode)
        random_factor = layer.lora_B if mode == "A" else layer.lora_A
        assert layer.init_A == "kaiming" and random_factor.abs().max() <= 1 / math.sqrt(random_factor.shape[1]) + 1e-6
    model = inject_lora(tiny(), ["q_proj"], r=4, mode="B")
    a = model.blocks[0]["q_proj"].lora_A.detach()
    assert torch.allclose(a @ a.t(), torch.eye(4, dtype=a.dtype), atol=1e-12)
    layer = FusedLoRALinear(16, 8, r=2)
    layer.reconfigure(mode="B")  # already drawn: the init is kept as it was
    assert layer.init_A == "kaiming"


# ------------------------------------------------------------------------------------------------------------
# fp32 adapters on a 16-bit base (autocast_adapter_dtype, PEFT's), prepared behind _KERNELS_ACCEPT_FP32_ADAPTERS
# ------------------------------------------------------------------------------------------------------------

from lora_kernels.modules.lora_linear import _KERNELS_ACCEPT_FP32_ADAPTERS  # noqa: E402

fp32_adapters = pytest.mark.skipif(
    not _KERNELS_ACCEPT_FP32_ADAPTERS,
    reason="lora_linear does not take fp32 adapters with a 16-bit base yet: flip "
           "lora_kernels.modules.lora_linear._KERNELS_ACCEPT_FP32_ADAPTERS when it does")
HALF = [torch.float16, torch.bfloat16]


def test_autocast_adapter_dtype_flag():
    from lora_kernels import LoRAConfig

    assert LoRAConfig().autocast_adapter_dtype is True  # PEFT's default
    with pytest.raises(TypeError, match=r"LoRAConfig\.autocast_adapter_dtype"):
        LoRAConfig(autocast_adapter_dtype="yes")
    assert "autocast_adapter_dtype" not in LoRAConfig().to_peft_dict()  # a loading option in PEFT, not a file field
    assert FusedLoRALinear(8, 4, autocast_adapter_dtype=False).autocast_adapter_dtype is False


@pytest.mark.skipif(_KERNELS_ACCEPT_FP32_ADAPTERS, reason="the kernels take fp32 adapters: the tests below apply")
@pytest.mark.parametrize("dtype", HALF)
def test_adapters_take_the_base_dtype_until_the_kernels_accept_fp32(backend, dtype):
    layer = FusedLoRALinear.from_linear(nn.Linear(16, 8, dtype=dtype), r=2)
    assert layer.autocast_adapter_dtype and layer.lora_A.dtype == layer.lora_B.dtype == dtype
    x = torch.randn(3, 16, dtype=dtype)
    assert layer(x).dtype == dtype


@fp32_adapters
@pytest.mark.parametrize("dtype", HALF)
def test_fp32_adapters_on_a_16_bit_base(backend, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(24, 16, dtype=dtype)
    layer = FusedLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    assert layer.weight is lin.weight and layer.weight.dtype == dtype
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert FusedLoRALinear.from_linear(nn.Linear(24, 16, dtype=dtype), autocast_adapter_dtype=False).lora_A.dtype == \
        dtype
    assert FusedLoRALinear(24, 16, dtype=dtype).lora_B.dtype == torch.float32
    for wide in (torch.float32, torch.float64):  # only 16-bit bases are widened
        assert FusedLoRALinear(24, 16, dtype=wide).lora_A.dtype == wide
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 24, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = lora_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                          layer.lora_B.double(), layer.scaling)
    assert rel_err(y, ref) <= standalone_bound(dtype, 24 + 16 + 4)
    y.float().pow(2).sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert layer.weight.grad is None
    layer.eval()
    layer.merge()
    assert layer.weight.dtype == dtype and rel_err(layer(x), ref) <= standalone_bound(dtype, 24 + 16 + 4)
    layer.unmerge()


@fp32_adapters
@pytest.mark.parametrize("dtype", HALF)
def test_fp32_adapters_through_inject_and_files(backend, tmp_path, dtype):
    from safetensors.torch import load_file

    from lora_kernels import inject_lora, load_adapter, lora_layers, save_adapter
    from tests.helpers import IDX, Tiny

    def model():
        torch.manual_seed(0)
        return Tiny(dt=dtype)

    ours = inject_lora(model(), ["q_proj", "v_proj"], r=4)
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in lora_layers(ours))
    with torch.no_grad():
        for m in lora_layers(ours):
            m.lora_B.normal_()
    save_adapter(ours, str(tmp_path))
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "adapter_model.safetensors")).values())
    loaded = load_adapter(model(), str(tmp_path))
    assert all(m.lora_A.dtype == torch.float32 for m in lora_layers(loaded))
    assert torch.equal(loaded(IDX), ours.eval()(IDX))
    narrow = load_adapter(model(), str(tmp_path), autocast_adapter_dtype=False)
    assert all(m.lora_A.dtype == dtype for m in lora_layers(narrow))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, "float32"])
def test_non_float_dtype_is_named(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        FusedLoRALinear(8, 8, r=2, dtype=dtype)
