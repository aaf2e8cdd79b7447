"""LoRA-One's linear toy: random init + GD versus the one-step spectral init + preconditioned GD.

Setting (Zhang, Liu, Chen 2025, their linear-model experiment): X ∈ R^{N×d} with N(0, I) rows, d = k = 100,
N = 1600; a frozen W₀ (k×d, N(0,1) entries); the target is W♮ = W₀ + ΔW with ΔW of rank 4; an adapter of rank
r = 8 on top of W₀; squared loss L = ‖X(W₀ + s·BA)ᵀ − Y‖² / (2N), s = 1.
  random   : A ~ N(0, 1/d)·init_scale, B = 0; plain gradient descent (torch.optim.SGD).
  LoRA-One : A₀, B₀ from ``lora_one_init`` (plain one-step form, s·B₀A₀ = η·[−G]_r); ``PreconditionedSGD``.
Measured each step: the risk ‖s·BA − ΔW‖_F² / ‖ΔW‖_F² (the excess population risk for isotropic inputs, up to a
constant) and the alignment: the larger of the principal-angle sines between the top-4 left and right singular
subspaces of s·BA and those of ΔW (1 while s·BA = 0).  The right (row) subspace is the informative one: after
one GD step B's columns already lie in col(ΔW), but random A's rows must still rotate into row(ΔW).

Everything runs through the package (FusedLoRALinear, lora_one_init, PreconditionedSGD) in float64 (PyTorch path).

  python bench/experiments/lora_one_toy.py          # writes docs/toys/lora_one_toy.png and a summary
"""

from __future__ import annotations

import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(os.path.dirname(_HERE))]  # helpers; lora_kernels from this checkout
from common import pyplot, save_figure, write_summary  # noqa: E402
import torch.nn as nn

from lora_kernels import FusedLoRALinear, lora_one_init  # noqa: E402
from lora_kernels.ops.rsvd import principal_sine  # noqa: E402
from lora_kernels.optim import PreconditionedSGD  # noqa: E402


def make_problem(seed: int, d: int = 100, k: int = 100, n: int = 1600, true_rank: int = 4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W0 = torch.randn(k, d, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(k, true_rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, true_rank, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(1.0, 0.5, true_rank, dtype=torch.float64)
    dW = (U * s) @ V.mT
    Y = X @ (W0 + dW).mT
    return X, Y, W0, dW, (U, V)


def _layer(W0: torch.Tensor, r: int) -> FusedLoRALinear:
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W0)
    return FusedLoRALinear.from_linear(lin, r=r, lora_alpha=r)  # s = 1


def _metrics(layer, dW, true_factors):
    U_true, V_true = true_factors
    q = U_true.shape[1]
    with torch.no_grad():
        delta = layer.scaling * layer.lora_B @ layer.lora_A
        risk = float((delta - dW).pow(2).sum() / dW.pow(2).sum())
        if float(delta.abs().max()) == 0.0:
            return risk, 1.0
        U, _, Vh = torch.linalg.svd(delta)
        align = max(float(principal_sine(U[:, :q], U_true)), float(principal_sine(Vh[:q].mT, V_true)))
    return risk, align


def run(seed: int, steps: int = 200, r: int = 8, lr_gd: float = 0.5, lr_pre: float = 0.5, init_scale: float = 0.01,
        step_size: float = 0.5, batch_size: int = 200):
    """Returns {"random": (risks, aligns), "lora_one": (risks, aligns)} over ``steps`` full-batch steps."""
    X, Y, W0, dW, U_true = make_problem(seed)

    def loss_fn(model, b):
        return 0.5 * (model(b[0]) - b[1]).pow(2).sum(1).mean()

    curves = {}
    # random init + plain GD
    torch.manual_seed(seed)
    layer = _layer(W0, r)
    with torch.no_grad():
        layer.lora_A.normal_(std=init_scale / X.shape[1] ** 0.5)
        layer.lora_B.zero_()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=lr_gd)
    curves["random"] = _train(layer, opt, X, Y, dW, U_true, steps, loss_fn)
    # LoRA-One: one-step spectral init + preconditioned GD
    layer = _layer(W0, r)
    batches = [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    lora_one_init(layer, batches, loss_fn, step_size=step_size, progress=False,
                  generator=torch.Generator().manual_seed(seed))
    opt = PreconditionedSGD([layer.lora_A, layer.lora_B], lr=lr_pre, pairs=[(layer.lora_A, layer.lora_B)])
    curves["lora_one"] = _train(layer, opt, X, Y, dW, U_true, steps, loss_fn)
    return curves


def _train(layer, opt, X, Y, dW, U_true, steps, loss_fn):
    risks, aligns = [], []
    for _ in range(steps + 1):
        risk, align = _metrics(layer, dW, U_true)
        risks.append(risk)
        aligns.append(align)
        opt.zero_grad()
        loss_fn(layer, (X, Y)).backward()
        opt.step()
    return risks, aligns


TITLE = "LoRA-One linear toy"


def main():
    seeds = (0, 1, 2)
    results = [run(s) for s in seeds]
    lines = ["| method (worst of 3 seeds) | risk at step 0 | step 20 | step 200 | alignment sinΘ at step 1 | step 20 |",
             "|---|---|---|---|---|---|"]
    for key, label in (("random", "random init + GD"), ("lora_one", "LoRA-One init + preconditioned GD")):
        r0 = [res[key][0][0] for res in results]
        r20 = [res[key][0][20] for res in results]
        rT = [res[key][0][-1] for res in results]
        a0 = [res[key][1][1] for res in results]
        aT = [res[key][1][20] for res in results]
        lines.append(f"| {label} | {max(r0):.3g} | {max(r20):.3g} | {max(rT):.3g} | {max(a0):.3g} | {max(aT):.3g} |")
    table = "\n".join(lines)
    print(table)
    write_summary("lora_one_toy", TITLE, table)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for res, s in zip(results, seeds):
            for key, color in (("random", "tab:red"), ("lora_one", "tab:blue")):
                axes[0].semilogy(res[key][0], color=color, alpha=0.7, label=key if s == seeds[0] else None)
                axes[1].semilogy(res[key][1], color=color, alpha=0.7, label=key if s == seeds[0] else None)
        axes[0].set(xlabel="step", ylabel="‖sBA − ΔW‖² / ‖ΔW‖²", title="risk")
        axes[1].set(xlabel="step", ylabel="max sinΘ, top-4 left/right subspaces", title="alignment of sBA with ΔW")
        for ax in axes:
            ax.legend()
        fig.suptitle("LoRA-One linear toy (d=k=100, N=1600, rank ΔW=4, r=8; 3 seeds)")
        save_figure(fig, "lora_one_toy")
    return table


if __name__ == "__main__":
    main()
