"""Microbenchmark of the fused LoRA linear layer against nn.Linear, PEFT and the cuBLAS addmm composition.

Providers, measured side by side in one run on the same inputs:
  linear  frozen nn.Linear (the floor; its backward computes dX only)
  peft    PEFT's LoRA Linear when peft imports, else the same composition in plain torch (base + B(A(drop(x)))·s)
  addmm   x Wᵀ then ``addmm_`` of (drop(x) Aᵀ) Bᵀ  (cuBLAS, two GEMMs + two skinny ones)
  ours    lora_kernels.lora_linear (GEMM arrangement "auto": fused or split, whichever measured faster per shape)
  ours-fused / ours-split   the same with the arrangement forced, so the record shows both and what auto chose
Modes: ``fwd`` (inference, under no_grad) and ``fwdbwd-AB`` / ``fwdbwd-B`` / ``fwdbwd-A`` (x requires grad, as in a
middle layer; gradients taken with autograd.grad so nothing accumulates).  Each shape is also checked
numerically against a float64 reference in the same run.

  python bench/bench_lora_linear.py --quick      # the target configuration (8192 tokens, 4096→4096, r=16) + 2048
  python bench/bench_lora_linear.py              # the full sweep (3 shapes × 3 token counts × 3 ranks)
  python bench/bench_lora_linear.py --smoke      # tiny CPU run that exercises the script (no performance claim)
  python bench/bench_lora_linear.py --device cpu # the PyTorch path on CPU: linear / peft / ours, interleaved

CPU mode (``--device cpu``, the default where CUDA is absent): the PyTorch path (run it with TRITON_INTERPRET
unset), one shape (``--tokens`` × ``--d-in`` → ``--d-out``, rank ``--rank``, default 2048 × 1024 → 1024, r = 16),
fp32 unless ``--dtype``; providers nn.Linear (frozen), PEFT's ``lora.Linear`` and ``lora_linear``; modes ``fwd`` and
``fwdbwd-AB`` / ``fwdbwd-B`` (dX required) at dropout 0 and 0.1.  Triton's do_bench needs CUDA, so each provider is
timed with ``time.perf_counter`` after a warm-up, ``--reps`` rounds (≥ 15) with the providers interleaved in a
rotating order inside each round; ``ms`` is the median, ``ratio`` the median over rounds of the per-round ratio to
nn.Linear (robust to load drifting during the run), ``ratio_of_medians`` the plain quotient.  Numerics in the same
run: ours vs float64 and ours vs PEFT (dropout 0: y, dx, dA, dB).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import (Budget, bench_ms, environment, markdown_table, peak_mem_bytes, plot_ratios,  # noqa: E402
                   saved_activation_bytes, write_csv)

from lora_kernels import lora_linear, lora_linear_ref  # noqa: E402
from lora_kernels.ops import ARRANGEMENTS, gemm_arrangement, gemm_arrangement_report  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    d_out: int


LLAMA2_7B = (Shape("q/o 4096→4096", 4096, 4096), Shape("up 4096→11008", 4096, 11008),
             Shape("down 11008→4096", 11008, 4096))
MODES = ("fwd", "fwdbwd-AB", "fwdbwd-B", "fwdbwd-A")
TRAINS = {"fwdbwd-AB": (True, True), "fwdbwd-B": (False, True), "fwdbwd-A": (True, False), "fwd": (False, False)}


def _peft_linear(base: nn.Linear, r: int, alpha: float, p: float):
    """PEFT's LoRA layer around ``base``, built through the public API (constructor signatures change)."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception:
        return None
    wrapper = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p,
                                                             target_modules=["0"]))
    return wrapper.base_model.model[0]


