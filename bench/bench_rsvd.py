"""Batched randomized SVD benchmark: time and accuracy side by side, on matrices with known spectra.

Methods (one run, same matrices):
  exact        torch.linalg.svd per matrix (timed on one matrix; the batch figure is that × batch, labelled so)
  lowrank-one  torch.svd_lowrank(q=512, niter=16)   LoRA-One's reference setting   (looped and batched)
  lowrank-ga   torch.svd_lowrank(q=4r, niter=4)     LoRA-GA's setting              (looped and batched)
  ours         lora_kernels.rsvd defaults (k = 4r, niter = 6), and rsvd(tol=1e-7)
Accuracy: largest principal-angle sine of the top-r left subspace and max relative σ error, worst over the batch.
Passes over A are counted (2 + 2·niter for subspace iteration) and compared with the bandwidth floor.

  python bench/bench_rsvd.py            # GPU: batch 32 of 4096² and 11008×4096, r 16 and 64, + LLaMA-2-7B init row
  python bench/bench_rsvd.py --smoke    # tiny CPU run exercising the script
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import bench_ms, environment, markdown_table, plot_ratios, write_csv  # noqa: E402

from lora_kernels import rsvd  # noqa: E402
from lora_kernels.ops.rsvd import principal_sine  # noqa: E402

SPECTRA = {"i^-0.5": -0.5, "i^-1": -1.0, "i^-2": -2.0}


def make_batch(batch: int, m: int, n: int, power: float, device, seed: int = 0):
    """A = U diag(i^power) Vᵀ (fp32) with Haar U, V; returns A and the true top factors (fp32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    p = min(m, n)
    sigma = torch.arange(1, p + 1, device=device, dtype=torch.float32) ** power
    U = torch.linalg.qr(torch.randn(batch, m, p, device=device, generator=g))[0]
    V = torch.linalg.qr(torch.randn(batch, n, p, device=device, generator=g))[0]
    return (U * sigma) @ V.mT, U, sigma


def accuracy(U, S, U_true, sigma, r) -> Dict[str, float]:
    sin = principal_sine(U[..., :r], U_true[..., :r]).max().item()
    err = ((S[..., :r].double() - sigma[:r].double()).abs() / sigma[:r].double()).max().item()
    return {"sin_theta": sin, "sigma_err": err}


def methods(r: int):
    def lowrank(q, niter, looped):
        def run(A, gen):
            if looped:
                outs = [torch.svd_lowrank(A[i], q=min(q, *A.shape[-2:]), niter=niter) for i in range(A.shape[0])]
                return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
            U, S, _ = torch.svd_lowrank(A, q=min(q, *A.shape[-2:]), niter=niter)
            return U, S
        return run

    return {
        "lowrank-one looped (q512,it16)": (lowrank(512, 16, True), 2 + 2 * 16),
        "lowrank-one batched (q512,it16)": (lowrank(512, 16, False), 2 + 2 * 16),
        "lowrank-ga looped (q4r,it4)": (lowrank(4 * r, 4, True), 2 + 2 * 4),
        "lowrank-ga batched (q4r,it4)": (lowrank(4 * r, 4, False), 2 + 2 * 4),
        "ours rsvd (k4r,it6)": (lambda A, gen: rsvd(A, r, generator=gen)[:2], 2 + 2 * 6),
        "ours rsvd tol=1e-7": (lambda A, gen: rsvd(A, r, tol=1e-7, generator=gen)[:2], None),
    }


def run(cases, ranks, device, out_dir, tag, bandwidth_gbs: float) -> List[dict]:
    rows = []
    env = environment()
    print(f"# bench_rsvd  {env}")
    for batch, m, n in cases:
        for spec, power in SPECTRA.items():
            A, U_t, sigma = make_batch(batch, m, n, power, device)
            pass_ms = batch * m * n * 4 / (bandwidth_gbs * 1e6)  # one read of the whole batch, fp32
            exact_ms = bench_ms(lambda: torch.linalg.svd(A[0], full_matrices=False), warmup_ms=1, rep_ms=1)
            for r in ranks:
                rows.append(dict(batch=batch, m=m, n=n, spectrum=spec, r=r, method="exact (1 matrix × batch)",
                                 ms=exact_ms * batch, passes="", floor_ms="", sin_theta="", sigma_err=""))
                for name, (fn, passes) in methods(r).items():
                    gen = torch.Generator(device=device).manual_seed(1)
                    torch.manual_seed(1)
                    U, S = fn(A, gen)
                    acc = accuracy(U, S, U_t, sigma, r)
                    ms = bench_ms(lambda: fn(A, gen), warmup_ms=5, rep_ms=50)
                    rows.append(dict(batch=batch, m=m, n=n, spectrum=spec, r=r, method=name, ms=ms,
                                     passes=passes or "", floor_ms=(passes * pass_ms) if passes else "", **acc))
            del A, U_t
            if device == "cuda":
                torch.cuda.empty_cache()
    cols = ["batch", "m", "n", "spectrum", "r", "method", "ms", "passes", "floor_ms", "sin_theta", "sigma_err"]
    print(markdown_table(rows, cols))
    if out_dir:
        write_csv(os.path.join(out_dir, f"rsvd_{tag}.csv"), rows)
        plot_rows = [dict(x, case=f"{x['batch']}x{x['m']}x{x['n']} {x['spectrum']} r{x['r']}",
                          log_ms=float(torch.tensor(x["ms"]).log10())) for x in rows]
        plot_ratios(os.path.join(out_dir, f"rsvd_{tag}.png"), plot_rows, "case", "method", "log_ms",
                    f"log10 ms ({env['device']})")
    return rows


def llama_init_row(device) -> List[dict]:
    """The SVD part of a LLaMA-2-7B-shaped init: 128 matrices 4096² and 96 of 11008×4096, r = 16, ours only."""
    rows = []
    total = 0.0
    for batch, m, n in ((128, 4096, 4096), (96, 11008, 4096)):
        A = torch.randn(batch, m, n, device=device) / n**0.5
        gen = torch.Generator(device=device).manual_seed(0)
        ms = bench_ms(lambda: rsvd(A, 16, generator=gen), warmup_ms=5, rep_ms=50)
        total += ms
        rows.append(dict(batch=batch, m=m, n=n, method="ours rsvd (k4r,it6)", ms=ms))
        del A
        torch.cuda.empty_cache()
    rows.append(dict(batch=224, m="mixed", n="", method="LLaMA-2-7B init total", ms=total))
    print(markdown_table(rows, ["batch", "m", "n", "method", "ms"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--bandwidth", type=float, default=3000.0, help="GB/s for the pass floor (H100 measured 3.0 TB/s)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        return run([(3, 96, 64)], (4,), "cpu", args.out, "smoke", args.bandwidth)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rsvd needs a CUDA GPU (use --smoke for a CPU run of the script)")
    rows = run([(32, 4096, 4096), (32, 11008, 4096)], (16, 64), "cuda", args.out, "full", args.bandwidth)
    rows += llama_init_row("cuda")
    return rows


if __name__ == "__main__":
    main()
