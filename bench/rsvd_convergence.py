"""How rsvd's accuracy depends on the subspace size k and the iteration count (the evidence for its defaults).

Largest principal-angle sine of the top-r left subspace, worst of 3 draws, per (spectrum, k, niter); fp32; runs on
CPU in about a minute:  python bench/rsvd_convergence.py [--size 1024] [--rank 16]
"""

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # helpers; lora_kernels from this checkout
from lora_kernels import rsvd  # noqa: E402
from lora_kernels.ops.rsvd import principal_sine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--spectra", default="i^-0.5,i^-1,i^-2", help="comma-separated subset of i^-0.5,i^-1,i^-2")
    ap.add_argument("--mults", default="2,3,4,6", help="k as multiples of the rank")
    ap.add_argument("--iters", default="2,4,6,8,10", help="niter values")
    args = ap.parse_args(argv)
    n, r = args.size, args.rank
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    i = torch.arange(1, n + 1, dtype=torch.float64)
    iters = [int(q) for q in args.iters.split(",")]
    print(f"# {n}x{n} fp32, rank {r}: worst sinΘ of 3 draws; passes over A = 2 + 2·niter")
    print("| spectrum | k | " + " | ".join(f"niter={q} ({2 + 2 * q} passes)" for q in iters) + " |")
    print("|---|---|" + "---|" * len(iters))
    powers = {"i^-0.5": -0.5, "i^-1": -1.0, "i^-2": -2.0}
    for name in args.spectra.split(","):
        A = ((U * i**powers[name]) @ V.t()).float()
        for mult in [int(x) for x in args.mults.split(",")]:
            k = mult * r
            cells = []
            for q in iters:
                worst = max(principal_sine(rsvd(A, r, oversample=k - r, niter=q,
                                                generator=torch.Generator().manual_seed(s))[0], U[:, :r]).item()
                            for s in range(3))
                cells.append(f"{worst:.1e}")
            print(f"| {name} | {k} ({mult}r) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
