#!/usr/bin/env python3
"""Build, on a machine without a GPU, the Triton kernel cache for sm_90 that ``bench/gpu_check.py`` would otherwise
fill by compiling on the GPU machine, so that a short GPU window spends its minutes measuring instead.

  python bench/warm_triton_cache.py OUTDIR [--jobs N] [--only correct,ratios] [--limit N] [--list]
  python3 bench/gpu_check.py RESULTS --budget 450 --warm-cache OUTDIR   # on the GPU machine, OUTDIR shipped

How.  The launches are recorded, not guessed: gpu_check's own correctness cases and the ratios / e2e stages'
operator calls run here on CPU tensors at the GPU shapes, through the real autograd Function and launchers, with
every Triton kernel's ``run`` replaced by a recorder (nothing is launched, the outputs are left uninitialised) and
with the device facts pinned to an H200's (capability 9.0, 132 SMs).  Where the GPU would time something (the
autotuner's candidates, the "auto" arrangement's two candidates) every candidate is recorded, since every one is
compiled there.  The dense cuBLAS products and the references' float64 products are not needed and are skipped (a
product's output shape only); the >2^31-element case runs at a row count the JIT specialises alike
(``standin_rows``).  Each distinct launch (kernel, the JIT binder's specialisation, constexprs, warps,
stages) is then compiled for sm_90 exactly as ``JITFunction._do_compile`` does (the binder, ``_pack_args``,
``ASTSource``, ``triton.compile``; ``bench/sm90_compile_report.py``'s helpers), into ``OUTDIR`` as Triton's cache,
binaries only.  Not recorded: the ``torch.compile`` case (inductor's own kernels); the GPU compiles those.

When the GPU machine finds a kernel here.  Triton's cache key is a hash of: Triton's own sources and its
``libtriton`` binary (so the same Triton *wheel*: same version and the same Python ABI), the ptxas version, the
target, the compile options, the cache-invalidating environment variables, and the kernel's source and
specialisation.  So build OUTDIR with the GPU machine's Python and Triton (today Python 3.12, triton 3.6.0, torch
2.11; see docs/benchmarks.md for the one-line virtual environment).  ``manifest.json`` records this machine's
fingerprint (``fingerprint()``); gpu_check compares it with the GPU machine's before the first stage and says
whether the keys can match, and its summary counts the kernels each stage found in the cache (hits) and compiled
(misses): that is the measurement.  A stale cache (kernels changed since) costs nothing but misses.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
for _p in (BENCH, REPO):  # this checkout's lora_kernels and tests first, then bench/
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

CAPABILITY = 90
SMS = 132  # an H200's (and H100 SXM's) multiprocessors: the persistent grid and the dA/dB split count read it
MANIFEST = "manifest.json"
# gpu_check's correctness cases that are not recorded here (see the module docstring)
NOT_RECORDED = ("torch.compile",)
PLANS = ("correct", "ratios")


# --------------------------------------------------------------------------------------------------------------
# What a cache entry depends on beyond the kernel: the fingerprint both machines compute
# --------------------------------------------------------------------------------------------------------------

def fingerprint(capability: int = CAPABILITY) -> Dict[str, str]:
    """The parts of Triton's cache key that come from the machine, not the kernel: Triton's version, a hash of its
    ``triton_key()`` (its sources and libtriton binary), the backend's hash for the target (ptxas version and arch),
    the cache-invalidating environment variables, and (for the record) Python's version."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.cache import triton_key

    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        env = json.dumps(sorted(get_cache_invalidating_env_vars().items()))
    except Exception as exc:  # pragma: no cover - another Triton
        env = f"unknown ({type(exc).__name__})"
    backend = str(triton.compiler.make_backend(GPUTarget("cuda", capability, 32)).hash())
    release = [ln.strip() for ln in backend.splitlines() if "release" in ln]
    return dict(triton=triton.__version__, triton_key=_short(triton_key()), backend=_short(backend),
                ptxas=release[0] if release else backend[:60], env=env, python="%d.%d" % sys.version_info[:2])


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compare_fingerprints(built: Dict[str, str], here: Dict[str, str]) -> Tuple[bool, str]:
    """(keys can match, one line saying why): every field but Python's must be equal (Python's version matters only
    through libtriton's binary, which triton_key already hashes)."""
    differ = [k for k in ("triton", "triton_key", "backend", "env") if built.get(k) != here.get(k)]
    if not differ:
        return True, (f"fingerprint matches (triton {here['triton']}, key {here['triton_key']}, {here['ptxas']}, "
                      f"backend {here['backend']}): cached kernels can be found")
    parts = ", ".join(f"{k} built {built.get(k)!r} here {here.get(k)!r}" for k in differ)
    return False, f"fingerprint differs ({parts}): no cached kernel can be found; everything compiles here"


