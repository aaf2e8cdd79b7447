"""PreconditionedAdamW's defaults against the LoRA-One authors' optimizer (``AdamWr`` in their prec_logTrainer.py).

``adamwr_step`` below is a minimal re-implementation of AdamWr's step for one (A, B) pair, written from its
description (not from our code): no bias correction, λ = 1e-6; A's gradient preconditioned by (BᵀB + λI)⁻¹, then
Adam moments, A updated, then decayed; B's gradient preconditioned by (AAᵀ + λI)⁻¹ with that updated A, then the
same for B; eps added to √v.  Gradients come from one plain-torch loss on both sides (no kernels involved), so
the trajectories differ only by what the optimizers do.
"""

import inspect

import pytest
import torch
import torch.nn as nn

from lora_kernels.optim import PreconditionedAdamW

SHAPES = [(16, 12, 4), (12, 8, 3)]  # (in, out, r) of a 2-layer LoRA MLP
SCALES = [2.0, 1.5]


def adamwr_step(A, B, gA, gB, st, lr, wd, betas=(0.9, 0.999), eps=1e-8, lam=1e-6):
    b1, b2 = betas
    I = torch.eye(A.shape[0], dtype=A.dtype)

    def adam(p, g, s):
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        p = p - lr * s["m"] / (s["v"].sqrt() + eps)
        return p - lr * wd * p  # decoupled decay, after the update

    A = adam(A, torch.linalg.solve(B.T @ B + lam * I, gA), st["A"])
    B = adam(B, torch.linalg.solve(A @ A.T + lam * I, gB.T).T, st["B"])  # g_B (AAᵀ+λI)⁻¹, with the new A
    return A, B


def problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5 for i, o, _ in SHAPES]
    factors = [(torch.randn(r, i, generator=g, dtype=torch.float64) / i**0.5,
                torch.randn(o, r, generator=g, dtype=torch.float64) / r**0.5) for i, o, r in SHAPES]
    X = torch.randn(64, SHAPES[0][0], generator=g, dtype=torch.float64)
    Y = torch.randn(64, SHAPES[-1][1], generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return [cast(w) for w in Ws], [(cast(a), cast(b)) for a, b in factors], cast(X), cast(Y)


def loss_fn(Ws, factors, X, Y):
    h = X
    for k, (W, (A, B), s) in enumerate(zip(Ws, factors, SCALES)):
        h = h @ W.T + s * (h @ A.T) @ B.T
        if k < len(Ws) - 1:
            h = torch.tanh(h)
    return (h - Y).pow(2).mean()


def run_ours(Ws, factors0, X, Y, steps, **kw):
    params = [(nn.Parameter(a.clone()), nn.Parameter(b.clone())) for a, b in factors0]
    opt = PreconditionedAdamW([p for ab in params for p in ab], pairs=params, **kw)
    traj = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(Ws, params, X, Y).backward()
        opt.step()
        traj.append([(a.detach().clone(), b.detach().clone()) for a, b in params])
    return traj, opt


def run_reference(Ws, factors0, X, Y, steps, lr, wd):
    factors = [(a.clone(), b.clone()) for a, b in factors0]
    states = [{k: {"m": torch.zeros_like(t), "v": torch.zeros_like(t)} for k, t in zip("AB", ab)} for ab in factors]
    traj = []
    for _ in range(steps):
        leaves = [(a.requires_grad_(True), b.requires_grad_(True)) for a, b in factors]
        grads = torch.autograd.grad(loss_fn(Ws, leaves, X, Y), [t for ab in leaves for t in ab])
        with torch.no_grad():
            factors = [adamwr_step(a.detach(), b.detach(), grads[2 * k], grads[2 * k + 1], states[k], lr, wd)
                       for k, (a, b) in enumerate(leaves)]
        traj.append([(a.clone(), b.clone()) for a, b in factors])
    return traj


def delta_error(traj, ref, factors0):
    """max over steps and layers of ‖s·BA − s·BA_ref‖ / ‖s·BA_ref − s·B₀A₀‖ (error relative to the change)."""
    worst = 0.0
    for got, want in zip(traj, ref):
        for (a, b), (ar, br), (a0, b0), s in zip(got, want, factors0, SCALES):
            d, dr, d0 = (s * (y.double() @ x.double()) for x, y in ((a, b), (ar, br), (a0, b0)))
            worst = max(worst, float((d - dr).norm() / (dr - d0).norm()))
    return worst


# fp32: the error is fp32 rounding on both sides (ours in fp32 vs the reference in fp64: 1.1e-6), measured 0.7-1.6e-6
TOL = {torch.float32: 5e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_defaults_match_the_authors_adamwr(dtype, weight_decay):
    lr, steps = 3e-3, 50
    Ws, factors0, X, Y = problem(dtype)
    ref = run_reference(Ws, factors0, X, Y, steps, lr, weight_decay)
    traj, _ = run_ours(Ws, factors0, X, Y, steps, lr=lr, weight_decay=weight_decay)
    err = delta_error(traj, ref, factors0)
    assert err < TOL[dtype], f"change of s·BA differs from AdamWr's by {err:.2e} (relative)"
    # the factors themselves too
    for (a, b), (ar, br) in zip(traj[-1], ref[-1]):
        for x, y in ((a, ar), (b, br)):
            assert float((x - y).double().norm() / y.double().norm()) < TOL[dtype]


@pytest.mark.parametrize("variant", [dict(correct_bias=True), dict(use_updated_A=False),
                                     dict(decay_after_update=False), dict(precond_damping=1e-3)])
def test_each_non_default_choice_is_detected(variant):
    """The comparison has teeth: each option that differs from AdamWr moves the result well past the fp32 TOL
    (measured: bias correction 0.79, pre-step A 0.24, λ = 1e-3 5e-3, decay before the step 3e-4 = O(lr·wd))."""
    lr, steps = 3e-3, 50
    Ws, factors0, X, Y = problem(torch.float64)
    ref = run_reference(Ws, factors0, X, Y, steps, lr, 0.1)
    traj, _ = run_ours(Ws, factors0, X, Y, steps, lr=lr, weight_decay=0.1, **variant)
    assert delta_error(traj, ref, factors0) > 20 * TOL[torch.float32]


def test_defaults_are_documented_values():
    sig = inspect.signature(PreconditionedAdamW.__init__).parameters
    got = {k: sig[k].default for k in ("lr", "betas", "eps", "weight_decay", "precond_damping", "correct_bias",
                                        "decay_after_update", "use_updated_A")}
    assert got == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, precond_damping=1e-6,
                       correct_bias=False, decay_after_update=True, use_updated_A=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_correct_bias_gives_standard_adamw_moments(dtype):
    """correct_bias=True: torch.optim.AdamW's bias-corrected moments.  Fed the same preconditioned gradient (pre-step
    factors, decay before the step) it equals torch's AdamW step for step, state included."""
    lr, wd, steps = 3e-3, 0.1, 20
    Ws, factors0, X, Y = problem(dtype)
    ours = [(nn.Parameter(a.clone()), nn.Parameter(b.clone())) for a, b in factors0]
    theirs = [(nn.Parameter(a.clone()), nn.Parameter(b.clone())) for a, b in factors0]
    opt = PreconditionedAdamW([p for ab in ours for p in ab], pairs=ours, lr=lr, weight_decay=wd, correct_bias=True,
                              use_updated_A=False, decay_after_update=False)
    ref = torch.optim.AdamW([p for ab in theirs for p in ab], lr=lr, weight_decay=wd, foreach=False)
    lam = 1e-6
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for _ in range(steps):
        for params in (ours, theirs):
            for p in (p for ab in params for p in ab):
                p.grad = None
            loss_fn(Ws, params, X, Y).backward()
        with torch.no_grad():  # precondition the reference's gradients by hand (pre-step factors)
            for a, b in theirs:
                I = torch.eye(a.shape[0], dtype=dtype)
                ga = torch.linalg.solve(b.T @ b + lam * I, a.grad)
                gb = torch.linalg.solve(a @ a.T + lam * I, b.grad.T).T
                a.grad, b.grad = ga, gb
        opt.step()
        ref.step()
    for ab, ab_ref in zip(ours, theirs):
        for p, q in zip(ab, ab_ref):
            for x, y in ((p.detach(), q.detach()), (opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]),
                         (opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])):
                assert float((x - y).double().norm() / y.double().norm()) < rtol


