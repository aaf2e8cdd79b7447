"""Our default ``rsvd(G, r)`` against the LoRA-One authors' ``torch.svd_lowrank(G, q=512, niter=16)`` (run_exp.py),
on a layer-like 1024×1024 fp32 matrix G = U diag(σ) Vᵀ (Haar U, V) with r = 16: σ_i ∝ i^(-decay) (default 1/4) on each
side of r and a tiny gap σ_r/σ_{r+1} = 1.02.  Error: relative Frobenius error of the rank-r reconstruction U_r S_r V_rᵀ
against the exact [G]_r (known from the construction, fp64).  Both see the same fp32 G.

  python bench/experiments/rsvd_vs_svd_lowrank.py      # prints a markdown table (recorded in docs/inits.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(os.path.dirname(_HERE))]  # helpers; lora_kernels from this checkout
from lora_kernels.ops.rsvd import rsvd  # noqa: E402


def layer_like(n: int, r: int, gap: float, decay: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, n + 1, dtype=torch.float64).pow(-decay)
    s[r:] *= s[r - 1] / (gap * s[r])  # σ_r / σ_{r+1} = gap exactly, i^(-decay) on both sides
    G = (U * s) @ V.mT
    best = (U[:, :r] * s[:r]) @ V[:, :r].mT
    return G.float(), best


def err(U, S, V, best):
    rec = (U.double() * S.double()) @ V.double().mT
    return float((rec - best).norm() / best.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--gap", type=float, default=1.02)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--decay", type=float, default=0.25)
    a = ap.parse_args()
    torch.manual_seed(0)
    arms = {
        "ours rsvd(G, r) (k = 4r, niter 6)": lambda G: rsvd(G, a.r, generator=torch.Generator().manual_seed(1)),
        "ours rsvd(G, r, niter=16)": lambda G: rsvd(G, a.r, niter=16, generator=torch.Generator().manual_seed(1)),
        "ours rsvd(G, r, oversample=496, niter=16) (q = 512)":
            lambda G: rsvd(G, a.r, oversample=512 - a.r, niter=16, generator=torch.Generator().manual_seed(1)),
        "torch.svd_lowrank(G, q=512, niter=16) (authors')":
            lambda G: [t[..., :a.r] if t.dim() == 2 else t[:a.r] for t in torch.svd_lowrank(G, q=512, niter=16)],
        "torch.svd_lowrank(G, q=4r, niter=4) (authors' prec_run_exp.py)":
            lambda G: [t[..., :a.r] if t.dim() == 2 else t[:a.r] for t in torch.svd_lowrank(G, q=4 * a.r, niter=4)],
    }
    res = {k: [] for k in arms}
    for seed in range(a.seeds):
        G, best = layer_like(a.n, a.r, a.gap, a.decay, seed)
        for name, fn in arms.items():
            t0 = time.perf_counter()
            U, S, V = fn(G)
            res[name].append((err(U, S, V, best), time.perf_counter() - t0))
    print(f"torch {torch.__version__}, {a.n}x{a.n} fp32, r = {a.r}, σ_i ∝ i^-{a.decay}, σ_r/σ_(r+1) = {a.gap}, "
          f"{a.seeds} matrices\n")
    print("| method | rel. error of rank-r ΔW vs exact [G]_r: median (max) | seconds (median) |\n|---|---|---|")
    for name, v in res.items():
        e = sorted(x for x, _ in v)
        t = sorted(x for _, x in v)
        print(f"| {name} | {e[len(e) // 2]:.1e} ({e[-1]:.1e}) | {t[len(t) // 2]:.2f} |")


if __name__ == "__main__":
    main()