class _TorchLoRA(nn.Module):
    """PEFT's composition in plain torch, for machines without peft."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, p: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.drop = nn.Dropout(p)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scaling


def _flops(n: int, d_in: int, d_out: int, r: int, mode: str) -> float:
    fwd = 2.0 * n * d_in * d_out + 2.0 * n * r * (d_in + d_out)
    if mode == "fwd":
        return fwd
    a_tr, b_tr = TRAINS[mode]
    bwd = 2.0 * n * d_out * d_in + 2.0 * n * r * (d_out + d_in)
    bwd += (2.0 * n * r * d_in if a_tr else 0.0) + (2.0 * n * d_out * r if b_tr else 0.0)
    return fwd + bwd


def build_case(shape: Shape, n: int, r: int, p: float, dtype, device):
    """One set of weights shared by every provider (random, never zero: B is random too)."""
    base = nn.Linear(shape.d_in, shape.d_out, device=device, dtype=dtype).requires_grad_(False)
    a = (torch.randn(r, shape.d_in, device=device) / shape.d_in**0.5).to(dtype)
    b = (torch.randn(shape.d_out, r, device=device) / r**0.5).to(dtype)
    x = torch.randn(n, shape.d_in, device=device, dtype=dtype)
    g = torch.randn(n, shape.d_out, device=device, dtype=dtype)
    return base, a, b, x, g


def providers(base: nn.Linear, a, b, r: int, p: float, mode: str) -> Dict[str, tuple]:
    """name -> (forward callable of x, adapter tensors that train in this mode, every parameter it holds)."""
    a_tr, b_tr = TRAINS[mode]
    scale = 1.0  # lora_alpha = r
    A = a.clone().requires_grad_(a_tr)
    B = b.clone().requires_grad_(b_tr)
    out: Dict[str, tuple] = {"linear": (lambda x: F.linear(x, base.weight, base.bias), [], [base.weight, base.bias])}

    peft = _peft_linear(base, r, float(r), p)
    if peft is None:
        peft = _TorchLoRA(base, r, float(r), p)
        pa, pb = peft.lora_A.weight, peft.lora_B.weight
        label = "peft-like"
    else:
        pa, pb = peft.lora_A["default"].weight, peft.lora_B["default"].weight
        label = "peft"
    with torch.no_grad():
        pa.copy_(a)
        pb.copy_(b)
    pa.requires_grad_(a_tr)
    pb.requires_grad_(b_tr)
    peft.train(p > 0)
    out[label] = (peft, [t for t, tr in ((pa, a_tr), (pb, b_tr)) if tr], list(peft.parameters()))

    def addmm(x):
        y = F.linear(x, base.weight, base.bias)
        t = F.dropout(x, p, training=p > 0) @ A.t()
        return y.addmm_(t, B.t(), alpha=scale)

    trainable = [t for t, tr in ((A, a_tr), (B, b_tr)) if tr]
    out["addmm"] = (addmm, trainable, [base.weight, base.bias, A, B])
    out["ours"] = (lambda x: lora_linear(x, base.weight, base.bias, A, B, scale, p), trainable,
                   [base.weight, base.bias, A, B])
    for arrangement in ARRANGEMENTS:  # forced around forward and backward alike by _time_mode
        out[f"ours-{arrangement}"] = out["ours"]
    return out


def _arrangement_of(provider: str):
    """The context that forces an "ours-<arrangement>" provider's GEMMs, forward and backward."""
    name = provider.split("-", 1)[1] if provider.startswith("ours-") else None
    return gemm_arrangement(name) if name in ARRANGEMENTS else contextlib.nullcontext()


def check_numerics(base, a, b, x, g, p) -> Dict[str, float]:
    """Relative errors vs float64 of ours and of torch in the same dtype (AB mode, same dropout mask)."""
    from lora_kernels import dropout_mask

    seed = 1234
    A = a.clone().requires_grad_()
    B = b.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    y = lora_linear(xx, base.weight, base.bias, A, B, 1.0, p, seed=seed)
    got = [y] + list(torch.autograd.grad(y, [xx, A, B], g))
    mask = dropout_mask(seed, tuple(x.shape), p, x.device) if p > 0 else None
    res = {}
    for kind, dt in (("ref", torch.float64), ("torch", x.dtype)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, a, b)]
        yr = lora_linear_ref(leaves[0], base.weight.to(dt), base.bias.to(dt), leaves[1], leaves[2], 1.0, p,
                             dropout_mask=mask)
        res[kind] = [yr] + list(torch.autograd.grad(yr, leaves, g.to(dt)))
    errs = {}
    for name, o, r64, same in zip(("y", "dx", "dA", "dB"), got, res["ref"], res["torch"]):
        r64 = r64.double()
        errs[f"err_{name}"] = ((o.double() - r64).norm() / r64.norm()).item()
        errs[f"err_torch_{name}"] = ((same.double() - r64).norm() / r64.norm()).item()
    return errs