def test_first_step_size_with_and_without_bias_correction():
    """Step 1, wd = 0: the bias-corrected step is lr·g/(|g| + eps) ≈ lr per entry; the authors' uncorrected one is
    lr·0.1·g/(√0.001·|g| + eps) ≈ 3.16·lr (why the default matters: 3–7× larger early steps)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    for correct_bias, factor in ((True, 1.0), (False, 0.1 / 0.001**0.5)):
        A, B = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
        A.grad = torch.randn(A.shape, generator=torch.Generator().manual_seed(1), dtype=A.dtype)
        B.grad = torch.randn(B.shape, generator=torch.Generator().manual_seed(2), dtype=B.dtype)
        opt = PreconditionedAdamW([A, B], pairs=[(A, B)], lr=1e-3, eps=0.0, correct_bias=correct_bias)
        opt.step()
        for new, old in ((A, a), (B, b)):
            step = (new.detach() - old).abs()
            assert torch.allclose(step, torch.full_like(step, 1e-3 * factor), rtol=1e-10)


def test_bias_correction_alias_and_old_state_dicts():
    A = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    B = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="correct_bias"):
        opt = PreconditionedAdamW([A, B], pairs=[(A, B)], bias_correction=True)
    assert opt.param_groups[0]["correct_bias"] is True
    # a state dict saved before the rename: {"bias_correction": True} and decay before the step
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("correct_bias")
        g.pop("decay_after_update")
        g["bias_correction"] = True
    new = PreconditionedAdamW([A, B], pairs=[(A, B)], weight_decay=0.5)
    new.load_state_dict(sd)
    a0 = A.detach().clone()
    A.grad = torch.ones_like(A)
    B.grad = torch.ones_like(B)
    new.param_groups[0]["weight_decay"] = 0.5
    lr = new.param_groups[0]["lr"]
    g = torch.linalg.solve(B.detach().T @ B.detach() + 1e-6 * torch.eye(3, dtype=torch.float64), torch.ones_like(A))
    new.step()
    want = a0 * (1 - lr * 0.5) - lr * g / (g.abs() + 1e-8)  # bias-corrected first step, decay before
    assert torch.allclose(A.detach(), want, rtol=1e-10, atol=1e-14)