# --------------------------------------------------------------------------------------------------------------
# Recording what the launchers launch, at the GPU's shapes, without a GPU
# --------------------------------------------------------------------------------------------------------------

def _jit_kernels() -> list:
    """Every @triton.jit kernel of the package that a launcher calls (the modules' JITFunction attributes)."""
    import importlib

    from triton.runtime.jit import JITFunction

    found = {}
    for name in ("lora_kernels.ops.lora_linear.kernels", "lora_kernels.ops.lora_linear.nf4_kernels"):
        mod = importlib.import_module(name)
        for v in vars(mod).values():
            if isinstance(v, JITFunction):
                found[id(v)] = v
    return list(found.values())


class Recorder:
    """The distinct launches seen: {(kernel name, specialisation, flags): (kernel, args stand-ins, kwargs)}."""

    def __init__(self):
        import sm90_compile_report as aot

        self.aot = aot
        self.launches: Dict[tuple, tuple] = {}
        self.calls = 0

    @staticmethod
    def _stand_in(a):
        import torch

        if not isinstance(a, torch.Tensor):
            return a
        t = torch.empty(72, dtype=a.dtype)  # the binder reads dtype and 16-byte alignment only
        return t if a.data_ptr() % 16 == 0 else t[1:]

    def record(self, kernel, args, kwargs) -> None:
        self.calls += 1
        args = tuple(self._stand_in(a) for a in args)
        spec = self.aot.specialization(kernel, args, kwargs)
        key = (kernel.fn.__name__, str(spec), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        self.launches.setdefault(key, (kernel, args, dict(kwargs)))


@contextlib.contextmanager
def _patched(pairs):
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in pairs]
    try:
        for obj, name, value in pairs:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def recording(rec: Recorder):
    """CPU tensors take the kernel path of an sm_90 device with 132 SMs; kernels record instead of running; the
    autotuner and the "auto" arrangement try every candidate once (recorded) with equal times; dense products return
    their output's shape only (NF4's dequantization kernel is still launched: it is one of ours)."""
    import torch

    from lora_kernels import settings
    from lora_kernels.ops.lora_linear import arrangement, base_weight, dispatch, launch, nf4_weight, tuning

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            rec.record(kernel, args, kwargs)
        return run

    def bench(tuned):
        def _bench(*args, config, grid, warmup, **meta):
            rec.record(tuned.fn, args, dict(meta, **config.all_kwargs()))
            return [1.0, 1.0, 1.0]
        return _bench

    def shape_only(rows_of, cols_of):
        def product(self, a2d, *rest):
            return torch.empty(a2d.shape[0], cols_of(self), dtype=a2d.dtype)
        return product

    def shape_only_acc(self, out, g2d):
        return out

    def nf4_product(cols_of):
        def product(self, a2d, *rest):
            nf4_weight.dequantize(self.q, a2d)  # the split arrangement's dequantization kernel, recorded
            return torch.empty(a2d.shape[0], cols_of(self), dtype=a2d.dtype)
        return product

    def nf4_acc(self, out, g2d):
        nf4_weight.dequantize(self.q, g2d)
        return out

    kernel_path = lambda t: t.dtype != torch.float64  # noqa: E731
    tuned = [v for v in vars(tuning).values() if type(v).__name__ == "Autotuner"]
    pairs = [(torch.cuda, "get_device_capability", lambda *a, **k: (CAPABILITY // 10, CAPABILITY % 10)),
             (tuning, "sm_count", lambda device: SMS),
             (dispatch, "use_triton", kernel_path), (nf4_weight, "use_triton", kernel_path),
             (launch, "_times_arrangement", lambda a2d: True),  # CUDA tensors: "auto" times both arrangements
             (arrangement, "_time_ms", lambda fn: (fn(), 1.0)[1]),
             (base_weight.DenseWeight, "linear", shape_only(None, lambda w: w.out_features)),
             (base_weight.DenseWeight, "grad_input", shape_only(None, lambda w: w.in_features)),
             (base_weight.DenseWeight, "add_grad_input_", shape_only_acc),
             (nf4_weight.NF4Weight, "linear", nf4_product(lambda w: w.out_features)),
             (nf4_weight.NF4Weight, "grad_input", nf4_product(lambda w: w.in_features)),
             (nf4_weight.NF4Weight, "add_grad_input_", nf4_acc)]
    pairs += [(k, "run", recorder(k)) for k in _jit_kernels()]
    pairs += [(t, "_bench", bench(t)) for t in tuned]
    with _patched(pairs), settings.override(interpret=False):
        yield


def _launch_only(x, w, b, a, bb, scale, p, seed=1234, *, w_dense=None):
    """tests.helpers.run_and_compare's launches without its references: forward, backward with a random g, and
    (p > 0) the dropout mask it draws for the references, with the same arguments."""
    import torch

    from lora_kernels import dropout_mask, lora_linear

    y = lora_linear(x, w, b, a, bb, scale, p, seed=seed)
    ins = [t for t in (x, a, bb) if t.requires_grad]
    if ins:
        torch.autograd.grad(y, ins, torch.randn_like(y))
    if p > 0:
        dropout_mask(seed, (x[..., 0].numel(), x.shape[-1]), p, x.device, dtype=x.dtype, r=a.shape[0])
    return []


def standin_rows(n: int) -> int:
    """A row count below 2^15 that Triton's JIT specialises like ``n`` (< 2^31): 1 stays 1, else the residue mod 16
    is kept (a multiple of 16 is marked divisible, any other value is not)."""
    return n if n < 2**15 else 2**14 + n % 16


def record_correct(rec: Recorder, only_cases: Optional[List[str]] = None) -> List[str]:
    """gpu_check's correctness cases, as its correct stage runs them (autotuning off, fused arrangement pinned), at
    the GPU's sizes on CPU tensors.  Returns the names of the cases run."""
    import gpu_check as GC
    from tests import helpers as H

    from lora_kernels import settings

    sz = dict(GC._sizes(False), device="cpu")
    # The >2^31-element case at a row count the JIT specialises alike (not 1, the same residue mod 16, < 2^31): its
    # input is then 64 MiB instead of 4 GiB.  The launchers pass sizes and row strides, never N x in, so no integer
    # argument reaches 2^31 at the real size either (the kernels form the large offsets themselves, in int64).
    sz["big_n"] = standin_rows(sz["big_n"])
    ran = []
    with _patched([(H, "run_and_compare", _launch_only)]):
        for name, fn in GC.correct_cases(False):
            if name in NOT_RECORDED or (only_cases and name not in only_cases):
                continue
            chk = GC.Checks({})
            with settings.override(autotune=False, gemm="fused", tma=True):  # the correct stage's, TMA's default
                fn(chk, sz)
            ran.append(name)
    return ran


def ratio_launches() -> List[tuple]:
    """The ratios and e2e stages' operator calls: (tokens, in, out, bias, adapter dtype, mode, p, base) with base
    "dense" or "nf4".  Ratios: 8192 and 2048 tokens x 4096->4096 on bench_lora_linear's nn.Linear (bias), and the
    QLoRA rows (NF4, no bias, fp32 adapters); e2e: LLaMA-7B's projections (no bias) at 4 x 2048 tokens, bf16
    adapters (ours) and fp32 ones (PEFT's, through patch_peft).  Dropout matters only as zero / non-zero."""
    plan = []
    shapes = [(8192, 4096, 4096, True), (2048, 4096, 4096, True), (8192, 4096, 4096, False),
              (8192, 4096, 11008, False), (8192, 11008, 4096, False)]
    for n, k_in, n_out, bias in shapes:
        for adapters in ("bf16", "fp32"):
            for mode in ("AB", "B"):
                for p in (0.0, 0.1):
                    plan.append((n, k_in, n_out, bias, adapters, mode, p, "dense"))
    plan += [(8192, 4096, 4096, False, "fp32", mode, 0.0, "nf4") for mode in ("AB", "B")]
    return plan


def record_ratios(rec: Recorder) -> int:
    """The ratios / e2e operator calls (``ratio_launches``) with the library's defaults (autotuning on, arrangement
    "auto", TMA on; pinned here, whatever the builder's environment says): forward, then forward + backward."""
    import torch

    from lora_kernels import lora_linear, settings
    from lora_kernels.quant import quantize_nf4

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    nf4 = {}
    plan = ratio_launches()
    with settings.override(autotune=True, gemm="auto", tma=True):
        for n, k_in, n_out, has_bias, adapters, mode, p, base in plan:
            x = torch.randn(n, k_in).to(torch.bfloat16).requires_grad_()
            a = (torch.randn(16, k_in) / k_in**0.5).to(dt[adapters]).requires_grad_(mode == "AB")
            bb = (torch.randn(n_out, 16) / 4).to(dt[adapters]).requires_grad_()
            bias = torch.randn(n_out).to(torch.bfloat16) if has_bias else None
            if base == "nf4":
                if (k_in, n_out) not in nf4:
                    nf4[(k_in, n_out)] = quantize_nf4(torch.randn(n_out, k_in) / k_in**0.5, 64, double_quant=True,
                                                      compute_dtype=torch.bfloat16)
                w = nf4[(k_in, n_out)]
            else:
                w = torch.empty(n_out, k_in, dtype=torch.bfloat16)
            with torch.no_grad():
                lora_linear(x, w, bias, a, bb, 2.0, p, seed=7)  # the "fwd" rows
            _launch_only(x, w, bias, a, bb, 2.0, p, seed=7)
    return len(plan)


# --------------------------------------------------------------------------------------------------------------
# Compiling the recorded launches into the cache
# --------------------------------------------------------------------------------------------------------------

_WORK: List[tuple] = []


def compile_launch(kernel, args, kwargs, capability: int = CAPABILITY) -> Tuple[bool, float, str]:
    """(found in the cache, seconds, error): one launch compiled exactly as ``JITFunction._do_compile`` compiles it."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    import sm90_compile_report as aot

    hits = []
    listener = knobs.compilation.listener

    def listen(*, src, metadata, metadata_group, times, cache_hit):
        hits.append(cache_hit)

    knobs.compilation.listener = listen
    t0 = time.perf_counter()
    try:
        backend, bind = aot.binder(kernel, capability)
        kw = aot.run_kwargs(kernel, kwargs)
        bound_args, spec, options = bind(*args, **kw)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound_args, spec, options)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        triton.compile(src, target=aot.target(capability), options=options.__dict__)
        err = ""
    except Exception as exc:  # reported, not raised: one bad launch must not lose the others
        err = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        knobs.compilation.listener = listener
    return bool(hits and hits[-1]), time.perf_counter() - t0, err


def _compile_nth(i: int):
    kernel, args, kwargs = _WORK[i]
    return compile_launch(kernel, args, kwargs)


def compile_all(launches: List[tuple], jobs: int) -> List[Tuple[bool, float, str]]:
    import multiprocessing

    if jobs <= 1 or len(launches) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [compile_launch(*item) for item in launches]
    _WORK[:] = launches
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile_nth, range(len(launches)), chunksize=1)
    finally:
        _WORK.clear()


class _Sm90Driver:
    """Stands in for Triton's CUDA driver where ``JITFunction.run`` asks it for the device, stream and target, so
    a warm-up launch (compile, no launch) takes the JIT's own road to the cache on a machine without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", CAPABILITY, 32)


def verify(launches: List[tuple]) -> Dict[str, int]:
    """Each launch through the real ``JITFunction.run`` (``warmup=True``: bind, key, ``_do_compile``, no launch)
    with ``_Sm90Driver`` active: {"hits", "misses"} by Triton's compilation listener.  Misses compile (and land in
    the cache); a build checks that it has none, which is what the GPU's JIT will find with a matching
    fingerprint."""
    from triton import knobs
    from triton.runtime import driver

    seen = {"hits": 0, "misses": 0}
    listener = knobs.compilation.listener

    def listen(*, src, metadata, metadata_group, times, cache_hit):
        seen["hits" if cache_hit else "misses"] += 1

    knobs.compilation.listener = listen
    driver.set_active(_Sm90Driver())
    try:
        for kernel, args, kwargs in launches:
            kernel.device_caches.clear()  # a binder for the stand-in target, as a fresh process on the GPU builds
            kernel.run(*args, grid=(1,), warmup=True, **kwargs)
    finally:
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)
        knobs.compilation.listener = listener
    return seen


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return ""


def build(outdir: str, jobs: int = 0, plans=PLANS, limit: Optional[int] = None, only_cases=None,
          list_only: bool = False, say=print) -> dict:
    """Record, then compile into ``outdir`` (TRITON_CACHE_DIR must already point there: Triton reads it once)."""
    import torch
    import triton

    t0 = time.perf_counter()
    rec = Recorder()
    ran, ops = [], 0
    with recording(rec):
        if "correct" in plans:
            ran = record_correct(rec, only_cases)
        n_correct = len(rec.launches)
        if "ratios" in plans:
            ops = record_ratios(rec)
    t_rec = time.perf_counter() - t0
    launches = list(rec.launches.values())
    by_kernel: Dict[str, int] = {}
    for kernel, _, _ in launches:
        by_kernel[kernel.fn.__name__] = by_kernel.get(kernel.fn.__name__, 0) + 1
    if limit:
        launches = launches[:limit]
    say(f"recorded {rec.calls} launches in {t_rec:.0f} s: {len(rec.launches)} distinct ({n_correct} from "
        f"{len(ran)} correctness cases, the rest from {ops} ratios/e2e calls); by kernel {by_kernel}")
    manifest = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    commit=_git_commit(), torch=torch.__version__, capability=CAPABILITY, sms=SMS,
                    fingerprint=fingerprint(), cases=ran, ratio_calls=ops, recorded_calls=rec.calls,
                    distinct=len(rec.launches), by_kernel=by_kernel, not_recorded=list(NOT_RECORDED))
    if list_only:
        return manifest
    t1 = time.perf_counter()
    rows = compile_all(launches, jobs or os.cpu_count() or 1)
    errors = [f"{k.fn.__name__}: {e}" for (k, _, _), (_, _, e) in zip(launches, rows) if e]
    manifest.update(compiled=sum(1 for hit, _, e in rows if not e and not hit),
                    already=sum(1 for hit, _, e in rows if hit and not e), errors=errors,
                    compile_s=round(time.perf_counter() - t1, 1), triton_version=triton.__version__)
    t2 = time.perf_counter()
    manifest["verify"] = dict(verify(launches), seconds=round(time.perf_counter() - t2, 1))
    with open(os.path.join(outdir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    say(f"compiled {manifest['compiled']} kernels for sm_{CAPABILITY} in {manifest['compile_s']:.0f} s "
        f"({manifest['already']} already in the cache, {len(errors)} failed) into {outdir}; through the JIT's "
        f"own run (sm_90 stand-in driver): {manifest['verify']['hits']} found, {manifest['verify']['misses']} "
        "compiled")
    for e in errors[:10]:
        say(f"  FAILED {e}")
    return manifest


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="the cache directory to fill (then: gpu_check.py --warm-cache OUTDIR)")
    ap.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    ap.add_argument("--only", default=",".join(PLANS), help="which launches: correct, ratios (default both)")
    ap.add_argument("--cases", default="", help="comma-separated gpu_check correctness case names (default all)")
    ap.add_argument("--limit", type=int, default=0, help="compile only the first N distinct launches (tests)")
    ap.add_argument("--list", action="store_true", help="record and print the counts; compile nothing")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: compiling for sm_90 needs Triton's compiled JIT")
    outdir = os.path.abspath(args.outdir)
    os.makedirs(outdir, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = outdir  # before Triton reads it
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # not part of the key: the GPU reads the cubin and metadata only
    plans = tuple(p for p in args.only.split(",") if p)
    bad = [p for p in plans if p not in PLANS]
    if bad:
        raise SystemExit(f"--only: unknown {bad}; choose from {PLANS}")
    cases = [c for c in args.cases.split(",") if c] or None
    m = build(outdir, args.jobs, plans, args.limit or None, cases, args.list)
    print(json.dumps({k: m[k] for k in m if k not in ("cases", "errors")}))
    return 1 if m.get("errors") or m.get("verify", {}).get("misses") else 0


if __name__ == "__main__":
    sys.exit(main())