def run(shapes, tokens, ranks, dropouts, modes, dtype, device, out_dir: Optional[str], tag: str,
        budget: Optional[Budget] = None) -> List[dict]:
    """Cases run in the order given (most important first); each case's rows are appended to the CSV as soon as
    it finishes, so an interrupted run keeps what it measured."""
    rows: List[dict] = []
    budget = budget or Budget()
    env = environment()
    print(f"# bench_lora_linear  {env}")
    csv_path = os.path.join(out_dir, f"lora_linear_{tag}.csv") if out_dir else None
    for shape in shapes:
        for n in tokens:
            for r in ranks:
                for p in dropouts:
                    if not budget.allows(f"{shape.name} N={n} r={r} p={p}"):
                        continue
                    base, a, b, x, g = build_case(shape, n, r, p, dtype, device)
                    errs = check_numerics(base, a, b, x, g, p)
                    print(f"{shape.name} N={n} r={r} p={p}: rel err ours/torch "
                          + " ".join(f"{k}={errs['err_' + k]:.2e}/{errs['err_torch_' + k]:.2e}"
                                     for k in ("y", "dx", "dA", "dB")))
                    case_rows = []
                    for mode in modes:
                        if mode == "fwd" and p > 0:
                            continue  # inference has no dropout
                        case_rows += _time_mode(shape, n, r, p, mode, base, a, b, x, g, errs)
                    rows += case_rows
                    if csv_path:
                        write_csv(csv_path, case_rows)
                    del base, a, b, x, g
                    if device == "cuda":
                        torch.cuda.empty_cache()
    if out_dir and rows:
        png = os.path.join(out_dir, f"lora_linear_{tag}.png")
        plot_rows = [dict(r, case=f"{r['shape'].split()[0]} N{r['tokens']} r{r['r']} p{r['dropout']} {r['mode']}")
                     for r in rows if r["provider"] != "linear"]
        plot_ratios(png, plot_rows, "case", "provider", "ratio", f"time / nn.Linear ({env['device']}, {dtype})")
        print(f"wrote {csv_path}" + (f" and {png}" if os.path.exists(png) else ""))
        arr = [dict(zip(("pass", "device", "dtype", "m_bucket", "n", "k", "r", "bias", "dropout", "tma"), key), **v)
               for key, v in gemm_arrangement_report().items()]
        if arr:
            write_csv(os.path.join(out_dir, f"lora_linear_{tag}_arrangements.csv"), arr)
            print("GEMM arrangement measured by 'auto' (per pass and shape bucket):")
            print(markdown_table(arr, list(arr[0].keys())))
    cols = ["shape", "tokens", "r", "dropout", "mode", "provider", "ms", "ratio", "tflops", "peak_mb", "saved_mb"]
    print(markdown_table(rows, cols))
    print(f"# {budget.summary()}")
    return rows


def _time_mode(shape, n, r, p, mode, base, a, b, x, g, errs) -> List[dict]:
    rows = []
    provs = providers(base, a, b, r, p, mode)
    linear_ms = None
    for name, (fwd, trainable, params) in provs.items():
        if mode == "fwd":
            def fn(fwd=fwd, name=name):
                with torch.no_grad(), _arrangement_of(name):
                    return fwd(x)
            saved = 0
        else:
            xx = x.clone().requires_grad_()

            def fn(fwd=fwd, trainable=trainable, xx=xx, name=name):
                with _arrangement_of(name):
                    y = fwd(xx)
                    return torch.autograd.grad(y, [xx] + trainable, g)
            saved = saved_activation_bytes(lambda fwd=fwd, xx=xx: fwd(xx), params)
        fn()  # autotuning / compilation outside the timed region
        ms = bench_ms(fn)
        peak = peak_mem_bytes(fn)
        if name == "linear":
            linear_ms = ms
        rows.append(dict(shape=shape.name, d_in=shape.d_in, d_out=shape.d_out, tokens=n, r=r, dropout=p, mode=mode,
                         provider=name, ms=ms, ratio=ms / linear_ms, tflops=_flops(n, shape.d_in, shape.d_out, r, mode)
                         / ms / 1e9, peak_mb=peak / 2**20, saved_mb=saved / 2**20, **errs))
    return rows


