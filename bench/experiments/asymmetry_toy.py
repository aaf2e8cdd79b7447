"""The asymmetry of LoRA factors (Zhu et al. 2024, arXiv 2402.16842) on a linear toy.

Regression y = x ΔWᵀ with a frozen base (its output is subtracted, so only ΔW is learned), in = out = d = 64,
ΔW with N(0, 1/d) entries (full rank), N = 4096 samples, adapter rank r = 8, squared loss.  Two arms:
  B-only: A frozen with Haar-orthogonal rows, B trained from 0   (FusedLoRALinear mode="B", init_A="orthogonal")
  A-only: B frozen with Haar-orthogonal columns, A trained from 0  (mode="A", same init scheme for B)
Inputs: anisotropic (covariance eigenvalues ∝ 1/i in a random basis) or isotropic.
Claim: with anisotropic inputs B-only reaches a lower loss than A-only (a random A already extracts input
features where the input energy is, and B's output map is free); with isotropic inputs the two are equal
(each keeps r/d of the energy of ΔW).  Both arms are convex in the trained factor; Adam runs to convergence.
Loss is reported relative to the loss at init (‖ΔW Σ^½‖²).

  python bench/experiments/asymmetry_toy.py     # writes docs/toys/asymmetry_toy.png and prints a summary
"""

from __future__ import annotations

import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(os.path.dirname(_HERE))]  # helpers; lora_kernels from this checkout
from common import pyplot, save_figure, write_summary  # noqa: E402

from lora_kernels import FusedLoRALinear  # noqa: E402


def make_data(seed: int, d: int = 64, n: int = 4096, anisotropic: bool = True):
    g = torch.Generator().manual_seed(seed)
    if anisotropic:
        basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        eig = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
        eig = eig * d / eig.sum()  # same total variance as the isotropic case
        X = (torch.randn(n, d, generator=g, dtype=torch.float64) * eig.sqrt()) @ basis.mT
    else:
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
    dW = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return X, X @ dW.mT


def train_arm(mode: str, X, Y, r: int, seed: int, steps: int, lr: float):
    torch.manual_seed(1000 + seed)
    d = X.shape[1]
    layer = FusedLoRALinear(d, d, r=r, lora_alpha=r, bias=False, mode=mode, init_A="orthogonal", dtype=torch.float64)
    with torch.no_grad():
        layer.weight.zero_()  # the frozen base's output is known and subtracted: only ΔW is learned
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    base = Y.pow(2).sum(1).mean().item()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (layer(X) - Y).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item() / base)
    return losses


def run(seed: int, anisotropic: bool, r: int = 8, steps: int = 400, lr: float = 0.05, d: int = 64, n: int = 4096):
    X, Y = make_data(seed, d, n, anisotropic)
    return {mode: train_arm(mode, X, Y, r, seed, steps, lr) for mode in ("B", "A")}


TITLE = "Asymmetry of LoRA factors"


def main():
    seeds = (0, 1, 2)
    results = {aniso: [run(s, aniso) for s in seeds] for aniso in (True, False)}
    lines = ["| inputs | B-only final loss (A frozen) | A-only final loss (B frozen) | ratio B/A |", "|---|---|---|---|"]
    for aniso, res in results.items():
        b = [x["B"][-1] for x in res]
        a = [x["A"][-1] for x in res]
        ratio = [bb / aa for bb, aa in zip(b, a)]
        lines.append(f"| {'anisotropic (λᵢ ∝ 1/i)' if aniso else 'isotropic'} | "
                     f"{min(b):.3f}–{max(b):.3f} | {min(a):.3f}–{max(a):.3f} | {min(ratio):.3f}–{max(ratio):.3f} |")
    table = "\n".join(lines)
    print(table)
    write_summary("asymmetry_toy", TITLE, table)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, aniso in zip(axes, (True, False)):
            for i, res in enumerate(results[aniso]):
                ax.plot(res["B"], color="tab:blue", alpha=0.7, label="train B (A frozen random)" if i == 0 else None)
                ax.plot(res["A"], color="tab:orange", alpha=0.7, label="train A (B frozen random)" if i == 0 else None)
            ax.set(title="anisotropic inputs (λᵢ ∝ 1/i)" if aniso else "isotropic inputs", xlabel="Adam step",
                   ylabel="loss / loss at init")
            ax.legend()
        fig.suptitle("Asymmetry of LoRA factors (d=64, r=8, full-rank ΔW; 3 seeds)")
        save_figure(fig, "asymmetry_toy")
    return table


if __name__ == "__main__":
    main()
