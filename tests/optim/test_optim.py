"""PreconditionedAdamW / PreconditionedSGD: the preconditioned step against explicit formulas (float64)."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear
from lora_kernels.optim import PreconditionedAdamW, PreconditionedSGD

DT = torch.float64
LAM = 1e-6


def model(mode="AB", ranks=(3, 3, 5), seed=0):
    torch.manual_seed(seed)
    dims = [12, 10, 9, 7]
    layers = []
    for (i, o), r in zip(zip(dims[:-1], dims[1:]), ranks):
        m = FusedLoRALinear(i, o, r=r, lora_alpha=r, mode=mode, dtype=DT)
        with torch.no_grad():
            m.lora_A.normal_()
            m.lora_B.normal_()
        layers.append(m)
    return nn.Sequential(*layers)


def backward(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 12, generator=g, dtype=DT)
    m.zero_grad(set_to_none=True)
    m(x).pow(2).sum().backward()


def inv(M):
    return torch.linalg.inv(M + LAM * torch.eye(M.shape[0], dtype=DT))


@pytest.mark.parametrize("use_updated_A", [True, False])
def test_sgd_step_matches_formula(use_updated_A):
    m = model()
    backward(m)
    before = [(l.lora_A.detach().clone(), l.lora_B.detach().clone(), l.lora_A.grad.clone(), l.lora_B.grad.clone())
              for l in m]
    opt = PreconditionedSGD.from_model(m, lr=0.1, use_updated_A=use_updated_A)
    opt.step()
    for layer, (A, B, gA, gB) in zip(m, before):
        A_new = A - 0.1 * inv(B.mT @ B) @ gA
        A_pre = A_new if use_updated_A else A
        B_new = B - 0.1 * gB @ inv(A_pre @ A_pre.mT)
        # Two correct inverses of an r×r system agree to about cond·ε (AAᵀ after a large A step reached cond 1e8).
        for got, want, P in ((layer.lora_A, A_new, B.mT @ B), (layer.lora_B, B_new, A_pre @ A_pre.mT)):
            tol = 10 * torch.finfo(DT).eps * float(torch.linalg.cond(P)) + 1e-14
            assert float((got.detach() - want).norm() / want.norm()) <= tol


def test_b_only_uses_only_a_preconditioner():
    m = model(mode="B")
    backward(m)
    A0 = [l.lora_A.detach().clone() for l in m]
    gB = [(l.lora_B.detach().clone(), l.lora_B.grad.clone()) for l in m]
    opt = PreconditionedSGD.from_model(m, lr=0.05)
    opt.step()
    for layer, A, (B, g) in zip(m, A0, gB):
        assert torch.equal(layer.lora_A, A) and layer.lora_A.grad is None
        assert torch.allclose(layer.lora_B, B - 0.05 * g @ inv(A @ A.mT), rtol=1e-10)
    assert all(id(l.lora_A) not in {id(p) for p in opt.state} for l in m)


@pytest.mark.parametrize("correct_bias", [True, False])
def test_adamw_equals_torch_adamw_on_preconditioned_gradient(correct_bias):
    """With use_updated_A=False, decay_after_update=False and correct_bias=True, each step is exactly torch AdamW
    fed g̃."""
    m = model()
    ref = copy.deepcopy(m)
    opt = PreconditionedAdamW.from_model(m, lr=1e-2, weight_decay=0.1, use_updated_A=False, decay_after_update=False,
                                         correct_bias=correct_bias)
    ref_params = [p for l in ref for p in (l.lora_A, l.lora_B)]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        backward(m, seed=step)
        backward(ref, seed=step)
        with torch.no_grad():
            pre = []
            for l in ref:
                pre.append((inv(l.lora_B.mT @ l.lora_B) @ l.lora_A.grad, l.lora_B.grad @ inv(l.lora_A @ l.lora_A.mT)))
            for l, (ga, gb) in zip(ref, pre):
                l.lora_A.grad.copy_(ga)
                l.lora_B.grad.copy_(gb)
        opt.step()
        ref_opt.step()
    close = all(torch.allclose(a.lora_A, b.lora_A, rtol=1e-9) and torch.allclose(a.lora_B, b.lora_B, rtol=1e-9)
                for a, b in zip(m, ref))
    assert close == correct_bias  # without bias correction (the default) the early steps are different


def test_pairs_come_from_modules_not_parameter_order():
    m1, m2 = model(), model()
    backward(m1)
    backward(m2)
    p1 = [p for p in m1.parameters() if p.requires_grad]
    p2 = list(reversed([p for p in m2.parameters() if p.requires_grad]))
    from lora_kernels.optim import lora_pairs

    PreconditionedSGD(p1, lr=0.1, pairs=lora_pairs(m1)).step()
    PreconditionedSGD(p2, lr=0.1, pairs=lora_pairs(m2)).step()
    for a, b in zip(m1, m2):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_one_batched_cholesky_per_rank(monkeypatch):
    calls = []
    orig = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda M, **k: calls.append(tuple(M.shape)) or orig(M, **k))
    m = model(ranks=(3, 3, 5))
    backward(m)
    PreconditionedAdamW.from_model(m, lr=1e-3).step()
    assert sorted(calls) == sorted([(2, 3, 3), (1, 5, 5)] * 2)  # A side and B side, one call per rank each


def test_state_dict_roundtrip_and_scheduler():
    m1 = model()
    opt1 = PreconditionedAdamW.from_model(m1, lr=1e-2)
    for s in range(2):
        backward(m1, seed=s)
        opt1.step()
    m2 = copy.deepcopy(m1)
    opt2 = PreconditionedAdamW.from_model(m2, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=1, gamma=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    for opt, mm, sch in ((opt1, m1, sched1), (opt2, m2, sched2)):
        backward(mm, seed=9)
        opt.step()
        sch.step()
    assert opt1.param_groups[0]["lr"] == pytest.approx(5e-3)
    for a, b in zip(m1, m2):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_singular_preconditioner_falls_back():
    m = model()
    with torch.no_grad():
        m[0].lora_B.zero_()  # BᵀB = 0: singular even with λ = 0
    backward(m)
    opt = PreconditionedSGD.from_model(m, lr=0.1, precond_damping=0.0)
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_unpaired_parameters_get_the_plain_update():
    m = model()
    head = nn.Linear(7, 2, dtype=DT)
    full = nn.Sequential(m, head)
    x = torch.randn(4, 12, dtype=DT)
    full(x).sum().backward()
    w0, g = head.weight.detach().clone(), head.weight.grad.clone()
    PreconditionedSGD.from_model(full, lr=0.1).step()
    assert torch.allclose(head.weight, w0 - 0.1 * g)


def test_bad_arguments():
    with pytest.raises(ValueError, match="no FusedLoRALinear"):
        PreconditionedAdamW.from_model(nn.Linear(3, 3), lr=1e-3)
    m = model()
    with pytest.raises(ValueError, match="lr"):
        PreconditionedAdamW.from_model(m, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        PreconditionedAdamW.from_model(m, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="momentum"):
        PreconditionedSGD.from_model(m, momentum=1.5)
    with pytest.raises(ValueError, match="precond_damping"):
        PreconditionedSGD.from_model(m, precond_damping=-1.0)
    with pytest.raises(ValueError, match="pair"):
        PreconditionedSGD(list(m.parameters()), pairs=[(m[0].lora_A, m[2].lora_B)])  # rank 3 with rank 5


def test_warns_without_pairs_and_groups_inverses_by_dtype():
    m = model()
    with pytest.warns(UserWarning, match="no \\(lora_A, lora_B\\) pair"):
        PreconditionedAdamW(m.parameters(), lr=1e-3)
    from lora_kernels.optim.preconditioned import _batched_inverse

    mats = [torch.eye(3, dtype=torch.float32) * 2, torch.eye(3, dtype=torch.float64) * 4]
    inv32, inv64 = _batched_inverse(mats, 0.0)
    assert inv32.dtype == torch.float32 and inv64.dtype == torch.float64
    assert torch.allclose(inv64, torch.eye(3, dtype=DT) / 4)