# --------------------------------------------------------------------------------------------------------------
# CPU mode: the PyTorch path against nn.Linear and PEFT, interleaved in one process
# --------------------------------------------------------------------------------------------------------------

CPU_PROVIDERS = ("linear", "peft", "ours")
CPU_MODES = ("fwd", "fwdbwd-AB", "fwdbwd-B")
_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_vs_peft(base, a, b, x, g) -> Dict[str, float]:
    """Relative error of ours against PEFT's layer (dropout 0, AB mode): y, dx, dA, dB in the run's dtype."""
    peft = _peft_linear(base, a.shape[0], float(a.shape[0]), 0.0)
    if peft is None:
        return {}
    pa, pb = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    with torch.no_grad():
        pa.copy_(a)
        pb.copy_(b)
    outs = {}
    for name in ("peft", "ours"):
        xx = x.clone().requires_grad_()
        if name == "peft":
            leaves = [xx, pa.requires_grad_(), pb.requires_grad_()]
            y = peft(xx)
        else:
            leaves = [xx, a.clone().requires_grad_(), b.clone().requires_grad_()]
            y = lora_linear(xx, base.weight, base.bias, leaves[1], leaves[2], 1.0, 0.0)
        outs[name] = [y] + list(torch.autograd.grad(y, leaves, g))
    return {f"err_vs_peft_{k}": ((o.double() - q.double()).norm() / q.double().norm().clamp_min(1e-30)).item()
            for k, o, q in zip(("y", "dx", "dA", "dB"), outs["ours"], outs["peft"])}


def time_interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2):
    """{name: [ms per round]}: every round calls each fn once, in an order rotated from round to round."""
    names = list(fns)
    for _ in range(warmup):
        for nm in names:
            fns[nm]()
    times: Dict[str, List[float]] = {nm: [] for nm in names}
    for i in range(reps):
        k = i % len(names)
        for nm in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[nm]()
            times[nm].append((time.perf_counter() - t0) * 1e3)
    return times


def _cpu_fn(fwd, trainable, x, g, mode):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return fwd(x)
        return fn
    xx = x.clone().requires_grad_()

    def fn():
        y = fwd(xx)
        return torch.autograd.grad(y, [xx] + trainable, g)
    return fn


