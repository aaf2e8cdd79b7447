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

QLoRA (``--qlora``): a frozen 4-bit NF4 base (double quantization, blocksize 64, no bias), one weight shared by every
provider, adapters in fp32 on a 16-bit compute dtype (PEFT's default), lora_alpha = r:
  nf4-dequant+linear   the frozen base alone: our dequantization + F.linear, re-dequantized for dX as bitsandbytes'
                       MatMul4Bit does (the floor, as nn.Linear is above)
  peft-bnb             PEFT's lora.Linear4bit on a bitsandbytes Linear4bit, where bitsandbytes imports and works on
                       the device (else skipped, the reason printed); bitsandbytes then quantizes W and the others
                       read its codes in place
  peft-style           PEFT's Linear4bit composition with the floor as its base: base(x).clone() +
                       lora_B(lora_A(dropout(x))) · s in the adapters' dtype, plain autograd
  ours-AB, ours-B      lora_linear on the NF4Tensor (arrangement "auto"; on CUDA also -fused / -split forced)
Modes ``fwd`` (no_grad; ours-B is then ours-AB's call, so only ours-AB is timed) and ``fwdbwd`` (dX required; PEFT
trains A and B, ours-AB A and B, ours-B B only).  Columns: ms, ``ratio`` to the floor in the same run,
``speedup_vs_peft`` (time of peft-bnb, or of peft-style where bitsandbytes is absent -- column ``vs`` -- over this
provider's), ``peak_mb`` / ``peak_vs_peft`` (CUDA: max_memory_allocated above what was allocated before; blank on CPU),
``saved_mb`` (saved_tensors_hooks), and per provider the relative errors of y, dx, dA, dB vs float64 on the
dequantized W (at dropout > 0 for ours only, whose mask is reproducible from its seed).  Target: ours-B fwd+bwd at
least 1.5x faster than PEFT + bitsandbytes at no more peak memory (printed last).

  python bench/bench_lora_linear.py --qlora               # CUDA: 8192 tokens x 4096→4096 and 4096→11008, r=16, bf16
  python bench/bench_lora_linear.py --qlora --device cpu  # the PyTorch path: 512 x 1024→1024, r=16, fp32, interleaved
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

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # helpers; lora_kernels from this checkout
from utils import (Budget, bench_ms, environment, markdown_table, peak_mem_bytes, plot_ratios,  # noqa: E402
                   saved_activation_bytes, write_csv)

from lora_kernels import lora_linear, lora_linear_ref  # noqa: E402
from lora_kernels.ops import ARRANGEMENTS, gemm_arrangement, gemm_arrangement_report  # noqa: E402
from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight  # noqa: E402
from lora_kernels.quant import NF4Tensor, dequantize_nf4_ref, nf4_from_bnb, quantize_nf4  # noqa: E402
from tests.helpers import rel_err  # noqa: E402  (the checkout's tests: the same relative error as the test suite)


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
    """PEFT's composition in plain torch, for machines without peft (``lora.Linear.forward``).  With
    ``adapter_dtype`` and ``clone_base`` it is ``lora.Linear4bit.forward``: the base output defensively cloned, the
    adapters in their own dtype (fp32 on a 16-bit base: PEFT's ``autocast_adapter_dtype``), x cast to it for the
    branch and the branch cast back before the sum.  Dropout is ``nn.Identity`` at p = 0, as in PEFT."""

    def __init__(self, base: nn.Module, r: int, alpha: float, p: float, adapter_dtype=None, clone_base: bool = False):
        super().__init__()
        self.base = base
        dt = adapter_dtype or base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=dt)
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling = alpha / r
        self.clone_base = clone_base

    def forward(self, x):
        y = self.base(x)
        if self.clone_base:
            y = y.clone()
        out = self.lora_B(self.lora_A(self.drop(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return y + out.to(y.dtype)


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
    """The context that forces an "ours-...-<arrangement>" provider's GEMMs, forward and backward."""
    name = provider.rsplit("-", 1)[-1] if provider.startswith("ours-") else None
    return gemm_arrangement(name) if name in ARRANGEMENTS else contextlib.nullcontext()


def _reference_outputs(x, w, bias, a, b, g, p, mask, dt=None, scale: float = 1.0) -> list:
    """[y, dx, dA, dB] of ``lora_linear_ref`` with every operand cast to ``dt`` (None: each in its own dtype, i.e.
    PEFT's composition for fp32 adapters on a 16-bit x), dropout by ``mask``."""
    cast = (lambda t: t.to(dt)) if dt is not None else (lambda t: t)
    leaves = [cast(t.detach()).requires_grad_() for t in (x, a, b)]
    y = lora_linear_ref(leaves[0], cast(w), cast(bias) if bias is not None else None, leaves[1], leaves[2], scale, p,
                        dropout_mask=mask)
    return [y] + list(torch.autograd.grad(y, leaves, cast(g)))


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
    ref = _reference_outputs(x, base.weight, base.bias, a, b, g, p, mask, torch.float64)
    same = _reference_outputs(x, base.weight, base.bias, a, b, g, p, mask, x.dtype)
    errs = {}
    for name, o, r64, t in zip(("y", "dx", "dA", "dB"), got, ref, same):
        errs[f"err_{name}"] = rel_err(o, r64)
        errs[f"err_torch_{name}"] = rel_err(t, r64)
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
        arr = arrangement_rows()
        if arr:
            write_csv(os.path.join(out_dir, f"lora_linear_{tag}_arrangements.csv"), arr)
            print("GEMM arrangement measured by 'auto' (per pass and shape bucket):")
            print(markdown_table(arr, list(arr[0].keys())))
    cols = ["shape", "tokens", "r", "dropout", "mode", "provider", "ms", "ratio", "tflops", "peak_mb", "saved_mb"]
    print(markdown_table(rows, cols))
    print(f"# {budget.summary()}")
    return rows


def _measure(provs: Dict[str, tuple], x, g, mode: str) -> Dict[str, tuple]:
    """{name: (ms, peak bytes, saved bytes)} of each provider, one after the other (do_bench medians on CUDA):
    ``fwd`` under no_grad, any other mode forward + backward to x and the provider's trainable tensors."""
    out = {}
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
        out[name] = (bench_ms(fn), peak_mem_bytes(fn), saved)
    return out


ARRANGEMENT_FIELDS = ("pass", "device_index", "dtype", "m_bucket", "n", "k", "r", "bias", "dropout", "tma",
                      "input_precision", "autotune", "lora_dtype", "weight")


def arrangement_rows() -> List[dict]:
    """What "auto" measured so far in this process, one row per key (``gemm_arrangement_report``), its fields named."""
    return [dict(zip(ARRANGEMENT_FIELDS, key), **v) for key, v in gemm_arrangement_report().items()]


def _time_mode(shape, n, r, p, mode, base, a, b, x, g, errs) -> List[dict]:
    rows = []
    measured = _measure(providers(base, a, b, r, p, mode), x, g, mode)
    linear_ms = measured["linear"][0]
    for name, (ms, peak, saved) in measured.items():
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
    return {f"err_vs_peft_{k}": rel_err(o, q) for k, o, q in zip(("y", "dx", "dA", "dB"), outs["ours"], outs["peft"])}


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


def _check_cpu_run(dtype, r: int, reps: int) -> None:
    """CPU mode's preconditions: enough rounds for a median, and the PyTorch path actually serving the calls."""
    if reps < 15:
        raise SystemExit("--reps must be at least 15 (medians of fewer rounds are too noisy on a shared CPU)")
    from lora_kernels.ops.lora_linear import dispatch

    if dispatch.backend(torch.empty(0, dtype=dtype), r) is not dispatch.torch_path:
        raise SystemExit("--device cpu times the PyTorch path: unset TRITON_INTERPRET (it routes CPU tensors to "
                         "the Triton interpreter)")


def _round_ratio(times: List[float], ref: List[float]) -> float:
    """Median over interleaved rounds of the per-round ratio (robust to load drifting during the run)."""
    return statistics.median(t / rt for t, rt in zip(times, ref))


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
    _check_cpu_run(dtype, r, reps)
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
                    ratio=_round_ratio(times[nm], lin),
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


# --------------------------------------------------------------------------------------------------------------
# QLoRA (--qlora): a frozen 4-bit NF4 base, double quantization, blocksize 64
# --------------------------------------------------------------------------------------------------------------

QLORA_SHAPES = LLAMA2_7B[:2]
QLORA_MODES = ("fwd", "fwdbwd")
FLOOR_4BIT = "nf4-dequant+linear"
QLORA_TARGET = 1.5  # ours-B fwd+bwd at least this much faster than PEFT + bitsandbytes, at no more peak memory
_SEED = 1234  # the dropout seed of the numerics check (ours only: PEFT's mask comes from torch's generator)
_bnb_why: Dict[str, Optional[str]] = {}


class _NF4Matmul(torch.autograd.Function):
    """x Ŵᵀ + b the way bitsandbytes' ``MatMul4Bit`` does it: Ŵ dequantized (our kernel on CUDA) for the product and
    again for dX; nothing W-sized is saved, the codes are held by reference.  The bias is frozen."""

    @staticmethod
    def forward(ctx, x, w: NF4Weight, bias):
        ctx.w = w
        return w.linear(x, bias)

    @staticmethod
    def backward(ctx, g):
        return (ctx.w.grad_input(g) if ctx.needs_input_grad[0] else None), None, None


class _NF4Base(nn.Module):
    """A frozen 4-bit linear computing as bitsandbytes' ``Linear4bit`` (the base of the peft-style composition)."""

    def __init__(self, q: NF4Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.nf4 = NF4Weight(q)
        self.out_features, self.in_features = q.shape
        self.weight = q.packed  # a plain attribute (the codes): its device places the adapters
        self.bias = bias

    def forward(self, x):
        return _NF4Matmul.apply(x, self.nf4, self.bias)


def _peft_qlora_layer(w: torch.Tensor, r: int, p: float, compute_dtype, device) -> nn.Module:
    """PEFT's ``lora.Linear4bit`` (r, lora_alpha = r, lora_dropout = p, its default fp32 adapters) around a
    bitsandbytes NF4 ``Linear4bit`` (double quantization, blocksize 64, no bias) quantizing ``w`` on ``device``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    kw = dict(compress_statistics=True, quant_type="nf4")
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=compute_dtype, **kw)
    layer.weight = bnb.nn.Params4bit(w.detach().float().cpu(), requires_grad=False, blocksize=64, module=layer, **kw)
    model = nn.Sequential(layer.to(device))  # bitsandbytes quantizes the weight on this first move
    model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it: PEFT's 4-bit dispatch
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=p, target_modules=["0"]))
    return peft_model.base_model.model[0]


def bnb_unusable(device) -> Optional[str]:
    """Why PEFT + bitsandbytes cannot be measured on ``device`` (None when it can): peft or bitsandbytes does not
    import, or a small PEFT 4-bit layer fails there, or its base disagrees with the dequantized codes it holds."""
    key = str(device)
    if key not in _bnb_why:
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        except Exception as exc:
            _bnb_why[key] = f"not importable ({type(exc).__name__}: {str(exc)[:100]})"
            return _bnb_why[key]
        try:
            gen = torch.Generator().manual_seed(0)
            layer = _peft_qlora_layer(torch.randn(32, 64, generator=gen) / 8, 2, 0.0, torch.float32, device)
            x = torch.randn(3, 64, generator=gen).to(device).requires_grad_()
            y = layer.base_layer(x)
            y.sum().backward()
            err = rel_err(y, x.detach() @ dequantize_nf4_ref(nf4_from_bnb(layer.base_layer)).t())
            _bnb_why[key] = None if err <= 1e-5 else (f"its Linear4bit on {key} disagrees with its own dequantized "
                                                      f"codes (rel err {err:.1e})")
        except Exception as exc:
            _bnb_why[key] = f"fails on {key} ({type(exc).__name__}: {str(exc)[:120]})"
    return _bnb_why[key]


@dataclass
class QLoRACase:
    shape: Shape
    n: int
    r: int
    p: float
    q: NF4Tensor
    bias: Optional[torch.Tensor]
    a: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor
    g: torch.Tensor
    peft_bnb: Optional[nn.Module]  # PEFT's lora.Linear4bit whose base holds q (None: see bnb_note)
    bnb_note: str
    nf4_from: str  # who quantized W: "bitsandbytes" (read in place by the others) or "quantize_nf4"


def build_qlora_case(shape: Shape, n: int, r: int, p: float, dtype, device, with_bnb: bool = True) -> QLoRACase:
    """One NF4 weight shared by every provider: a random W, double quantization, blocksize 64, compute ``dtype``.
    Where PEFT + bitsandbytes works on the device, bitsandbytes quantizes W inside PEFT's layer and every other
    provider reads those very codes (``nf4_from_bnb``, no copy); elsewhere ``quantize_nf4`` (the same codes, up to
    bitsandbytes' CPU library's nested-scale rounding).  No bias (LLaMA's projections have none).  Adapters (B
    random, never zero) in fp32 on a 16-bit compute dtype, as PEFT's default, else in the compute dtype."""
    w = torch.randn(shape.d_out, shape.d_in, device=device) / shape.d_in**0.5
    adt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    a = (torch.randn(r, shape.d_in, device=device) / shape.d_in**0.5).to(adt)
    b = (torch.randn(shape.d_out, r, device=device) / r**0.5).to(adt)
    x = torch.randn(n, shape.d_in, device=device, dtype=dtype)
    g = torch.randn(n, shape.d_out, device=device, dtype=dtype)
    why = bnb_unusable(device) if with_bnb else "not requested"
    if why is None:
        layer = _peft_qlora_layer(w, r, p, dtype, device)
        q, note, source = nf4_from_bnb(layer.base_layer), "", "bitsandbytes"
    else:
        layer, note, source = None, f"peft-bnb skipped: PEFT + bitsandbytes {why}", "quantize_nf4"
        q = quantize_nf4(w, 64, double_quant=True, compute_dtype=dtype)
    return QLoRACase(shape, n, r, p, q, None, a, b, x, g, layer, note, source)


def _trains(provider: str) -> str:
    return "-" if provider == FLOOR_4BIT else "B" if provider.startswith("ours-B") else "AB"


def qlora_providers(case: QLoRACase, variants=()) -> Dict[str, tuple]:
    """name -> (fwd(x, seed=None), trainable tensors, tensors it holds), all on the case's one NF4 weight:
      nf4-dequant+linear  the frozen base alone (the floor; its backward computes dX only)
      peft-bnb            PEFT's lora.Linear4bit on bitsandbytes' Linear4bit (only where case.peft_bnb exists)
      peft-style          the same composition with our dequantization + F.linear as the base (``_TorchLoRA``)
      ours-AB, ours-B     lora_linear on the NF4Tensor (arrangement "auto"); ``variants`` ("fused", "split") add
                          ours-AB-fused ... with the arrangement forced
    PEFT trains A and B (its default); every adapter starts from the case's a, b; lora_alpha = r (scale 1)."""
    q, bias, p = case.q, case.bias, case.p
    held = [t for t in (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, bias) if t is not None]
    base = _NF4Base(q, bias)
    out = {FLOOR_4BIT: (lambda x, seed=None: base(x), [], held)}
    peft_mods = {}
    if case.peft_bnb is not None:
        peft_mods["peft-bnb"] = (case.peft_bnb, case.peft_bnb.lora_A["default"], case.peft_bnb.lora_B["default"])
    style = _TorchLoRA(base, case.r, float(case.r), p, adapter_dtype=case.a.dtype, clone_base=True)
    peft_mods["peft-style"] = (style, style.lora_A, style.lora_B)
    for name, (mod, la, lb) in peft_mods.items():
        with torch.no_grad():
            la.weight.copy_(case.a)
            lb.weight.copy_(case.b)
        mod.train()  # always: a bitsandbytes layer in eval mode repacks its codes for its CPU kernel
        trainable = [la.weight.requires_grad_(), lb.weight.requires_grad_()]
        out[name] = (lambda x, seed=None, mod=mod: mod(x), trainable, held + list(mod.parameters()))
    for mode in ("AB", "B"):
        A = case.a.clone().requires_grad_(mode == "AB")
        B = case.b.clone().requires_grad_()
        entry = (lambda x, seed=None, A=A, B=B: lora_linear(x, q, bias, A, B, 1.0, p, seed=seed),
                 [A, B] if mode == "AB" else [B], held + [A, B])
        for v in ("",) + tuple(variants):
            out[f"ours-{mode}" + (f"-{v}" if v else "")] = entry
    return out


def _mode_providers(provs: Dict[str, tuple], mode: str) -> Dict[str, tuple]:
    """The providers timed in ``mode``: in fwd (no_grad) ours-B is the very call ours-AB makes, so it is left out."""
    return {k: v for k, v in provs.items() if not (mode == "fwd" and k.startswith("ours-B"))}


def _peft_ref(names) -> str:
    return "peft-bnb" if "peft-bnb" in names else "peft-style"


def check_qlora_numerics(case: QLoRACase, provs: Dict[str, tuple]) -> Dict[str, Dict[str, object]]:
    """Per provider, the relative errors of y, dx and the gradients of what it trains, against float64 on the
    dequantized Ŵ (in the compute dtype: the values every provider multiplies by); "torch": the same composition
    in the run's dtypes (``lora_linear_ref``, PEFT's casts), the yardstick of the bounds.  At p > 0 only ours (its
    mask is reproducible from the seed; PEFT's comes from torch's generator), with the same mask in the reference."""
    from lora_kernels import dropout_mask

    x, g, p = case.x, case.g, case.p
    w_hat = dequantize_nf4_ref(case.q)
    mask = dropout_mask(_SEED, tuple(x.shape), p, x.device, dtype=x.dtype, r=case.r) if p > 0 else None
    keys = ("y", "dx", "dA", "dB")
    ref = dict(zip(keys, _reference_outputs(x, w_hat, case.bias, case.a, case.b, g, p, mask, torch.float64)))
    same = _reference_outputs(x, w_hat, case.bias, case.a, case.b, g, p, mask)
    out: Dict[str, Dict[str, object]] = {"torch": {f"err_torch_{k}": rel_err(t, ref[k]) for k, t in zip(keys, same)}}
    for name, (fwd, trainable, _) in provs.items():
        if name == FLOOR_4BIT or (p > 0 and not name.startswith("ours-")):
            continue
        xx = x.clone().requires_grad_()
        with _arrangement_of(name):
            y = fwd(xx, seed=_SEED)
            got = [y] + list(torch.autograd.grad(y, [xx] + trainable, g))
        outs = ("y", "dx") + (("dB",) if _trains(name) == "B" else ("dA", "dB"))
        out[name] = dict({f"err_{k}": "" for k in keys}, **{f"err_{k}": rel_err(o, ref[k]) for k, o in zip(outs, got)})
    return out


def _qlora_rows(case: QLoRACase, mode: str, stats: Dict[str, dict], numerics) -> List[dict]:
    rows = []
    for name, st in stats.items():
        row = dict(shape=case.shape.name, d_in=case.shape.d_in, d_out=case.shape.d_out, tokens=case.n, r=case.r,
                   dropout=case.p, mode=mode, provider=name, trains=_trains(name),
                   dtype=str(case.x.dtype).replace("torch.", ""), adapter_dtype=str(case.a.dtype).replace("torch.", ""),
                   nf4_from=case.nf4_from, double_quant=case.q.nested, blocksize=case.q.blocksize, vs=_peft_ref(stats),
                   **st)
        row.update({f"err_{k}": "" for k in ("y", "dx", "dA", "dB")})
        row.update(numerics.get(name, {}))
        row.update(numerics["torch"])
        rows.append(row)
    return rows


def _time_qlora_mode(case: QLoRACase, mode: str, provs: Dict[str, tuple], numerics) -> List[dict]:
    """Rows of one mode, timed as ``_time_mode`` times (``_measure``): ms, ratio to the floor, speed-up over PEFT
    (peft-bnb, else peft-style) and peak memory relative to it, saved-activation MB, numerics."""
    measured = _measure(_mode_providers(provs, mode), case.x, case.g, mode)
    floor_ms = measured[FLOOR_4BIT][0]
    ref_ms, ref_peak, _ = measured[_peft_ref(measured)]
    cuda = case.x.is_cuda
    stats = {name: dict(ms=ms, ratio=ms / floor_ms, speedup_vs_peft=ref_ms / ms,
                        peak_mb=peak / 2**20 if cuda else "", peak_vs_peft=peak / ref_peak if cuda and ref_peak else "",
                        saved_mb=saved / 2**20)
             for name, (ms, peak, saved) in measured.items()}
    return _qlora_rows(case, mode, stats, numerics)


def _print_qlora_numerics(case: QLoRACase, numerics) -> None:
    line = "; ".join(f"{name} " + " ".join(_fmt_err(errs[f'err_{k}']) for k in ("y", "dx", "dA", "dB"))
                     for name, errs in numerics.items() if name != "torch")
    torch_errs = " ".join(_fmt_err(numerics["torch"][f"err_torch_{k}"]) for k in ("y", "dx", "dA", "dB"))
    print(f"{case.shape.name} N={case.n} r={case.r} p={case.p}: rel err vs float64 on the dequantized W (y dx dA dB): "
          f"{line}; torch in the run's dtypes {torch_errs}")


def _fmt_err(v) -> str:
    return f"{v:.2e}" if isinstance(v, float) else "-"


def _qlora_headline(rows: List[dict]) -> None:
    """The target line per case: ours-B fwd+bwd speed-up over PEFT and its peak memory relative to PEFT's."""
    for row in rows:
        if row["provider"] == "ours-B" and row["mode"] == "fwdbwd":
            mem = (f", peak memory {row['peak_vs_peft']:.2f}x {row['vs']}'s" if isinstance(row["peak_vs_peft"], float)
                   else "")
            print(f"# {row['shape']} N={row['tokens']} p={row['dropout']}: ours-B fwd+bwd speed-up over {row['vs']} "
                  f"{row['speedup_vs_peft']:.2f}x (target >= {QLORA_TARGET}x at no more peak memory){mem}")


_QLORA_COLS = ["shape", "tokens", "r", "dropout", "mode", "provider", "ms", "ratio", "speedup_vs_peft", "peak_mb",
               "saved_mb", "err_y", "err_dx", "err_dA", "err_dB"]


def run_qlora(shapes, n: int, r: int, dropouts, dtype, device, out_dir: Optional[str], tag: str,
              budget: Optional[Budget] = None, variants=ARRANGEMENTS) -> List[dict]:
    """The QLoRA table on CUDA (do_bench medians, providers one after the other, as ``run``)."""
    budget = budget or Budget()
    env = environment()
    print(f"# bench_lora_linear --qlora  {env}  NF4 double quant, blocksize 64, N={n}, r={r}, {dtype}")
    rows: List[dict] = []
    csv_path = os.path.join(out_dir, f"lora_linear_{tag}.csv") if out_dir else None
    for shape in shapes:
        for p in dropouts:
            if not budget.allows(f"{shape.name} N={n} r={r} p={p}"):
                continue
            case, provs, numerics = _qlora_case(shape, n, r, p, dtype, device, variants if device == "cuda" else ())
            case_rows = []
            for mode in QLORA_MODES:
                if mode == "fwd" and p > 0:
                    continue  # inference has no dropout
                case_rows += _time_qlora_mode(case, mode, provs, numerics)
            rows += case_rows
            if csv_path:
                write_csv(csv_path, case_rows)
            del case, provs
            if device == "cuda":
                torch.cuda.empty_cache()
    if out_dir and rows:
        png = os.path.join(out_dir, f"lora_linear_{tag}.png")
        plot_rows = [dict(r, case=f"{r['shape'].split()[0]} p{r['dropout']} {r['mode']}") for r in rows
                     if r["provider"] != FLOOR_4BIT]
        plot_ratios(png, plot_rows, "case", "provider", "ratio", f"time / {FLOOR_4BIT} ({env['device']}, {dtype})")
        print(f"wrote {csv_path}" + (f" and {png}" if os.path.exists(png) else ""))
    arr = [a for a in arrangement_rows() if a.get("weight") == "NF4Tensor"]
    if arr:
        if out_dir:
            write_csv(os.path.join(out_dir, f"lora_linear_{tag}_arrangements.csv"), arr)
        print("GEMM arrangement measured by 'auto' on the NF4 base (per pass and shape bucket):")
        print(markdown_table(arr, list(arr[0].keys())))
    print(markdown_table(rows, _QLORA_COLS))
    _qlora_headline(rows)
    print(f"# {budget.summary()}")
    return rows


def _qlora_case(shape, n: int, r: int, p: float, dtype, device, variants):
    """(case, providers, numerics) of one QLoRA configuration: weights drawn from seed 0, the numerics checked in
    the same run, before any timing."""
    torch.manual_seed(0)
    case = build_qlora_case(shape, n, r, p, dtype, device)
    if case.bnb_note:
        print(f"# {case.bnb_note}; the speed-up is over peft-style")
    provs = qlora_providers(case, variants)
    numerics = check_qlora_numerics(case, provs)
    _print_qlora_numerics(case, numerics)
    return case, provs, numerics


def run_qlora_cpu(n: int, d_in: int, d_out: int, r: int, dropouts, dtype, reps: int, out_dir: Optional[str],
                  tag: str) -> List[dict]:
    """The QLoRA table on CPU (the PyTorch path): providers interleaved as ``run_cpu`` times them; ``ratio`` and
    ``speedup_vs_peft`` are medians of per-round ratios; no peak memory (CUDA's allocator statistics only)."""
    _check_cpu_run(dtype, r, reps)
    shape = Shape(f"{d_in}→{d_out}", d_in, d_out)
    print(f"# bench_lora_linear --device cpu --qlora  {environment()}  threads={torch.get_num_threads()}  "
          f"dtype={dtype}  N={n} {shape.name} r={r}  NF4 double quant, blocksize 64  reps={reps}")
    rows: List[dict] = []
    csv_path = os.path.join(out_dir, f"lora_linear_{tag}.csv") if out_dir else None
    for p in dropouts:
        case, provs, numerics = _qlora_case(shape, n, r, p, dtype, "cpu", ())
        case_rows = []
        for mode in QLORA_MODES:
            if mode == "fwd" and p > 0:
                continue  # inference has no dropout
            mp = _mode_providers(provs, mode)
            times = time_interleaved({nm: _cpu_fn(fwd, tr, case.x, case.g, mode) for nm, (fwd, tr, _) in mp.items()},
                                     reps)
            floor, peft = times[FLOOR_4BIT], times[_peft_ref(mp)]
            stats = {}
            for nm, (fwd, tr, held) in mp.items():
                saved = 0 if mode == "fwd" else saved_activation_bytes(
                    lambda fwd=fwd, xx=case.x.clone().requires_grad_(): fwd(xx), held)
                ms = statistics.median(times[nm])
                stats[nm] = dict(ms=ms, ms_min=min(times[nm]), ratio=_round_ratio(times[nm], floor),
                                 ratio_of_medians=ms / statistics.median(floor),
                                 speedup_vs_peft=_round_ratio(peft, times[nm]), peak_mb="", peak_vs_peft="",
                                 saved_mb=saved / 2**20, reps=reps)
            mode_rows = _qlora_rows(case, mode, stats, numerics)
            print(f"p={p} {mode}: " + "  ".join(f"{row['provider']} {row['ms']:.1f} ms ({row['ratio']:.3f}x)"
                                                 for row in mode_rows), flush=True)
            case_rows += mode_rows
        rows += case_rows
        if csv_path:
            write_csv(csv_path, case_rows)
    cols = ["dtype", "dropout", "mode", "provider", "ms", "ms_min", "ratio", "ratio_of_medians", "speedup_vs_peft",
            "saved_mb", "err_y", "err_dx", "err_dA", "err_dB"]
    print(markdown_table(rows, cols))
    _qlora_headline(rows)
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
    ap.add_argument("--qlora", action="store_true",
                    help="the QLoRA table: a 4-bit NF4 base (double quant), PEFT + bitsandbytes / peft-style vs ours")
    ap.add_argument("--tokens", type=int, default=None, help="CPU mode: N (default 2048; 512 with --qlora)")
    ap.add_argument("--d-in", type=int, default=1024, help="CPU mode: in_features")
    ap.add_argument("--d-out", type=int, default=1024, help="CPU mode: out_features")
    ap.add_argument("--rank", type=int, default=16, help="CPU mode: r")
    ap.add_argument("--reps", type=int, default=21, help="CPU mode: timed rounds (≥ 15)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.qlora and args.smoke:
        raise SystemExit("--qlora runs on CPU with --device cpu (tiny with --tokens / --d-in / --d-out / --rank)")
    if args.qlora and device == "cpu":
        return run_qlora_cpu(args.tokens or 512, args.d_in, args.d_out, args.rank, (0.0, 0.1), _DTYPES[args.dtype],
                             args.reps, args.out, args.tag or f"qlora_cpu_{args.dtype}")
    if args.qlora:
        if not torch.cuda.is_available():
            raise SystemExit("bench_lora_linear --qlora --device cuda needs a CUDA GPU (--device cpu: the PyTorch "
                             "path)")
        shapes, dropouts = (QLORA_SHAPES[:1], (0.0,)) if args.quick else (QLORA_SHAPES, (0.0, 0.1))
        return run_qlora(shapes, 8192, 16, dropouts, torch.bfloat16, "cuda", args.out,
                         args.tag or ("qlora_quick" if args.quick else "qlora"), Budget(args.budget_s))
    if device == "cpu" and not args.smoke:
        return run_cpu(args.tokens or 2048, args.d_in, args.d_out, args.rank, (0.0, 0.1), _DTYPES[args.dtype],
                       args.reps, args.out, args.tag or f"cpu_{args.dtype}")
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