def run_cpu(n: int, d_in: int, d_out: int, r: int, dropouts, dtype, reps: int, out_dir: Optional[str], tag: str,
            extra_providers: Optional[Callable] = None) -> List[dict]:
    """The CPU table: ms, ratio to nn.Linear (same run), saved bytes and numerics per (dropout, mode, provider).

    ``extra_providers(base, a, b, r, p, mode) -> {name: (fwd, trainable, params)}`` adds providers (experiments)."""
    if reps < 15:
        raise SystemExit("--reps must be at least 15 (medians of fewer rounds are too noisy on a shared CPU)")
    from lora_kernels.ops.lora_linear import dispatch

    if dispatch.backend(torch.empty(0, dtype=dtype), r) is not dispatch.torch_path:
        raise SystemExit("--device cpu times the PyTorch path: unset TRITON_INTERPRET (it routes CPU tensors to "
                         "the Triton interpreter)")
    env = environment()
    shape = Shape(f"{d_in}→{d_out}", d_in, d_out)
    print(f"# bench_lora_linear --device cpu  {env}  threads={torch.get_num_threads()}  dtype={dtype}  "
          f"N={n} {shape.name} r={r}  reps={reps}")
    rows: List[dict] = []
    csv_path = os.path.join(out_dir, f"lora_linear_{tag}.csv") if out_dir else None
    for p in dropouts:
        base, a, b, x, g = build_case(shape, n, r, p, dtype, "cpu")
        errs = check_numerics(base, a, b, x, g, p)
        if p == 0.0:
            errs.update(check_vs_peft(base, a, b, x, g))
        print(f"p={p}: rel err vs float64 ours/torch " + " ".join(
            f"{k}={errs['err_' + k]:.2e}/{errs['err_torch_' + k]:.2e}" for k in ("y", "dx", "dA", "dB"))
            + ("" if p else "; ours vs peft " + " ".join(
                f"{k}={errs.get('err_vs_peft_' + k, float('nan')):.2e}" for k in ("y", "dx", "dA", "dB"))))
        case_rows = []
        for mode in CPU_MODES:
            if mode == "fwd" and p > 0:
                continue  # inference has no dropout
            provs = {k: v for k, v in providers(base, a, b, r, p, mode).items()
                     if k in CPU_PROVIDERS or k == "peft-like"}
            if extra_providers is not None:
                provs.update(extra_providers(base, a, b, r, p, mode))
            fns = {nm: _cpu_fn(fwd, tr, x, g, mode) for nm, (fwd, tr, _) in provs.items()}
            times = time_interleaved(fns, reps)
            lin = times["linear"]
            for nm, (fwd, tr, params) in provs.items():
                saved = 0 if mode == "fwd" else saved_activation_bytes(
                    lambda fwd=fwd, xx=x.clone().requires_grad_(): fwd(xx), params)
                ms = statistics.median(times[nm])
                case_rows.append(dict(
                    shape=shape.name, d_in=d_in, d_out=d_out, tokens=n, r=r, dropout=p, mode=mode, provider=nm,
                    dtype=str(dtype).replace("torch.", ""), ms=ms, ms_min=min(times[nm]),
                    ratio=statistics.median(t / lt for t, lt in zip(times[nm], lin)),
                    ratio_of_medians=ms / statistics.median(lin), reps=reps,
                    tflops=_flops(n, d_in, d_out, r, mode) / ms / 1e9, saved_mb=saved / 2**20, **errs))
            line = "  ".join(f"{row['provider']} {row['ms']:.1f} ms ({row['ratio']:.3f}x)" for row in case_rows
                             if row["mode"] == mode)
            print(f"p={p} {mode}: {line}", flush=True)
        rows += case_rows
        if csv_path:
            write_csv(csv_path, case_rows)
    cols = ["dtype", "dropout", "mode", "provider", "ms", "ms_min", "ratio", "ratio_of_medians", "saved_mb"]
    print(markdown_table(rows, cols))
    if csv_path:
        print(f"wrote {csv_path}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="target configuration only")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run exercising the script")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default=None, help="CSV/PNG name suffix (default: quick/full/smoke)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new case after this many seconds (0: no limit); skipped cases are listed")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="cuda (the kernels; default when CUDA is available) or cpu (the PyTorch path vs PEFT)")
    ap.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32", help="CPU mode: compute dtype")
    ap.add_argument("--tokens", type=int, default=2048, help="CPU mode: N")
    ap.add_argument("--d-in", type=int, default=1024, help="CPU mode: in_features")
    ap.add_argument("--d-out", type=int, default=1024, help="CPU mode: out_features")
    ap.add_argument("--rank", type=int, default=16, help="CPU mode: r")
    ap.add_argument("--reps", type=int, default=21, help="CPU mode: timed rounds (≥ 15)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.smoke:
        return run_cpu(args.tokens, args.d_in, args.d_out, args.rank, (0.0, 0.1), _DTYPES[args.dtype], args.reps,
                       args.out, args.tag or f"cpu_{args.dtype}")
    if args.smoke:
        shapes, tokens, ranks, dropouts = (Shape("tiny 64→48", 64, 48),), (37,), (4,), (0.0, 0.1)
        dtype, device = torch.float32, "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_lora_linear --device cuda needs a CUDA GPU (--device cpu times the PyTorch path)")
        dtype, device = torch.bfloat16, "cuda"
        if args.quick:
            shapes, tokens, ranks, dropouts = LLAMA2_7B[:1], (8192, 2048), (16,), (0.0, 0.1)
        else:
            shapes, tokens, ranks, dropouts = LLAMA2_7B, (2048, 8192, 16384), (8, 16, 64), (0.0, 0.1)
    tag = args.tag or ("smoke" if args.smoke else "quick" if args.quick else "full")
    return run(shapes, tokens, ranks, dropouts, MODES, dtype, device, args.out, tag, Budget(args.budget_s))


if __name__ == "__main__":
    main()
