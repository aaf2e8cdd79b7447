#!/usr/bin/env python3
"""The GPU session in one command: correctness of every kernel family, the target ratios, rsvd, end to end.

  python3 bench/gpu_check.py OUTDIR [--budget 450] [--stages env,correct,ratios,rsvd,e2e] [--dry-run]
                                    [--warm-cache DIR] [--workers N] [--no-build]

The whole run ends within ``--budget`` seconds of wall clock (default 450, for an 8-minute command that also
starts Python).  Each stage gets a share; a stage's deadline is the sum of the shares up to it (time one stage
leaves goes to the next), the last stage selected runs until budget - reserve, and a stage with too little time
left is not started.  Shares in seconds at --budget 450 (another budget scales them all):

| stage   | share | what                                                                                        |
|---------|-------|---------------------------------------------------------------------------------------------|
| env     | 10    | GPU, driver, clocks, SM count, versions, optional dependencies, lora_kernels._C             |
| correct | 150   | every kernel family vs float64, autotuning off, poisoned outputs; parallel worker processes; |
|         |       | the NF4 base (QLoRA): fused / split x AB / B, bf16 and fp32, p=0.1, and the path each took    |
| ratios  | 120   | 8192 tokens x 4096->4096 r=16 bf16: nn.Linear, PEFT, addmm, ours (auto/fused/split); then ours |
|         |       | with fp32 lora_A/lora_B (AB, B, AB p=0.1) next to ours and nn.Linear; last, QLoRA: the same    |
|         |       | shape on an NF4 base (double quant), fp32 adapters: floor (our dequant + F.linear), peft-bnb   |
|         |       | (only where bitsandbytes imports and works), peft-style, ours-AB, ours-B; fwd and fwd+bwd,     |
|         |       | peak MB, numerics, what auto chose; target ours-B fwd+bwd >= 1.5x faster than PEFT (+bnb)     |

What the NF4 / QLoRA additions cost on an H200 (estimated, not measured: no GPU run yet).  correct: the two NF4
cases compile about 5 kernels each (the NF4 GEMM forward and masked dgrad, the dequantization, the split
arrangement's LoRA pass; the shrink and reductions are shared with the odd-shape cases), 1-4 s each, about 30 s of
compiling spread over the workers: +3-8 s of the stage's wall clock.  ratios: 3-4 new compiles at the 8192 x 4096
specialization (NF4 GEMM forward and dgrad, the dequantization; the fp32-adapter kernels are the rows before's),
8-15 s, plus 7 do_bench timings of ~0.35 s, the auto arrangement's two candidates per new key (~0.5 s) and the
float64 numerics (< 1 s): 12-20 s, up to ~35 s if the split arrangement's LoRA pass must be autotuned afresh.  The
dry run: about +5 s.
| rsvd    | 60    | batch 32 x 4096^2 r=16 (k=4r, niter 5 and 6), LoRA-One's svd_lowrank, CUDA Jacobi vs linalg  |
| e2e     | 90    | 4 LLaMA-7B-width layers, bf16, r=16 all-linear, seq 2048: PEFT vs ours, AB and B, p=0.05;    |
|         |       | last, peft+patch (the PEFT model after lora_kernels.patch_peft, its fp32 adapters), AB and B  |
| reserve | 20    | kill grace, CSVs, PNGs, summary                                                              |

How a stage is cut: every stage except env runs in child processes of this script (``--worker STAGE``), which
write one JSON record per case to OUTDIR/records as it finishes and start no new case once their deadline is
near; at the deadline the driver kills what is still running (its own children, by process group).  A hung
compile or a CUDA fault therefore costs one stage (or one worker), never the run, and a cut stage keeps the cases
it finished and lists the ones it skipped.  The correct stage runs its cases in ``--workers`` processes at once
(default: CPU cores - 4, at most 10): on a fresh machine its cost is Triton compilation, which is CPU-bound and
single-threaded per process.  They share the Triton cache, and the autotune candidates are checked on a shape
with the same specialization (every size a multiple of 16) as the ratios stage's, so the ratios stage's
autotuner finds them compiled.

The C++/CUDA extension (``python3 -m pip install --no-build-isolation --no-deps -e .``, TORCH_CUDA_ARCH_LIST of
this GPU, MAX_JOBS=4) builds in the background while the correct stage runs; the driver waits for it (bounded)
before the rsvd stage, whose child then imports the fresh lora_kernels._C (the Jacobi solver's first GPU run).

--warm-cache DIR: use DIR as Triton's cache (TRITON_CACHE_DIR), e.g. one built offline by
bench/warm_triton_cache.py and shipped with the command; the log and summary say how many files it held before and
after and how many kernels each stage found in it (cache hits) or compiled (misses), from Triton's compilation
listener, and, where DIR holds the builder's manifest.json, whether this machine's Triton fingerprint matches it.
--dry-run: tiny shapes on the CPU, every stage's code path, Triton kernels in the interpreter (TRITON_INTERPRET=1
is set for the children unless already set), perf_counter medians instead of do_bench, no extension build.

Output under OUTDIR: gpu_check.log (the driver), logs/<stage>*.log (each child; build.log), records/*.jsonl (raw
per-case records), env.csv, stages.csv, correct.csv (one row per check), correct_families.csv, ratios.csv,
ratios_arrangements.csv, rsvd.csv, rsvd_jacobi.csv, e2e.csv (every CSV row stamped with date, device, torch,
triton, cuda), ratios.png and e2e.png (when matplotlib imports), summary.txt / summary.json.  The summary table
(at most 40 lines) is printed last.  Exit status: 0 when every check that ran passed (cut stages are not
failures), 1 when a check failed or a stage crashed, 2 for no CUDA device without --dry-run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
for _p in (BENCH, REPO):  # this checkout's lora_kernels and tests first, then bench/ (utils, bench_*)
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

STAGES = ("env", "correct", "ratios", "rsvd", "e2e")
REF_BUDGET = 450.0
SHARE = {"env": 10, "correct": 150, "ratios": 120, "rsvd": 60, "e2e": 90}
RESERVE = 20
MIN_START = {"env": 0, "correct": 15, "ratios": 20, "rsvd": 15, "e2e": 30}  # don't start a stage with less
KILL_GRACE = 3.0   # SIGTERM, then SIGKILL after this many seconds
_CUDA_RUNTIME_H = "/usr/local/cuda/include/cuda_runtime_api.h"
BUILD_MAX = 300.0  # the extension build is killed after this long (or when the rsvd stage can wait no more)
SUMMARY_MAX_LINES = 40
NF4_FAMILY = "NF4 base (QLoRA)"
FAMILIES = ("shrink", "GEMM TMA", "GEMM pointer", "persistent grid", "split arrangement", "dgrad", "masked dgrad",
            "dA/dB reductions", "odd shape (M=1, r=7)", "r=256", ">2^31 elements", "autotune candidates",
            "dropout mask (Philox)", "torch.compile fullgraph", NF4_FAMILY)
RATIO_TARGETS = {"fwd": 1.05, "fwdbwd-AB": 1.10, "fwdbwd-B": 1.06, "fwdbwd-AB p=0.1": 1.12,
                 "fwdbwd-AB small": 1.20,
                 "qlora": 1.5}  # QLoRA: a speed-up, ours-B fwd+bwd over PEFT + bitsandbytes (else peft-style)
OUR_CSVS = ("env.csv", "stages.csv", "correct.csv", "correct_families.csv", "ratios.csv", "ratios_arrangements.csv",
            "rsvd.csv", "rsvd_jacobi.csv", "e2e.csv", "ratios.png", "e2e.png", "summary.txt", "summary.json",
            "gpu_check.log")


# ==============================================================================================================
# Small helpers shared by the driver and the workers
# ==============================================================================================================

def _append_jsonl(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _read_jsonl(path: str) -> List[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:  # a line cut by a kill
                        pass
    except OSError:
        pass
    return out


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt(v, spec=".2e") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _count_files(path: str) -> int:
    n = 0
    for _, _, files in os.walk(path):
        n += len(files)
    return n


def _triton_cache_dir() -> str:
    env = os.environ.get("TRITON_CACHE_DIR")
    if env:
        return env
    try:
        from triton import knobs

        return str(knobs.cache.dir)
    except Exception:
        return os.path.join(os.path.expanduser("~"), ".triton", "cache")


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, device, reps: int = 3) -> float:
    """Median of ``reps`` single runs after one warm-up (slow calls, where do_bench's repeat count would not fit)."""
    import bench_rsvd

    fn()
    return bench_rsvd.time_slow_ms(fn, device, reps)


# ==============================================================================================================
# Worker side: one child process per stage (several for "correct")
# ==============================================================================================================

class Worker:
    """Records of one child: plan / start / result / skip / note / error / done, one JSON line each."""

    def __init__(self, stage: str, outdir: str, deadline: float, dry: bool, shard: Optional[int]):
        self.stage, self.outdir, self.deadline, self.dry, self.shard = stage, outdir, deadline, dry, shard
        suffix = "" if shard is None else f"_{shard}"
        self.path = os.path.join(outdir, "records", f"{stage}{suffix}.jsonl")
        self.compile = {"hits": 0, "misses": 0, "seconds": 0.0}
        self._install_compile_listener()

    def _install_compile_listener(self) -> None:
        """Count Triton compilations (cache misses, with their time) and cache hits, from Triton's own hook."""
        try:
            from triton import knobs
        except Exception:
            return

        def listener(**kw):
            if kw.get("cache_hit"):
                self.compile["hits"] += 1
            else:
                self.compile["misses"] += 1
                times = kw.get("times")
                self.compile["seconds"] += getattr(times, "total", 0) / 1e6

        try:
            knobs.compilation.listener = listener
        except Exception:
            pass

    def emit(self, kind: str, **rec) -> None:
        _append_jsonl(self.path, dict(kind=kind, t=time.time(), shard=self.shard, **rec))

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, case: str, need: float = 1.0) -> bool:
        if self.left() < need:
            self.emit("skip", case=case, budget=True, why=f"stage budget spent ({self.left():.0f} s left)")
            print(f"[{self.stage}] skip {case}: budget", flush=True)
            return False
        return True

    def skip(self, case: str, why: str) -> None:
        self.emit("skip", case=case, budget=False, why=why)
        print(f"[{self.stage}] skip {case}: {why}", flush=True)

    @contextmanager
    def case(self, name: str):
        self.emit("start", case=name)
        print(f"[{self.stage}] start {name}", flush=True)
        c0 = dict(self.compile)
        t0 = time.perf_counter()
        data: dict = {}
        try:
            yield data
        except Exception as exc:  # the case failed; the stage goes on
            data["error"] = f"{type(exc).__name__}: {exc}"[:1500]
            data["traceback"] = traceback.format_exc()[-4000:]
            print(data["traceback"], flush=True)
        secs = time.perf_counter() - t0
        self.emit("result", case=name, seconds=secs, compiles=self.compile["misses"] - c0["misses"],
                  cache_hits=self.compile["hits"] - c0["hits"], compile_s=self.compile["seconds"] - c0["seconds"],
                  **data)
        print(f"[{self.stage}] done {name} in {secs:.1f} s" + (f"  ERROR {data['error']}" if "error" in data else ""),
              flush=True)


class Checks:
    """Checks of one correctness case: family tags, label, output, error, bound."""

    def __init__(self, data: dict):
        self.rows = data.setdefault("checks", [])

    def add(self, fams, label: str, out: str, err: float, bound: float, note: str = "") -> bool:
        err, bound = float(err), float(bound)
        ok = err == err and err <= bound
        self.rows.append(dict(families=list(fams), label=label, out=out, err=err, bound=bound, ok=ok, note=note))
        return ok

    def fail(self, fams, label: str, out: str, note: str) -> None:
        self.rows.append(dict(families=list(fams), label=label, out=out, err=float("nan"), bound=float("nan"),
                              ok=False, note=note[:500]))


# --------------------------------------------------------------------------------------------------------------
# Stage "correct": the cases
# --------------------------------------------------------------------------------------------------------------

MODE_PS = [(m, p) for m in ("AB", "B", "A") for p in (0.0, 0.1)]
DRY_MODE_PS = [("AB", 0.0), ("B", 0.1), ("A", 0.1)]  # the dry run: every mode, both dropout settings


def _sizes(dry: bool) -> dict:
    if dry:
        return dict(aligned=(64, 64, 64, 16), odd=[(1, 37, 45, 7), (19, 37, 45, 7)], nf4=[(37, 100, 70, 7)],
                    modes=DRY_MODE_PS,
                    r256=(33, 64, 48, 256),
                    cand=(100, 64, 80, 16), big=(64, 16, 4), big_n=4096 // 64 + 10, mask_d=24, mask_n=50,
                    mask_shapes=(((51, 100), 0.3), ((7, 13), 0.5)), device="cpu")
    # cand: every size a multiple of 16 (the ratios stage's 8192x4096->4096 specialization, so its autotuner finds
    # these kernels compiled) but ragged against the 128/256 tiles; more tiles than SMs (persistent tiles walk).
    # nf4: in_features 100 (blocks of 64 and bytes straddle rows), then 1001 (odd: a byte holds the end of one row
    # and the start of the next, the last byte is padded) over several tiles; one specialization, one compile.
    return dict(aligned=(2048, 4096, 4096, 16), odd=[(1, 1001, 1003, 7), (333, 1001, 1003, 7)],
                nf4=[(37, 100, 70, 7), (333, 1001, 1003, 7)], modes=MODE_PS,
                r256=(4096, 512, 512, 256), cand=(4000, 2048, 4112, 16), big=(2048, 64, 8),
                big_n=2**31 // 2048 + 1000, mask_d=128, mask_n=1000,
                mask_shapes=(((513, 1000), 0.3), ((7, 13), 0.5), ((33, 50), 0.1), ((64, 130), 0.9)), device="cuda")


def _compare(chk: Checks, fams, label: str, mode: str, p: float, case_args, scale: float = 0.5,
             seed: int = 1234, w_dense=None) -> None:
    """tests.helpers.run_and_compare (ours vs float64, bound 2 x torch-in-the-same-dtype + error_floor), with the
    errors it computes recorded: its module-level rel_err is wrapped for the call, so the comparison is the
    tests' own, not a copy.  ``w_dense``: the references' W when case_args holds a quantized one (NF4Tensor)."""
    from tests import helpers as H

    calls: List[float] = []
    orig = H.rel_err

    def recording(got, ref):
        v = orig(got, ref)
        calls.append(v)
        return v

    H.rel_err = recording
    msg = None
    try:
        H.run_and_compare(*case_args, scale=scale, p=p, seed=seed, w_dense=w_dense)
    except AssertionError as exc:
        msg = str(exc) or "assertion failed"
    finally:
        H.rel_err = orig
    x, w, _, a, _ = case_args
    a_tr, b_tr = H.MODES[mode]
    outs = ["y", "dx"] + (["dA"] if a_tr else []) + (["dB"] if b_tr else [])
    floor = H.error_floor(x.dtype, x.shape[-1] + w.shape[0] + a.shape[0])
    full = f"{label} {mode} p={p}"
    failed = False
    for i in range(len(calls) // 2):
        out = outs[i] if i < len(outs) else f"out{i}"
        err, base = calls[2 * i], calls[2 * i + 1]
        extra = (["masked dgrad" if p > 0 else "dgrad"] if out == "dx" else
                 ["dA/dB reductions"] if out in ("dA", "dB") else [])
        failed |= not chk.add(list(fams) + extra, full, out, err, 2 * base + floor)
    if msg and not failed:  # an assertion before any error was computed: non-finite (unwritten) output, shape, dtype
        chk.fail(fams, full, "assert", msg)


def _case_args(shape, dtype, mode, device, bias=True):
    import torch
    from tests.helpers import make_case

    torch.manual_seed(0)
    return make_case(*shape, dtype, mode, bias, device=device)


def _label(shape, dtype) -> str:
    n, d_in, d_out, r = shape
    return f"{_dt(dtype)} {n}x{d_in}->{d_out} r{r}"


def _paths(chk, sz, dtype, fams, shapes, ctx=None, modes=None) -> None:
    """Every mode x dropout on each shape; for the TMA / pointer families, also that every fused GEMM launch took
    the path the family names (launch._use_tma wrapped, as tests/ops/test_arrangement.py does)."""
    from lora_kernels.ops.lora_linear import launch

    modes = modes or sz["modes"]
    paths: List[bool] = []
    orig = launch._use_tma
    launch._use_tma = lambda *a: paths.append(orig(*a)) or paths[-1]
    try:
        for shape in shapes:
            for mode, p in modes:
                with (ctx() if ctx else nullcontext()):
                    _compare(chk, fams, _label(shape, dtype), mode, p, _case_args(shape, dtype, mode, sz["device"]))
    finally:
        launch._use_tma = orig
    for fam, want in (("GEMM TMA", True), ("GEMM pointer", False)):
        if fam in fams:
            wrong = sum(1 for used in paths if used != want)
            chk.add([fam], f"{_dt(dtype)} path taken", "launches on the other path", wrong, 0,
                    note=f"{len(paths)} fused GEMM launches, {wrong} not on the {'TMA' if want else 'pointer'} path")


@contextmanager
def _pinned(make_meta_fn):
    """Replace tuning.pinned_gemm_meta (what launch.py asks for when autotuning is off), as tests/ops/test_gpu.py
    and test_arrangement.py do with monkeypatch."""
    from lora_kernels.ops.lora_linear import tuning

    orig = tuning.pinned_gemm_meta
    tuning.pinned_gemm_meta = make_meta_fn(orig)
    try:
        yield
    finally:
        tuning.pinned_gemm_meta = orig


def _persistent_ctx():
    return _pinned(lambda orig: (lambda dtype, base_in_c: orig(dtype, base_in_c) if base_in_c
                                 else dict(orig(dtype, base_in_c), PERSISTENT=True)))


def _no_tma():
    from lora_kernels import settings

    return settings.override(tma=False)


def _split():
    from lora_kernels.ops import gemm_arrangement

    return gemm_arrangement("split")


def _persistent_case(chk, sz, dtype, ctx=None):
    """The pinned tile made persistent; also records that some launch really walked more tiles than programs."""
    from lora_kernels.ops.lora_linear import tuning

    walks = []
    orig_grid = tuning.grid_size

    def grid(m, n, meta, device):
        g = orig_grid(m, n, meta, device)
        tiles = -(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"])
        walks.append((g, tiles))
        return g

    tuning.grid_size = grid
    try:
        def both():
            stack = [_persistent_ctx()] + ([ctx()] if ctx else [])
            return _stack(stack)
        _paths(chk, sz, dtype, ["persistent grid"], [sz["aligned"]], ctx=both, modes=[("AB", 0.0), ("AB", 0.1)])
    finally:
        tuning.grid_size = orig_grid
    most = max((t / g for g, t in walks if g), default=0.0)
    chk.add(["persistent grid"], f"{_dt(dtype)} grid walk", "max tiles/program", 0.0 if most > 1 else 1.0, 0.0,
            note=f"max {most:.1f} tiles per program over {len(walks)} launches")


@contextmanager
def _stack(ctxs):
    if not ctxs:
        yield
        return
    with ctxs[0]:
        with _stack(ctxs[1:]):
            yield


def _shrink_case(chk, sz):
    import torch
    from tests.helpers import rel_err, standalone_bound

    from lora_kernels import dropout_mask
    from lora_kernels.ops.lora_linear import launch

    dev = sz["device"]
    specs = [sz["aligned"], sz["odd"][1], sz["r256"]]
    for dtype in (torch.bfloat16, torch.float32):
        for n, k, _, r in specs:
            for p in (0.0, 0.1):
                torch.manual_seed(0)
                x = torch.randn(n, k, device=dev).to(dtype)
                a = (torch.randn(r, k, device=dev) / k**0.5).to(dtype)
                scale = 0.5 / (1 - p)
                t = launch.shrink(x, a, 1234, p, scale)
                m = dropout_mask(1234, (n, k), p, dev, dtype=dtype, r=r).double() if p > 0 else 1.0
                ref = scale * (m * x.double()) @ a.double().t()
                chk.add(["shrink"], f"{_dt(dtype)} {n}x{k} r{r} p={p}", "t", rel_err(t, ref),
                        standalone_bound(dtype, k))


def _reductions_case(chk, sz):
    import torch
    from tests.helpers import rel_err, standalone_bound

    from lora_kernels import dropout_mask
    from lora_kernels.ops.lora_linear import launch

    dev = sz["device"]
    n, k, _, r = sz["aligned"]
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        left = torch.randn(n, k, device=dev).to(dtype)
        right = torch.randn(n, r, device=dev).to(dtype)
        for p in (0.0, 0.1):
            m = dropout_mask(1234, (n, k), p, dev, dtype=dtype, r=r).double() if p > 0 else 1.0
            ref = (m * left.double()).t() @ right.double()
            for splits in (1, 3, None):
                got = launch._wgrad(left, right, 1234, p, splits=splits)
                chk.add(["dA/dB reductions"], f"token reduction {_dt(dtype)} {n}x{k} r{r} p={p} "
                        f"splits={splits or 'auto'}", "sum", rel_err(got, ref), standalone_bound(dtype, n))


def _dropout_case(chk, sz):
    """The kernels' mask bit for bit against the numpy Philox reference (tests.helpers.philox_keep_mask), directly
    and revealed through the op itself (W = 0, A = B = I: y = m * x / (1-p)), as tests/ops/test_dropout.py does."""
    import torch
    from tests.helpers import philox_keep_mask, rel_err, standalone_bound

    from lora_kernels import dropout_mask, lora_linear, lora_linear_ref

    fams = ["dropout mask (Philox)"]
    dev = sz["device"]
    for seed in (11, 2**32 + 7):
        for shape, p in sz["mask_shapes"]:
            m1 = dropout_mask(seed, shape, p, dev)
            again = torch.equal(m1, dropout_mask(seed, shape, p, dev))
            bad = int((m1.cpu().numpy() != philox_keep_mask(seed, shape, p)).sum()) + (0 if again else 1)
            chk.add(fams, f"mask {shape[0]}x{shape[1]} p={p} seed={seed}", "mismatches", bad, 0)
    d, n, seed = sz["mask_d"], sz["mask_n"], 2**32 + 7
    for dtype in (torch.float32, torch.bfloat16):
        for p in (0.1, 0.5):
            torch.manual_seed(0)
            label = f"revealed {_dt(dtype)} {n}x{d} p={p}"
            x = (torch.rand(n, d, device=dev) + 0.5).to(dtype).requires_grad_()
            w = torch.zeros(d, d, device=dev, dtype=dtype)
            a = torch.eye(d, device=dev, dtype=dtype).requires_grad_()
            bb = torch.eye(d, device=dev, dtype=dtype).requires_grad_()
            y = lora_linear(x, w, None, a, bb, 1.0, p, seed=seed)
            revealed = y.detach() != 0
            bad = int((revealed.cpu().numpy() != philox_keep_mask(seed, (n, d), p)).sum())
            chk.add(fams, label, "mask mismatches", bad, 0)
            chk.add(fams, label, "kept y = x/(1-p)", rel_err(y.detach()[revealed], x.detach()[revealed] / (1 - p)),
                    standalone_bound(dtype, 2 * d))
            if dtype != torch.float32:
                continue  # the gradients' bound below is the fp32 test's; bf16 checks the mask bits only
            g = torch.randn(n, d, device=dev)
            dx, da, db = torch.autograd.grad(y, [x, a, bb], g)
            leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
            yr = lora_linear_ref(leaves[0], w.double(), None, leaves[1], leaves[2], 1.0, p, dropout_mask=revealed)
            rx, ra, rb = torch.autograd.grad(yr, leaves, g.double())
            bound = standalone_bound(dtype, n + 2 * d)
            for name, o, r in (("dx", dx, rx), ("dA", da, ra), ("dB", db, rb)):
                chk.add(fams, label, name, rel_err(o, r), bound)


def _beyond_int32_case(chk, sz):
    """N*in > 2^31: the last rows must be right, dropout mask included.  Copied from
    tests/ops/test_gpu.py::test_gpu_beyond_int32_offsets (a test module, not importable without pytest)."""
    import torch
    from tests.helpers import make_case, rel_err

    from lora_kernels import dropout_mask, lora_linear, lora_linear_ref

    fams = [">2^31 elements"]
    dev = sz["device"]
    d_in, d_out, r = sz["big"]
    p, n = 0.1, sz["big_n"]
    tail_len = min(1000, n // 2)
    label = f"bf16 {n}x{d_in}->{d_out} r{r} p={p} ({n * d_in / 2**31:.3f} x 2^31 elements)"
    torch.manual_seed(0)
    x, w, b, a, bb = make_case(n, d_in, d_out, r, torch.bfloat16, device=dev)
    y = lora_linear(x, w, b, a, bb, 1.0, p, seed=5)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, [x, a, bb], g)
    tail = slice(n - tail_len, n)
    mask = dropout_mask(5, (n, d_in), p, dev)[tail]
    xs = x.detach()[tail].double()
    yr = lora_linear_ref(xs, w.double(), b.double(), a.double(), bb.double(), 1.0, p, dropout_mask=mask)
    chk.add(fams, label, "y (last rows)", rel_err(y[tail], yr), 1e-2)
    dxr = g[tail].double() @ w.double() + (mask * ((g[tail].double() @ bb.double()) @ a.double())) / (1 - p)
    chk.add(fams, label, "dx (last rows)", rel_err(dx[tail], dxr), 1e-2)
    finite = bool(torch.isfinite(da).all() and torch.isfinite(db).all())
    chk.add(fams, label, "dA, dB finite", 0.0 if finite else float("nan"), 0.0)


def _compile_case(chk, sz, dry):
    """torch.compile(fullgraph=True) of an injected tiny model: outputs and gradients equal to eager (inductor on
    the GPU; aot_eager in the dry run, which traces the same graph without a C++ build)."""
    import torch
    from tests.helpers import IDX, randomise_adapters, rel_err, tiny

    from lora_kernels import inject_lora

    torch._dynamo.reset()
    backend = "aot_eager" if dry else "inductor"
    if not dry:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # the other correctness workers already use the CPUs
    model = inject_lora(tiny(), r=4)
    randomise_adapters(model)
    model = model.to(device=sz["device"], dtype=torch.float32)
    idx = IDX.to(sz["device"])
    params = [q for q in model.parameters() if q.requires_grad]

    def grads(fn):
        y = fn(idx)
        y.float().pow(2).sum().backward()
        out = [y.detach().clone()] + [q.grad.clone() for q in params]
        for q in params:
            q.grad = None
        return out

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True, backend=backend))
    worst = max(rel_err(c, e) for e, c in zip(eager, compiled))
    chk.add(["torch.compile fullgraph"], f"tiny injected model fp32, {backend}", "logits + LoRA grads", worst, 1e-4)


def _nf4_case(chk, sz, dtype):
    """lora_linear on a 4-bit NF4 base (double quantization, blocksize 64), each arrangement (fused: W decoded in
    the GEMM's main loop; split: W dequantized into a scratch buffer) x mode AB / B at dropout 0.1, against float64
    on the dequantized W (tests/ops/test_nf4_lora_linear.py's comparison); also that each arrangement launched the
    kernels it names (nf4_launch.gemm and nf4_launch.dequantize wrapped, counted)."""
    from lora_kernels.ops import ARRANGEMENTS, gemm_arrangement
    from lora_kernels.ops.lora_linear import nf4_launch
    from lora_kernels.quant import dequantize_nf4_ref, quantize_nf4

    calls = {"gemm": 0, "dequantize": 0}
    orig = {name: getattr(nf4_launch, name) for name in calls}

    def counting(name):
        def fn(*args, **kw):
            calls[name] += 1
            return orig[name](*args, **kw)
        return fn

    for name in calls:
        setattr(nf4_launch, name, counting(name))
    try:
        for arrangement in ARRANGEMENTS:
            before = dict(calls)
            for shape in sz["nf4"]:
                for mode in ("AB", "B"):
                    x, w, b, a, bb = _case_args(shape, dtype, mode, sz["device"])
                    q = quantize_nf4(w.float(), 64, double_quant=True, compute_dtype=dtype)
                    with gemm_arrangement(arrangement):
                        _compare(chk, [NF4_FAMILY], f"{arrangement} {_label(shape, dtype)}", mode, 0.1,
                                 (x, q, b, a, bb), w_dense=dequantize_nf4_ref(q))
            fused, dq = calls["gemm"] - before["gemm"], calls["dequantize"] - before["dequantize"]
            wrong = dq if arrangement == "fused" else fused
            chk.add([NF4_FAMILY], f"{_dt(dtype)} {arrangement} path taken", "launches on the other path",
                    wrong if (fused or dq) else float("nan"), 0,
                    note=f"{fused} fused NF4 GEMM launches, {dq} dequantizations")
    finally:
        for name, fn in orig.items():
            setattr(nf4_launch, name, fn)


def _candidates():
    try:
        from lora_kernels.ops.lora_linear import tuning
    except Exception:
        return []
    return [c for c in tuning.get_gemm_configs()
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) not in tuning._FP32_TILES]


def _cfg_id(c) -> str:
    return "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
        f"w{c.num_warps}s{c.num_stages}" + ("p" if c.kwargs["PERSISTENT"] else ""))


def _candidate_case(chk, sz, cfg):
    """One 16-bit autotune candidate pinned (as tests/ops/test_gpu.py::test_gpu_every_autotune_candidate)."""
    import torch

    meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    with _pinned(lambda orig: (lambda dtype, base_in_c: meta)):
        for p in (0.0, 0.1):
            _compare(chk, ["autotune candidates"], f"{_cfg_id(cfg)} {_label(sz['cand'], torch.bfloat16)}", "AB", p,
                     _case_args(sz["cand"], torch.bfloat16, "AB", sz["device"]))


def correct_cases(dry: bool):
    """[(name, fn(checks, sizes))], most important first (parallel workers claim them in this order)."""
    import torch

    bf, h, f = torch.bfloat16, torch.float16, torch.float32
    A = lambda sz: [sz["aligned"]]  # noqa: E731
    cases = [
        ("TMA bf16", lambda c, s: _paths(c, s, bf, ["GEMM TMA"], A(s))),
        ("TMA fp16", lambda c, s: _paths(c, s, h, ["GEMM TMA"], A(s))),
        ("pointer bf16", lambda c, s: _paths(c, s, bf, ["GEMM pointer"], A(s), ctx=_no_tma)),
        ("pointer fp32", lambda c, s: _paths(c, s, f, ["GEMM pointer"], A(s))),
        ("odd bf16", lambda c, s: _paths(c, s, bf, ["odd shape (M=1, r=7)", "GEMM pointer"], s["odd"])),
        ("split bf16", lambda c, s: _paths(c, s, bf, ["split arrangement"], A(s) + s["odd"][:1], ctx=_split)),
        ("persistent bf16 (TMA)", lambda c, s: _persistent_case(c, s, bf)),
        ("dropout mask", _dropout_case),
        ("r=256 bf16", lambda c, s: _paths(c, s, bf, ["r=256"], [s["r256"]])),
        ("beyond int32", _beyond_int32_case),
        ("torch.compile", lambda c, s: _compile_case(c, s, dry)),
        ("NF4 bf16", lambda c, s: _nf4_case(c, s, bf)),
    ]
    cands = _candidates()
    if dry:  # the first one-tile and the first persistent candidate: the code path, not every tile
        cands = cands[:1] + [c for c in cands if c.kwargs["PERSISTENT"]][:1]
    cases += [(f"candidate {_cfg_id(cfg)}", (lambda cfg: lambda c, s: _candidate_case(c, s, cfg))(cfg))
              for cfg in cands]
    cases += [
        ("shrink direct", _shrink_case),
        ("token reductions direct", _reductions_case),
        ("odd fp16", lambda c, s: _paths(c, s, h, ["odd shape (M=1, r=7)", "GEMM pointer"], s["odd"])),
        ("odd fp32", lambda c, s: _paths(c, s, f, ["odd shape (M=1, r=7)", "GEMM pointer"], s["odd"])),
        ("pointer fp16", lambda c, s: _paths(c, s, h, ["GEMM pointer"], A(s), ctx=_no_tma)),
        ("split fp16", lambda c, s: _paths(c, s, h, ["split arrangement"], A(s) + s["odd"][:1], ctx=_split)),
        ("split fp32", lambda c, s: _paths(c, s, f, ["split arrangement"], A(s) + s["odd"][:1], ctx=_split)),
        ("persistent fp16 (pointer)", lambda c, s: _persistent_case(c, s, h, ctx=_no_tma)),
        ("persistent fp32", lambda c, s: _persistent_case(c, s, f)),
        ("r=256 fp32", lambda c, s: _paths(c, s, f, ["r=256"], [s["r256"]])),
        ("NF4 fp32", lambda c, s: _nf4_case(c, s, f)),
    ]
    return cases


def stage_correct(wk: Worker) -> None:
    import torch

    from lora_kernels import settings
    from lora_kernels.ops.lora_linear import dispatch

    if dispatch.launch is None:
        raise RuntimeError("triton is not importable: the kernels cannot be checked")

    def poisoned(shape, device, dtype):  # as tests/conftest.py: unwritten kernel outputs stay NaN and fail
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    dispatch.launch._empty = poisoned
    sz = _sizes(wk.dry)
    claims = os.path.join(wk.outdir, "records", "claims")
    os.makedirs(claims, exist_ok=True)
    for name, fn in correct_cases(wk.dry):
        try:  # parallel workers: the first to create the claim file runs the case
            os.close(os.open(os.path.join(claims, name.replace("/", "_")), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if not wk.allows(name):
            continue
        with wk.case(name) as data:
            chk = Checks(data)
            with settings.override(autotune=False, gemm="fused"):
                fn(chk, sz)
        if sz["device"] == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Stage "ratios"
# --------------------------------------------------------------------------------------------------------------

def ratio_plan(dry: bool):
    """[(name, tokens, dropout, mode, target key)] most important first."""
    big, small = (37, 16) if dry else (8192, 2048)
    return [(f"fwd N={big}", big, 0.0, "fwd", "fwd"),
            (f"fwdbwd-AB N={big}", big, 0.0, "fwdbwd-AB", "fwdbwd-AB"),
            (f"fwdbwd-B N={big}", big, 0.0, "fwdbwd-B", "fwdbwd-B"),
            (f"fwdbwd-AB p=0.1 N={big}", big, 0.1, "fwdbwd-AB", "fwdbwd-AB p=0.1"),
            (f"fwdbwd-AB N={small}", small, 0.0, "fwdbwd-AB", "fwdbwd-AB small")] + [
        # fp32 lora_A / lora_B on the same 16-bit x, W (PEFT's default; docs/design.md decision 14), after the rows
        # above so they never displace them: nn.Linear, ours with 16-bit adapters and ours with fp32 adapters, timed
        # back to back (the last one's ratio to the middle one is the predicted +1-3% step cost)
        (f"fwdbwd-AB {FP32A} N={big}", big, 0.0, "fwdbwd-AB", "fwdbwd-AB"),
        (f"fwdbwd-B {FP32A} N={big}", big, 0.0, "fwdbwd-B", "fwdbwd-B"),
        (f"fwdbwd-AB p=0.1 {FP32A} N={big}", big, 0.1, "fwdbwd-AB", "fwdbwd-AB p=0.1")] + [
        # QLoRA: the same shape on a 4-bit NF4 base (double quant), fp32 adapters; last, never displacing the rows
        # above.  The forward case also builds the weight and checks every provider's numerics.
        (f"{QLORA} fwd N={big}", big, 0.0, "fwd", QLORA), (f"{QLORA} fwdbwd N={big}", big, 0.0, "fwdbwd", QLORA)]


FP32A = "fp32-adapters"  # marks the ratios cases (and the provider) with lora_A / lora_B in float32
QLORA = "qlora"  # marks the ratios cases on the NF4 base (bench_lora_linear --qlora's providers)


def _fp32_adapter_rows(BL, shape, n, r, p, mode, base, a, b, x, g, errs) -> List[dict]:
    """nn.Linear, ours (adapters in x's dtype) and ours with fp32 adapters, timed as bench_lora_linear._time_mode
    times its providers; the fp32 row also carries its ratio to ours and the dtypes dA / dB came back in."""
    import torch
    import torch.nn.functional as F

    from lora_kernels import lora_linear

    a_tr, b_tr = BL.TRAINS[mode]
    provs = {"linear": (lambda x: F.linear(x, base.weight, base.bias), [], [base.weight, base.bias])}
    for name, dt in (("ours", a.dtype), (f"ours-{FP32A}", torch.float32)):
        A = a.detach().to(dt, copy=True).requires_grad_(a_tr)
        B = b.detach().to(dt, copy=True).requires_grad_(b_tr)
        provs[name] = (lambda x, A=A, B=B: lora_linear(x, base.weight, base.bias, A, B, 1.0, p),
                       [t for t, tr in ((A, a_tr), (B, b_tr)) if tr], [base.weight, base.bias, A, B])
    rows, ms_of = [], {}
    for name, (fwd, trainable, params) in provs.items():
        xx = x.clone().requires_grad_()

        def fn(fwd=fwd, trainable=trainable, xx=xx):
            return torch.autograd.grad(fwd(xx), [xx] + trainable, g)
        saved = BL.saved_activation_bytes(lambda fwd=fwd, xx=xx: fwd(xx), params)
        grads = fn()  # autotuning / compilation outside the timed region
        ms = ms_of[name] = BL.bench_ms(fn)
        peak = BL.peak_mem_bytes(fn)
        row = dict(shape=shape.name, d_in=shape.d_in, d_out=shape.d_out, tokens=n, r=r, dropout=p, mode=mode,
                   provider=name, ms=ms, ratio=ms / ms_of["linear"],
                   tflops=BL._flops(n, shape.d_in, shape.d_out, r, mode) / ms / 1e9, peak_mb=peak / 2**20,
                   saved_mb=saved / 2**20, **errs)
        if name != "linear":
            row["adapter_dtype"] = _dt(trainable[0].dtype)
            row["adapter_grad_dtypes"] = "/".join(_dt(t.dtype) for t in grads[1:])
            row["grad_dtypes_ok"] = all(t.dtype == q.dtype for t, q in zip(grads[1:], trainable))
        if name == f"ours-{FP32A}":
            row["ratio_vs_ours"] = ms / ms_of["ours"]
        rows.append(row)
    return rows


def stage_ratios(wk: Worker) -> None:
    import torch

    import bench_lora_linear as BL
    from tests.helpers import error_floor

    if wk.dry:
        shape, r, dtype, device = BL.Shape("tiny 64→48", 64, 48), 4, torch.float32, "cpu"
    else:
        shape, r, dtype, device = BL.LLAMA2_7B[0], 16, torch.bfloat16, "cuda"
    try:
        import peft

        wk.emit("note", text=f"peft {peft.__version__}: the 'peft' provider is PEFT's LoRA layer")
    except Exception as exc:
        wk.emit("note", text=f"peft not importable ({type(exc).__name__}: {exc}); the 'peft-like' provider is "
                             "PEFT's composition in plain torch")
    wk.emit("note", text=f"shape {shape.name}, r={r}, {_dt(dtype)}, {device}")
    data = {}
    for name, n, p, mode, target in ratio_plan(wk.dry):
        if not wk.allows(name, need=3.0):
            continue
        with wk.case(name) as rec:
            if target == QLORA:
                _qlora_ratio_case(BL, rec, data, name, n, p, mode, wk.dry)
                continue
            if (n, p) not in data:
                data.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
                torch.manual_seed(0)
                base, a, b, x, g = BL.build_case(shape, n, r, p, dtype, device)
                errs = BL.check_numerics(base, a, b, x, g, p)  # first call: autotuning and the "auto" arrangement
                data[(n, p)] = (base, a, b, x, g, errs)
            base, a, b, x, g, errs = data[(n, p)]
            grads_ok = True
            if FP32A in name:
                if (n, p, FP32A) not in data:  # same weights, adapters in fp32; numerics as for the rows above
                    data[(n, p, FP32A)] = BL.check_numerics(base, a.float(), b.float(), x, g, p)
                errs = data[(n, p, FP32A)]
                rows = _fp32_adapter_rows(BL, shape, n, r, p, mode, base, a, b, x, g, errs)
                grads_ok = all(row.get("grad_dtypes_ok", True) for row in rows)
            else:
                rows = BL._time_mode(shape, n, r, p, mode, base, a, b, x, g, errs)
            floor = error_floor(dtype, shape.d_in + shape.d_out + r)
            numerics = {k: (errs[f"err_{k}"], 2 * errs[f"err_torch_{k}"] + floor) for k in ("y", "dx", "dA", "dB")}
            rec.update(rows=[dict(row, case=name, dtype=_dt(dtype)) for row in rows], target=RATIO_TARGETS[target],
                       target_key=target, numerics=numerics,
                       numerics_ok=grads_ok and all(e <= bnd for e, bnd in numerics.values()))
    wk.emit("arrangements", rows=BL.arrangement_rows())


def _qlora_ratio_case(BL, rec: dict, data: dict, name: str, n: int, p: float, mode: str, dry: bool) -> None:
    """One QLoRA ratios case (bench_lora_linear's QLoRA providers, timed by its _time_qlora_mode): 8192 x 4096->4096
    bf16 r=16 (dry: 37 x 64->48 fp32 r=4 on the CPU), NF4 with double quantization, fp32 adapters; the floor
    (our dequantization + F.linear), peft-bnb where bitsandbytes imports and works, peft-style, ours-AB and ours-B
    (arrangement "auto").  Numerics once per weight: ours within 2 x torch's composition in the run's dtypes +
    error_floor, against float64 on the dequantized W."""
    import torch
    from tests.helpers import error_floor

    if QLORA not in data:
        data.clear()  # the dense cases' tensors
        if not dry:
            torch.cuda.empty_cache()
        if dry:
            shape, r, dtype, device = BL.Shape("tiny 64→48", 64, 48), 4, torch.float32, "cpu"
        else:
            shape, r, dtype, device = BL.LLAMA2_7B[0], 16, torch.bfloat16, "cuda"
        torch.manual_seed(0)
        case = BL.build_qlora_case(shape, n, r, p, dtype, device)
        provs = BL.qlora_providers(case)
        numerics = BL.check_qlora_numerics(case, provs)
        floor = error_floor(dtype, shape.d_in + shape.d_out + r)
        bounds = {f"{prov} {k}": (errs[f"err_{k}"], 2 * numerics["torch"][f"err_torch_{k}"] + floor)
                  for prov, errs in numerics.items() if prov.startswith("ours-")
                  for k in ("y", "dx", "dA", "dB") if isinstance(errs[f"err_{k}"], float)}
        data[QLORA] = (case, provs, numerics, bounds)
        if case.bnb_note:
            print(f"[ratios] qlora: {case.bnb_note}; the QLoRA speed-up is over peft-style", flush=True)
    case, provs, numerics, bounds = data[QLORA]
    rows = BL._time_qlora_mode(case, mode, provs, numerics)
    rec.update(rows=[dict(row, case=name) for row in rows], target=RATIO_TARGETS[QLORA],
               target_key=QLORA, numerics=bounds, numerics_ok=all(e <= bnd for e, bnd in bounds.values()),
               bnb_note=case.bnb_note)


# --------------------------------------------------------------------------------------------------------------
# Stage "rsvd"
# --------------------------------------------------------------------------------------------------------------

def rsvd_plan(dry: bool):
    ks = (8, 16) if dry else (64, 128, 256)
    return (["test batch", "ours k=4r niter=5 (target)", "ours k=4r niter=5, small_svd=torch",
             "ours k=4r niter=6 (default)", "LoRA-One svd_lowrank q=512 niter=16"]
            + [f"jacobi vs linalg k={k}" for k in ks])


def stage_rsvd(wk: Worker) -> None:
    import torch

    import bench_rsvd as BR
    from utils import bench_ms

    import lora_kernels
    from lora_kernels import _extension, rsvd, settings

    dev = "cpu" if wk.dry else "cuda"
    batch, m, n, r = (4, 64, 64, 4) if wk.dry else (32, 4096, 4096, 16)
    ext = dict(cpu=lora_kernels.has_extension("cpu"), cuda=lora_kernels.has_extension("cuda"),
               reason=_extension.unavailable_reason())
    wk.emit("extension", **ext)
    plan = rsvd_plan(wk.dry)
    st = {}
    spectrum = "i^-0.5"
    common = dict(batch=batch, m=m, n=n, r=r, spectrum=spectrum, tensors_on=dev)  # "device" is the stamp

    name = plan[0]
    if wk.allows(name, need=3.0):
        with wk.case(name) as rec:
            U_t, V_t = BR.make_factors(batch, m, n, dev)
            A, sigma = BR.make_batch(U_t, V_t, BR.SPECTRA[spectrum])
            del V_t
            st.update(A=A, sigma=sigma, U_t=U_t)
            rec.update(**common)

    rsvd_mod = importlib.import_module("lora_kernels.ops.rsvd")  # the module (whose small_svd rsvd calls)

    def capture_core(M):  # rsvd's own k x k core (R2^T, float64), for the Jacobi comparison below
        st.setdefault("core", M.detach().clone())
        return orig_small_svd(M)

    orig_small_svd = rsvd_mod.small_svd

    def ours(name, niter, small_svd=None):
        if "A" not in st:
            return wk.skip(name, "no test batch (cut)")
        if not wk.allows(name, need=3.0):
            return
        with wk.case(name) as rec:
            A = st["A"]
            gen = torch.Generator(device=dev).manual_seed(1)
            ctx = settings.override(small_svd=small_svd) if small_svd else nullcontext()
            with ctx:
                rsvd_mod.small_svd = capture_core
                try:
                    U, S = rsvd(A, r, niter=niter, generator=gen)[:2]  # also the warm-up
                finally:
                    rsvd_mod.small_svd = orig_small_svd
                acc = BR.accuracy(U, S, st["U_t"], st["sigma"], r)
                ms = bench_ms(lambda: rsvd(A, r, niter=niter, generator=gen), warmup_ms=5, rep_ms=50)
            st.setdefault("ms", {})[name] = ms
            small = small_svd or ("jacobi" if (dev == "cuda" and ext["cuda"]) else "torch")
            rec.update(method=name, k=4 * r, niter=niter, passes=2 + 2 * niter, ms=ms, small_svd=small,
                       target_ms=10.0, target_sin=1e-3, **acc, **common)

    ours(plan[1], 5)
    ours(plan[2], 5, small_svd="torch")
    ours(plan[3], 6)
    name = plan[4]
    if "A" not in st:
        wk.skip(name, "no test batch (cut)")
    elif wk.allows(name, need=5.0):
        with wk.case(name) as rec:
            sub = 2
            As = st["A"][:sub]
            q = min(512, m, n)

            def lowrank():
                outs = [torch.svd_lowrank(As[i], q=q, niter=16) for i in range(sub)]
                return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

            U, S = lowrank()
            acc = BR.accuracy(U, S, st["U_t"][:sub], st["sigma"], r)
            ms = _median_ms(lowrank, dev, reps=2) * batch / sub
            ours_ms = st.get("ms", {}).get(plan[1])
            rec.update(method=f"svd_lowrank q={q} niter=16 looped, {sub} matrices scaled to {batch}", ms=ms,
                       passes=2 + 2 * 16, speedup_of_target_setting=(ms / ours_ms) if ours_ms else "", **acc, **common)
    core = st.get("core")
    st.clear()
    if dev == "cuda":
        torch.cuda.empty_cache()
    for name in plan[5:]:
        k = int(name.rsplit("=", 1)[1])
        probe = torch.empty(1, 1, 1, device=dev, dtype=torch.float64)
        fn = _extension.jacobi_svd_for(probe)
        if fn is None:
            wk.skip(name, f"no Jacobi solver for {dev}: {_extension.unavailable_reason() or 'not built with CUDA'}")
            continue
        if not wk.allows(name, need=3.0):
            continue
        with wk.case(name) as rec:
            if core is not None and core.shape[-1] == k:
                M, source = core.to(torch.float64), "rsvd's own cores (R2^T of the target run)"
            else:
                gen = torch.Generator(device=dev).manual_seed(k)
                M, source = torch.randn(batch, k, k, dtype=torch.float64, device=dev, generator=gen), "randn"
            U, S, V = fn(M)  # the first call is the first run of the kernel at this k
            S_ref = torch.linalg.svdvals(M)
            sv_err = ((S - S_ref).abs().amax(-1) / S_ref[..., 0]).max().item()
            recon = ((U * S.unsqueeze(-2)) @ V.mT - M).flatten(1).norm(dim=1) / M.flatten(1).norm(dim=1)
            eye = torch.eye(k, dtype=M.dtype, device=dev)
            orth = max((U.mT @ U - eye).abs().max().item(), (V.mT @ V - eye).abs().max().item())
            jac_ms = _median_ms(lambda: fn(M), dev, reps=5)
            lin_ms = _median_ms(lambda: torch.linalg.svd(M), dev, reps=3)
            bound = 1e-10
            rec.update(k=k, batch=M.shape[0], dtype="float64", tensors_on=dev, matrices=source, solver="CUDA Jacobi" if dev == "cuda"
                       else "CPU Jacobi twin (dry run)", jacobi_ms=jac_ms, linalg_ms=lin_ms,
                       sigma_err=sv_err, recon_err=recon.max().item(), orth_err=orth, bound=bound,
                       ok=max(sv_err, recon.max().item(), orth) <= bound)


# --------------------------------------------------------------------------------------------------------------
# Stage "e2e"
# --------------------------------------------------------------------------------------------------------------

def e2e_plan(dry: bool):
    # "peft+patch": the "peft" model, then lora_kernels.patch_peft (PEFT's fp32 adapters served by our op); last,
    # so it never displaces the rows before it
    return (["base model"] + [f"{prov} {mode}" for mode in ("AB", "B") for prov in ("peft", "lora_kernels")]
            + [f"peft+patch {mode}" for mode in ("AB", "B")])


def _run_peft_patched(BE, base, mode, p, r, batch, seq, steps, dev) -> dict:
    """bench_e2e.run_config for the PEFT model built exactly as its "peft" provider (lora_A frozen for B), then
    patched by lora_kernels.patch_peft: run_config's own adapt is wrapped for the call."""
    import lora_kernels

    adapt, counts = BE.adapt, {}

    def patched(base, provider, mode, p, r):
        model = lora_kernels.patch_peft(adapt(base, "peft", mode, p, r))
        counts["patched_layers"] = sum(1 for m in model.modules() if lora_kernels.is_peft_patched(m))
        counts["adapter_dtype"] = next(_dt(q.dtype) for n, q in model.named_parameters() if "lora_B" in n)
        return model

    BE.adapt = patched
    try:
        row = BE.run_config(base, "peft+patch", mode, p, False, r, batch, seq, steps, dev)
    finally:
        BE.adapt = adapt
    return dict(row, **counts)


def stage_e2e(wk: Worker) -> None:
    import torch

    plan = e2e_plan(wk.dry)
    try:
        import transformers  # noqa: F401

        import bench_e2e as BE
    except Exception as exc:
        for name in plan:
            wk.skip(name, f"transformers not importable ({type(exc).__name__}: {exc})")
        return
    try:
        import peft  # noqa: F401

        has_peft = True
    except Exception as exc:
        has_peft, peft_err = False, f"peft not importable ({type(exc).__name__}: {exc})"
    if wk.dry:
        dev, dtype, layers, batch, seq, steps, r = "cpu", torch.float32, 1, 2, 16, 2, 4
    else:
        dev, dtype, layers, batch, seq, steps, r = "cuda", torch.bfloat16, 4, 4, 2048, 5, 16
    p = 0.05
    common = dict(layers=layers, batch=batch, seq=seq, r=r, steps=steps, dtype=_dt(dtype))
    wk.emit("note", text=f"{layers} layers, batch {batch}, seq {seq}, r {r}, dropout {p}, {_dt(dtype)}, {dev}")
    base = None
    if wk.allows(plan[0], need=5.0):
        with wk.case(plan[0]) as rec:
            base = BE.build_base(wk.dry, dev, dtype, layers=layers)
            rec.update(params=sum(q.numel() for q in base.parameters()), **common)
    for name in plan[1:]:
        provider, mode = name.split()
        if base is None:
            wk.skip(name, "no base model (cut)")
            continue
        if provider in ("peft", "peft+patch") and not has_peft:
            wk.skip(name, peft_err)
            continue
        if not wk.allows(name, need=5.0):
            continue
        with wk.case(name) as rec:
            try:
                if provider == "peft+patch":
                    row = _run_peft_patched(BE, base, mode, p, r, batch, seq, steps, dev)
                else:
                    row = BE.run_config(base, provider, mode, p, False, r, batch, seq, steps, dev)
            finally:
                if dev == "cuda":
                    torch.cuda.empty_cache()
            rec.update(row=dict(row, **common))


STAGE_FUNCS = {"correct": stage_correct, "ratios": stage_ratios, "rsvd": stage_rsvd, "e2e": stage_e2e}


def worker_main(args) -> int:
    wk = Worker(args.worker, os.path.abspath(args.outdir), args.deadline, args.dry_run, args.shard)
    rc = 0
    try:
        STAGE_FUNCS[args.worker](wk)
    except Exception as exc:
        wk.emit("error", text=f"{type(exc).__name__}: {exc}"[:1500], traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()
        rc = 1
    wk.emit("done", compile=wk.compile)
    return rc


# ==============================================================================================================
# Driver side
# ==============================================================================================================

class Log:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def schedule(stages, budget: float, t0: float):
    """Absolute deadline of each stage: cumulative shares, the last selected stage runs to budget - reserve."""
    scale = budget / REF_BUDGET
    end = t0 + budget - RESERVE * scale
    out, acc = {}, t0
    for i, s in enumerate(stages):
        acc += SHARE[s] * scale
        out[s] = end if i == len(stages) - 1 else min(acc, end)
    return out, scale


def _kill(proc) -> None:
    """SIGTERM then SIGKILL to a child we started (its own session: it and what it started, e.g. ptxas)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Driver:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.outdir = os.path.abspath(args.outdir)
        self.children: List[subprocess.Popen] = []
        self.build: Optional[subprocess.Popen] = None
        self.build_info: dict = {"status": "not started"}
        self.results: Dict[str, dict] = {}
        self.env: dict = {}
        self.env_window = 0.0
        self.no_cuda = False

    # ---------------------------------------------------------------------------------------------- processes
    def spawn(self, stage: str, deadline: float, shard: Optional[int] = None) -> subprocess.Popen:
        cmd = [sys.executable, os.path.abspath(__file__), self.outdir, "--worker", stage, "--deadline", repr(deadline)]
        if self.dry:
            cmd.append("--dry-run")
        if shard is not None:
            cmd += ["--shard", str(shard)]
        log = open(os.path.join(self.outdir, "logs", f"{stage}{'' if shard is None else f'_{shard}'}.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        log.close()
        self.children.append(proc)
        return proc

    def wait(self, procs, deadline: float) -> bool:
        """Wait for procs until the deadline; kill the rest.  True if something was killed."""
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        killed = [p for p in procs if p.poll() is None]
        for p in killed:
            _kill(p)
        return bool(killed)

    def start_build(self, say: Log) -> None:
        import torch

        if self.dry or self.args.no_build or "rsvd" not in self.stages:
            self.build_info = {"status": "skipped", "why": "dry run" if self.dry else
                               "--no-build" if self.args.no_build else "rsvd stage not selected"}
            return
        import lora_kernels

        if lora_kernels.has_extension("cuda"):
            self.build_info = {"status": "not needed", "why": "lora_kernels._C already has CUDA"}
            return
        if not torch.cuda.is_available():
            self.build_info = {"status": "skipped", "why": "no CUDA device"}
            return
        cap = torch.cuda.get_device_capability()
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{cap[0]}.{cap[1]}", MAX_JOBS="4")
        if not (env.get("CUDA_HOME") or env.get("CUDA_PATH")) and os.path.isfile(_CUDA_RUNTIME_H):
            # torch finds the toolkit as nvcc's grandparent folder: a wrapper script (/usr/local/bin/nvcc) makes that
            # /usr/local, without the CUDA headers (seen on a CPU machine with nvcc 13.0)
            env["CUDA_HOME"] = os.path.dirname(os.path.dirname(_CUDA_RUNTIME_H))
        # -v: the compiler's messages reach build.log (setup.py reports a failed extension build on stderr only)
        cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", REPO]
        log = open(os.path.join(self.outdir, "logs", "build.log"), "w")
        self.build = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                      start_new_session=True)
        log.close()
        self.build_t0 = time.time()
        self.build_info = {"status": "running", "arch": env["TORCH_CUDA_ARCH_LIST"],
                           "cuda_home": env.get("CUDA_HOME") or env.get("CUDA_PATH") or "(torch's search)"}
        say(f"  extension build started in the background (TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, "
            f"MAX_JOBS=4; logs/build.log)")

    def finish_build(self, until: float, say: Log) -> None:
        if self.build is None or self.build_info.get("status") != "running":
            return
        until = min(until, self.build_t0 + BUILD_MAX)
        while self.build.poll() is None and time.time() < until:
            time.sleep(0.2)
        secs = time.time() - self.build_t0
        if self.build.poll() is None:
            _kill(self.build)
            self.build_info.update(status="cut", seconds=secs)
            say(f"  extension build cut after {secs:.0f} s (rsvd runs without the Jacobi solver)")
        else:
            rc = self.build.returncode
            self.build_info.update(status="ok" if rc == 0 else f"failed rc={rc}", seconds=secs)
            say(f"  extension build finished in {secs:.0f} s, rc={rc}")

    def kill_all(self) -> None:
        for p in self.children + ([self.build] if self.build is not None else []):
            _kill(p)

    # ---------------------------------------------------------------------------------------------- stages
    def run(self) -> int:
        args = self.args
        t0 = time.time()
        os.makedirs(os.path.join(self.outdir, "logs"), exist_ok=True)
        os.makedirs(os.path.join(self.outdir, "records"), exist_ok=True)
        self._clean()
        say = Log(os.path.join(self.outdir, "gpu_check.log"))
        self.stages = [s for s in STAGES if s in args.stages]
        deadlines, scale = schedule(self.stages, args.budget, t0)
        say(f"# gpu_check {'--dry-run ' if self.dry else ''}budget {args.budget:.0f} s, stages {','.join(self.stages)}"
            f", started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        for s in self.stages:
            say(f"  {s:8s} deadline +{deadlines[s] - t0:6.1f} s (share {SHARE[s] * scale:.0f} s)")
        cache_dir = _triton_cache_dir()
        self.cache = {"dir": cache_dir, "before": _count_files(cache_dir) if os.path.isdir(cache_dir) else 0,
                      "warm_cache_option": bool(args.warm_cache)}
        say(f"  triton cache {cache_dir}: {self.cache['before']} files before the run"
            + (" (--warm-cache)" if args.warm_cache else ""))
        ti = time.time()
        import torch  # noqa: F401  (after TRITON_CACHE_DIR / TRITON_INTERPRET / CUDA_VISIBLE_DEVICES are set)

        say(f"  import torch: {time.time() - ti:.1f} s")
        self.warm_cache_check(say)
        try:
            if not self.dry and not torch.cuda.is_available() and set(self.stages) - {"env"}:
                say("no CUDA device: the stages other than env need one (use --dry-run for a CPU run of the script)")
                for s in self.stages:
                    if s != "env":
                        self.results[s] = dict(status="skipped", seconds=0.0, budget=0.0, note="no CUDA device")
                if "env" in self.stages:
                    self.stage_env(say, t0)
                self.no_cuda = True
                self.finish(say, t0)
                return 2
            for s in self.stages:
                if s != "env" and self.build is None and self.build_info["status"] == "not started":
                    self.start_build(say)
                start = time.time()
                left = deadlines[s] - start
                if s != "env" and left < MIN_START[s] * scale:
                    self.results[s] = dict(status="cut", seconds=0.0, budget=max(left, 0.0),
                                           note=f"not started: {max(left, 0):.0f} s left < {MIN_START[s] * scale:.0f} s",
                                           cut=[f"{c} (not started)" for c in self.plan(s)])
                    say(f"== {s}: cut before it started ({left:.0f} s left)")
                    continue
                say(f"== {s}: start at +{start - t0:.0f} s, until +{deadlines[s] - t0:.0f} s")
                if s == "env":
                    self.env_window = left
                    self.stage_env(say, t0)
                    continue
                if s == "rsvd":
                    self.finish_build(deadlines[s] - MIN_START[s] * scale, say)
                    start = time.time()
                nproc = 1
                if s == "correct":
                    nproc = self.args.workers or (2 if self.dry else max(2, min(10, (os.cpu_count() or 4) - 4)))
                    procs = [self.spawn(s, deadlines[s], shard=i) for i in range(nproc)]
                else:
                    procs = [self.spawn(s, deadlines[s])]
                killed = self.wait(procs, deadlines[s])
                res = self.collect(s, killed, procs)
                res.update(seconds=time.time() - start, budget=deadlines[s] - start, workers=nproc,
                           build_running=self.build is not None and self.build.poll() is None)
                self.results[s] = res
                say(f"== {s}: {res['status']} in {res['seconds']:.0f} s" + (f" ({res['note']})" if res.get("note") else ""))
            if self.build is not None and self.build.poll() is None:
                _kill(self.build)
                self.build_info.update(status="cut", seconds=time.time() - self.build_t0)
        finally:
            self.kill_all()
        return self.finish(say, t0)

    def plan(self, stage: str) -> List[str]:
        if stage == "correct":
            return [name for name, _ in correct_cases(self.dry)]
        if stage == "ratios":
            return [c[0] for c in ratio_plan(self.dry)]
        if stage == "rsvd":
            return rsvd_plan(self.dry)
        if stage == "e2e":
            return e2e_plan(self.dry)
        return []

    def collect(self, stage: str, killed: bool, procs) -> dict:
        recs = []
        rdir = os.path.join(self.outdir, "records")
        for fn in sorted(os.listdir(rdir)):
            if fn == f"{stage}.jsonl" or (fn.startswith(f"{stage}_") and fn.endswith(".jsonl")):
                recs += _read_jsonl(os.path.join(rdir, fn))
        results = {r["case"]: r for r in recs if r["kind"] == "result"}
        started = {r["case"] for r in recs if r["kind"] == "start"}
        skips = {r["case"]: r for r in recs if r["kind"] == "skip"}
        errors = [r for r in recs if r["kind"] == "error"]
        dones = [r for r in recs if r["kind"] == "done"]
        cut, skipped = [], []
        for case in self.plan(stage):
            if case in results:
                continue
            if case in skips and not skips[case].get("budget"):
                skipped.append(f"{case} ({skips[case]['why']})")
            elif case in skips:
                cut.append(f"{case} (skipped: budget)")
            elif case in started:
                cut.append(f"{case} (in flight when {'the stage was cut' if killed else 'its worker died'})")
            else:
                cut.append(f"{case} (not started)")
        crashed = [p.returncode for p in procs if p.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL)]
        if killed:
            status = "cut"
        elif errors or crashed or len(dones) < len(procs):
            status = "failed"
        else:
            status = "cut" if cut else "ok"
        comp = {"hits": 0, "misses": 0, "seconds": 0.0}
        if len(dones) == len(procs):
            for d in dones:
                for k in comp:
                    comp[k] += d["compile"][k]
        else:  # killed: what the finished cases recorded
            for r in results.values():
                comp["hits"] += r.get("cache_hits", 0)
                comp["misses"] += r.get("compiles", 0)
                comp["seconds"] += r.get("compile_s", 0.0)
        notes = []
        if cut:
            notes.append(f"cut {len(cut)}: " + "; ".join(cut))
        if skipped:
            notes.append("skipped: " + "; ".join(skipped))
        if errors:
            notes.append("stage error: " + errors[0]["text"])
        if crashed:
            notes.append(f"worker exit codes {crashed}")
        return dict(status=status, records=recs, results=results, cut=cut, skipped=skipped, compile=comp,
                    note=" | ".join(notes), killed=killed)

    def warm_cache_check(self, say: Log) -> None:
        """A cache built offline by bench/warm_triton_cache.py holds its manifest: say whether this machine's Triton
        fingerprint (the machine's part of every cache key) equals the one it was built with."""
        path = os.path.join(self.cache["dir"], "manifest.json")
        if not os.path.isfile(path):
            return
        try:
            import torch

            import warm_triton_cache as WC

            with open(path) as f:
                built = json.load(f)
            cap = 90
            if not self.dry and torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability(0)
                cap = 10 * major + minor
            match, line = WC.compare_fingerprints(built.get("fingerprint", {}), WC.fingerprint(cap))
            self.cache.update(built=f"{built.get('commit', '?')} {built.get('date', '?')}", fingerprint_match=match,
                              built_kernels=built.get("compiled", 0) + built.get("already", 0))
            say(f"  warm cache built by bench/warm_triton_cache.py at {self.cache['built']} "
                f"({self.cache['built_kernels']} kernels for sm_{built.get('capability')}): {line}")
        except Exception as exc:  # informative only: never the reason a GPU window is lost
            self.cache.update(fingerprint_match=None)
            say(f"  warm cache manifest unreadable ({type(exc).__name__}: {exc})")

    def stage_env(self, say: Log, t0: float) -> None:
        import torch
        import triton

        import lora_kernels
        from lora_kernels import _extension

        start = time.time()
        e = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                 torch=torch.__version__, triton=triton.__version__, cuda=str(torch.version.cuda),
                 dry_run=self.dry, triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
                 lora_kernels_env=" ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                           if k.startswith("LORA_KERNELS_")) or "(none)")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            e.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                     sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                     device_count=torch.cuda.device_count())
            try:
                q = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
                     "power.limit,temperature.gpu,persistence_mode")
                out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                                     text=True, timeout=15).stdout.strip().splitlines()
                vals = [v.strip() for v in out[0].split(",")] if out else []
                for key, v in zip(q.split(","), vals):
                    e[f"smi_{key}"] = v
            except Exception as exc:
                e["smi_error"] = f"nvidia-smi: {type(exc).__name__}: {exc}"
        else:
            e.update(device=f"cpu ({platform.processor() or platform.machine()})", sm_count="", capability="")
        for mod in ("peft", "transformers", "matplotlib", "numpy"):  # metadata only: the stages import them
            try:
                e[mod] = importlib.metadata.version(mod) if importlib.util.find_spec(mod) else "missing"
            except Exception as exc:
                e[mod] = f"missing ({type(exc).__name__})"
        e.update(ext_cpu=lora_kernels.has_extension("cpu"), ext_cuda=lora_kernels.has_extension("cuda"),
                 ext_reason=_extension.unavailable_reason() or "")
        self.env = e
        for k, v in e.items():
            say(f"  {k}: {v}")
        self.results["env"] = dict(status="ok", seconds=time.time() - start, budget=self.env_window, note="")

    # ---------------------------------------------------------------------------------------------- output
    def _clean(self) -> None:
        """A reused OUTDIR: drop what a previous run of this script wrote there (records are appended to)."""
        rdir = os.path.join(self.outdir, "records")
        for root, dirs, files in os.walk(rdir, topdown=False):
            for fn in files:
                os.remove(os.path.join(root, fn))
            for d in dirs:
                os.rmdir(os.path.join(root, d))
        for fn in OUR_CSVS:
            path = os.path.join(self.outdir, fn)
            if os.path.exists(path):
                os.remove(path)

    def finish(self, say: Log, t0: float) -> int:
        from utils import write_csv

        out = self.outdir
        if not self.env:  # env stage not selected: the stamp only
            try:
                import torch
                import triton

                self.env = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                torch=torch.__version__, triton=triton.__version__)
            except Exception:
                self.env = {}
        if self.env:
            write_csv(os.path.join(out, "env.csv"), [dict(key=k, value=v) for k, v in self.env.items()])
        stage_rows = []
        for s in self.stages:
            r = self.results.get(s, dict(status="not run", seconds=0.0, budget=0.0, note=""))
            comp = r.get("compile", {})
            stage_rows.append(dict(stage=s, status=r["status"], seconds=round(r["seconds"], 1),
                                   budget_s=round(r.get("budget", 0.0), 1), workers=r.get("workers", ""),
                                   compiles=comp.get("misses", ""), cache_hits=comp.get("hits", ""),
                                   compile_s=round(comp.get("seconds", 0.0), 1) if comp else "",
                                   cut="; ".join(r.get("cut", [])), skipped="; ".join(r.get("skipped", [])),
                                   note=r.get("note", "")))
        write_csv(os.path.join(out, "stages.csv"), stage_rows)
        fams, check_rows = self.correct_tables()
        if check_rows:
            write_csv(os.path.join(out, "correct.csv"), check_rows)
        if fams:
            write_csv(os.path.join(out, "correct_families.csv"), fams)
        ratio_rows, arr_rows = self.ratio_tables()
        if ratio_rows:
            write_csv(os.path.join(out, "ratios.csv"), ratio_rows)
        if arr_rows:
            write_csv(os.path.join(out, "ratios_arrangements.csv"), arr_rows)
        rsvd_rows, jac_rows = self.rsvd_tables()
        if rsvd_rows:
            write_csv(os.path.join(out, "rsvd.csv"), rsvd_rows)
        if jac_rows:
            write_csv(os.path.join(out, "rsvd_jacobi.csv"), jac_rows)
        e2e_rows = self.e2e_rows()
        if e2e_rows:
            write_csv(os.path.join(out, "e2e.csv"), e2e_rows)
        self.plots(ratio_rows, e2e_rows)
        cdir = self.cache["dir"]
        self.cache["after"] = _count_files(cdir) if os.path.isdir(cdir) else 0
        failed = [f for f in fams if f["result"] == "FAIL"]
        bad_stage = [s for s in self.stages if self.results.get(s, {}).get("status") == "failed"]
        bad_other = self.other_failures(ratio_rows, jac_rows)
        rc = 1 if (failed or bad_stage or bad_other) else 0
        lines = self.summary(fams, ratio_rows, arr_rows, rsvd_rows, jac_rows, e2e_rows, rc, bad_other, t0)
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        summary = dict(rc=rc, wall_s=time.time() - t0, budget=self.args.budget, dry_run=self.dry, env=self.env,
                       build=self.build_info, cache=self.cache, stages=stage_rows, families=fams,
                       summary_lines=len(lines), failures=bad_other)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        for line in lines:
            say(line)
        return rc

    def correct_tables(self):
        res = self.results.get("correct")
        if not res or "results" not in res:
            return [], []
        rows, errors = [], {}
        for case, rec in res["results"].items():
            for c in rec.get("checks", []):
                rows.append(dict(case=case, families="; ".join(c["families"]), label=c["label"], out=c["out"],
                                 rel_err=c["err"], bound=c["bound"], ok=c["ok"], note=c.get("note", ""),
                                 seconds=round(rec.get("seconds", 0.0), 1)))
            if "error" in rec:
                errors[case] = rec["error"]
                rows.append(dict(case=case, families="", label="(case raised)", out="", rel_err="", bound="",
                                 ok=False, note=rec["error"][:300]))
        case_fams = {}  # which families a case serves, for cases that raised or were cut
        for case, rec in res["results"].items():
            for c in rec.get("checks", []):
                case_fams.setdefault(case, set()).update(c["families"])
        fams = []
        for fam in FAMILIES:
            mine = [r for r in rows if fam in r["families"].split("; ")]
            errs = [c for c in errors if fam in case_fams.get(c, set()) or _case_family_guess(c) == fam]
            cut = [c.split(" (")[0] for c in res.get("cut", []) if _case_family_guess(c.split(" (")[0]) == fam]
            worst = max((r["rel_err"] for r in mine if isinstance(r["rel_err"], float)), default=float("nan"))
            margins = [r["rel_err"] / r["bound"] for r in mine if isinstance(r["rel_err"], float) and r["bound"]]
            nfail = sum(1 for r in mine if not r["ok"])
            if nfail or errs:
                result = "FAIL"
            elif mine:
                result = "PASS" + ("*" if cut else "")
            else:
                result = "cut" if cut else "none"
            first_bad = next((f"{r['label']} {r['out']}: {_fmt(r['rel_err'])} > {_fmt(r['bound'])} {r['note']}"
                              for r in mine if not r["ok"]), "")
            if errs and not first_bad:
                first_bad = f"{errs[0]}: {errors[errs[0]][:160]}"
            fams.append(dict(family=fam, result=result, checks=len(mine), failed=nfail, errors=len(errs),
                             worst_rel_err=worst, worst_err_over_bound=max(margins, default=float("nan")),
                             cut_cases="; ".join(cut), first_failure=first_bad))
        return fams, rows

    def ratio_tables(self):
        res = self.results.get("ratios")
        if not res or "results" not in res:
            return [], []
        rows = []
        for name, *_ in ratio_plan(self.dry):
            rec = res["results"].get(name)
            if rec and "rows" in rec:
                for row in rec["rows"]:
                    rows.append(dict(row, target=rec["target"], numerics_ok=rec["numerics_ok"]))
        arr = []
        for r in res["records"]:
            if r["kind"] == "arrangements":
                arr = r["rows"]
        return rows, arr

    def rsvd_tables(self):
        res = self.results.get("rsvd")
        if not res or "results" not in res:
            return [], []
        rows, jac = [], []
        for name in rsvd_plan(self.dry):
            rec = res["results"].get(name)
            if not rec:
                continue
            base = {k: v for k, v in rec.items() if k not in ("kind", "t", "shard", "traceback")}
            (jac if name.startswith("jacobi") else rows).append(dict(base, case=name))
        return rows, jac

    def e2e_rows(self):
        res = self.results.get("e2e")
        if not res or "results" not in res:
            return []
        rows = []
        for name in e2e_plan(self.dry)[1:]:
            rec = res["results"].get(name)
            if rec and "row" in rec:
                rows.append(dict(rec["row"], case=name))
            elif rec and "error" in rec:
                provider, mode = name.split()
                rows.append(dict(case=name, provider=provider, mode=mode, error=rec["error"][:300]))
        by = {(r.get("provider"), r.get("mode")): r for r in rows}
        for mode in ("AB", "B"):
            for prov in ("lora_kernels", "peft+patch"):
                peft, ours = by.get(("peft", mode)), by.get((prov, mode))
                if peft and ours and peft.get("ms") and ours.get("ms"):
                    ours["speedup_vs_peft"] = peft["ms"] / ours["ms"]
                    ours["memory_saving_vs_peft"] = ((1 - ours["peak_gib"] / peft["peak_gib"]) if peft["peak_gib"]
                                                     else "")
        return rows

    def other_failures(self, ratio_rows, jac_rows) -> List[str]:
        bad = []
        for case, rec in self.results.get("ratios", {}).get("results", {}).items():
            if "error" in rec:
                bad.append(f"ratios {case}: {rec['error'][:120]}")
            elif not rec.get("numerics_ok", True):
                bad.append(f"ratios {case}: numerics vs float64 out of bound")
        for case, rec in self.results.get("rsvd", {}).get("results", {}).items():
            if "error" in rec:
                bad.append(f"rsvd {case}: {rec['error'][:120]}")
            elif case.startswith("jacobi") and not rec.get("ok", True):
                bad.append(f"rsvd {case}: Jacobi disagrees with torch.linalg")
        for case, rec in self.results.get("e2e", {}).get("results", {}).items():
            if "error" in rec:
                bad.append(f"e2e {case}: {rec['error'][:120]}")
        return bad

    def plots(self, ratio_rows, e2e_rows) -> None:
        from utils import plot_ratios

        dev = self.env.get("device", "")
        try:
            if ratio_rows:
                plot_ratios(os.path.join(self.outdir, "ratios.png"),
                            [r for r in ratio_rows if r["provider"] != "linear" and not _is_qlora(r)], "case",
                            "provider", "ratio",
                            f"time / nn.Linear ({dev})")
            rows = [r for r in e2e_rows if r.get("tokens_per_s")]
            if rows:
                plot_ratios(os.path.join(self.outdir, "e2e.png"), rows, "mode", "provider", "tokens_per_s",
                            f"training tokens/s, higher is better ({dev})")
        except Exception as exc:  # a plot is never worth failing the run
            print(f"plots: {type(exc).__name__}: {exc}")

    def qlora_summary(self, rows: List[dict], arr_rows: List[dict]) -> List[str]:
        """Three lines: what was measured, time / floor (and peak MB) per mode and provider, the target with the
        auto arrangement's choice and the numerics."""
        if not rows:
            return []
        h = rows[0]
        L = [f"qlora ({h['shape']}, NF4 double quant by {h['nf4_from']}, r={h['r']}, {h['dtype']}, "
             f"{h['adapter_dtype']} adapters; ms of {h['provider']}, then time / it"
             + ("" if self.dry else ", fwd+bwd peak MB") + "):"]
        parts = []
        for mode in dict.fromkeys(r["mode"] for r in rows):
            mr = [r for r in rows if r["mode"] == mode]
            parts.append(f"{mode}: {_fmt(mr[0]['ms'], '.3f')} ms; " + "; ".join(
                f"{r['provider']} {_fmt(r['ratio'], '.3f')}"
                + (f" {r['peak_mb']:.0f}MB" if isinstance(r.get("peak_mb"), float) and mode != "fwd" else "")
                for r in mr[1:]))
        L.append("  " + " | ".join(parts))
        auto = "; ".join(f"{a['pass']} {a['choice']}" for a in arr_rows if a.get("weight") == "NF4Tensor")
        L.append(f"  {_qlora_target(rows, self.dry)} | auto: {auto or ('fused (off CUDA)' if self.dry else '-')}"
                 + (" | numerics ok" if all(r["numerics_ok"] for r in rows) else " | NUMERICS FAILED"))
        return L

    def summary(self, fams, ratio_rows, arr_rows, rsvd_rows, jac_rows, e2e_rows, rc, bad_other, t0) -> List[str]:
        """At most SUMMARY_MAX_LINES lines: 7 stage lines, 9 correctness (two families a line), 9 ratios, 3 qlora,
        5 rsvd, 2 e2e, cache, result."""
        e = self.env
        dry = self.dry
        L = [f"== gpu_check{' DRY RUN (CPU, interpreter; no performance claim)' if dry else ''}: "
             f"{e.get('device', '?')} | torch {e.get('torch', '?')} | triton {e.get('triton', '?')} | "
             f"{time.strftime('%Y-%m-%d %H:%M')} | wall {time.time() - t0:.0f} s of {self.args.budget:.0f} s =="]
        L.append(f"{'stage':8s} {'status':7s} {'time':>6s} {'window':>6s} {'compiled/hits':>14s}  note")
        for s in self.stages:
            r = self.results.get(s, {})
            comp = r.get("compile")
            cstr = f"{comp['misses']}/{comp['hits']} {comp['seconds']:.0f}s" if comp else "-"
            note = r.get("note", "")
            if s == "env" and e:
                note = (f"{e.get('sm_count') or '-'} SMs, driver {e.get('smi_driver_version', '-')}, clock "
                        f"{e.get('smi_clocks.sm', '-')}/{e.get('smi_clocks.max.sm', '-')}, _C cuda {e.get('ext_cuda')}, "
                        f"peft {str(e.get('peft', '-'))[:12]}, transformers {str(e.get('transformers', '-'))[:12]}")
            if s == "correct" and r.get("workers"):
                note = f"{r['workers']} workers; {len(r.get('results', {}))}/{len(self.plan(s))} cases" + (
                    f"; {note}" if note else "")
            if s == "rsvd":
                ext = next((x for x in r.get("records", []) if x["kind"] == "extension"), None)
                note = (f"build {self.build_info.get('status')}"
                        + (f" {self.build_info['seconds']:.0f}s" if "seconds" in self.build_info else "")
                        + (f"; _C cuda {ext['cuda']}" if ext else "") + (f"; {note}" if note else ""))
            L.append(f"{s:8s} {r.get('status', 'not run'):7s} {r.get('seconds', 0):5.0f}s {r.get('budget', 0):5.0f}s "
                     f"{cstr:>14s}  {note[:140]}")
        if fams:
            L.append("correctness vs float64 (bound 2 x torch in the same dtype + floor; autotune off; NaN-poisoned; "
                     "family, checks, worst rel err, worst err/bound):")
            # two families a line, except a failed or cut one, which gets its own line for what failed or was cut
            pair: List[str] = []
            for f in fams:
                extra = f"  <- {f['first_failure'][:80]}" if f["result"] == "FAIL" else (
                    f"  (cut: {f['cut_cases'][:60]})" if f["cut_cases"] else "")
                cell = (f"{f['result']:5s} {f['family']:24s} {f['checks']:4d}  {_fmt(f['worst_rel_err'])}"
                        f"  {_fmt(f['worst_err_over_bound'], '.2f'):>4s}")
                if extra:
                    L.append(f"  {cell}{extra}")
                    continue
                pair.append(cell)
                if len(pair) == 2:
                    L.append("  " + "   |   ".join(pair))
                    pair = []
            if pair:
                L.append("  " + pair[0])
        qlora_rows = [r for r in ratio_rows if _is_qlora(r)]
        ratio_rows = [r for r in ratio_rows if not _is_qlora(r)]
        if ratio_rows:
            h = ratio_rows[0]
            L.append(f"ratios ({h['shape']}, r={h['r']}, {h['dtype']}; ms of nn.Linear, then time / nn.Linear; "
                     f"{'perf_counter' if dry else 'do_bench'} medians):")
            provs = [p for p in dict.fromkeys(r["provider"] for r in ratio_rows if FP32A not in r["case"])
                     if p != "linear"]
            # fp32 adapters (the FP32A cases) in one more column on their 16-bit case's line: time / nn.Linear, then
            # (time / ours with 16-bit adapters, same case, same run; predicted 1.01-1.03)
            f32 = {r["case"].replace(f" {FP32A}", ""): r for r in ratio_rows if r["provider"] == f"ours-{FP32A}"}
            L.append(f"  {'case':23s} {'linear':>7s} " + " ".join(f"{p[:10]:>10s}" for p in provs)
                     + (f" {'fp32A(/ours)':>13s}" if f32 else "") + "  target")
            for case in dict.fromkeys(r["case"] for r in ratio_rows if FP32A not in r["case"]):
                rr = {r["provider"]: r for r in ratio_rows if r["case"] == case}
                ours = rr.get("ours", {}).get("ratio")
                tgt = next(r["target"] for r in ratio_rows if r["case"] == case)
                mark = "" if (ours is None or dry) else (" met" if ours <= tgt else " MISSED")
                L.append(f"  {case:23s} {_fmt(rr.get('linear', {}).get('ms'), '7.3f')} " + " ".join(
                    f"{_fmt(rr.get(p, {}).get('ratio'), '10.3f')}" for p in provs)
                    + ((f" {_fmt(f32[case].get('ratio'), '.3f'):>6s}({_fmt(f32[case].get('ratio_vs_ours'), '.3f')})"
                        if case in f32 else f" {'-':>13s}") if f32 else "") + f"  <={tgt:.2f}{mark}")
            dense_arr = [a for a in arr_rows if a.get("weight") != "NF4Tensor"]
            if dense_arr:
                top = max(a.get("m_bucket", 0) for a in dense_arr)
                L.append(f"  auto (M bucket {top}): " + "; ".join(
                    f"{a['pass']}{' p>0' if a.get('dropout') else ''} {a['choice']} (fused "
                    f"{_fmt(a.get('fused_ms'), '.3f')} / split {_fmt(a.get('split_ms'), '.3f')} ms)"
                    for a in dense_arr if a.get("m_bucket") == top))
            mem = [r for r in ratio_rows if r["provider"] in ("ours", "peft", "peft-like") and r["mode"] != "fwd"
                   and r["case"].startswith("fwdbwd-") and "p=" not in r["case"] and FP32A not in r["case"]][:4]
            if mem:
                L.append("  peak / saved MB: " + "; ".join(f"{r['case'].split()[0][7:]} {r['provider']} "
                                                           f"{r['peak_mb']:.0f}/{r['saved_mb']:.1f}" for r in mem)
                         + ("; numerics ok" if all(r["numerics_ok"] for r in ratio_rows) else "; NUMERICS FAILED"))
        L += self.qlora_summary(qlora_rows, arr_rows)
        if rsvd_rows:
            h = rsvd_rows[0]
            L.append(f"rsvd (batch {h.get('batch')} x {h.get('m')}x{h.get('n')}, r={h.get('r')}, {h.get('spectrum')}; "
                     "target <= 10 ms at sinT <= 1e-3; ms, sinT, sigma err):")
            by = {r["case"]: r for r in rsvd_rows}
            torch_core = by.get("ours k=4r niter=5, small_svd=torch", {})
            for r in rsvd_rows[1:]:
                if r["case"] == "ours k=4r niter=5, small_svd=torch":
                    continue
                if "error" in r:
                    L.append(f"  {r['case'][:40]:40s} ERROR {r['error'][:70]}")
                    continue
                extra = ""
                if r["case"].endswith("(target)"):
                    extra = (f"  core {r.get('small_svd')}; with torch.linalg core {_fmt(torch_core.get('ms'), '.2f')} ms"
                             if torch_core.get("ms") else f"  core {r.get('small_svd')}")
                    if not dry:
                        extra += "  met" if r["ms"] <= 10 and r["sin_theta"] <= 1e-3 else "  MISSED"
                elif isinstance(r.get("speedup_of_target_setting"), float):
                    extra = f"  ({r['speedup_of_target_setting']:.0f}x the target setting's time)"
                L.append(f"  {r['case'][:40]:40s} {_fmt(r.get('ms'), '9.2f')}  {_fmt(r.get('sin_theta'))}"
                         f"  {_fmt(r.get('sigma_err'))}{extra}")
        if jac_rows:
            L.append("  jacobi/linalg ms, worst err: " + "; ".join(
                (f"k={r['k']} {r['jacobi_ms']:.2f}/{r['linalg_ms']:.2f} "
                 f"{_fmt(max(r['sigma_err'], r['recon_err'], r['orth_err']), '.0e')}{'' if r['ok'] else ' FAIL'}")
                if "error" not in r else f"k={r.get('k', '?')} ERROR {r['error'][:40]}" for r in jac_rows))
        for mode in ("AB", "B"):
            rr = {r.get("provider"): r for r in e2e_rows if r.get("mode") == mode}
            if not rr:
                continue
            h = next((r for r in e2e_rows if "ms" in r), {})
            head = (f"e2e {mode:2s} ({h.get('layers')} layers, {h.get('batch')}x{h.get('seq')}, r={h.get('r')}, "
                    f"p={h.get('dropout')}): " if h else f"e2e {mode}: ")
            parts = []
            for prov in ("peft", "lora_kernels", "peft+patch"):
                r = rr.get(prov)
                if r and "ms" in r:
                    parts.append(f"{prov} {r['ms']:.1f} ms {r['peak_gib']:.2f} GiB")
                elif r:
                    parts.append(f"{prov} ERROR {r.get('error', '')[:40]}")
            ours = rr.get("lora_kernels", {})
            if isinstance(ours.get("speedup_vs_peft"), float):
                saving = ours.get("memory_saving_vs_peft")
                parts.append(f"{ours['speedup_vs_peft']:.2f}x speed (>=1.25)"
                             + (f", {saving:.0%} less memory (>=25%)" if isinstance(saving, float) else ""))
            patch = rr.get("peft+patch", {})
            if isinstance(patch.get("speedup_vs_peft"), float):
                saving = patch.get("memory_saving_vs_peft")
                parts.append(f"patch {patch['speedup_vs_peft']:.2f}x"
                             + (f", {saving:.0%} less" if isinstance(saving, float) else ""))
            L.append(head + "; ".join(parts))
        c = self.cache
        comp = [self.results.get(s, {}).get("compile") for s in self.stages]
        comp = [x for x in comp if x]
        tail = [f"triton cache {c['dir']}{' (--warm-cache)' if c['warm_cache_option'] else ''}: {c['before']} files "
                f"before, {c.get('after', '?')} after; {sum(x['misses'] for x in comp)} kernels compiled "
                f"({sum(x['seconds'] for x in comp):.0f} s), {sum(x['hits'] for x in comp)} found in the cache"
                + (" (interpreter: nothing compiles)" if dry else "")
                + ({True: "; offline build's fingerprint matches", False: "; offline build's fingerprint DIFFERS",
                    None: "; offline manifest unreadable"}.get(c["fingerprint_match"], "")
                   if "fingerprint_match" in c else "")]
        cut = [s for s in self.stages if self.results.get(s, {}).get("status") == "cut"]
        verdict = "NOT RUN (no CUDA device; --dry-run runs on the CPU)" if self.no_cuda else (
            "PASS" if rc == 0 else "FAIL")
        tail.append(f"result: {verdict}" + (f" ({'; '.join(bad_other)[:150]})" if bad_other else "")
                    + (f"; cut: {', '.join(cut)}" if cut else "") + f"; logs, CSVs, PNGs in {self.outdir}")
        room = SUMMARY_MAX_LINES - len(tail)
        if len(L) > room:
            L = L[:room - 1] + [f"... ({len(L) - room + 1} lines left out: see summary.json and the CSVs)"]
        return L + tail


def _is_qlora(row: dict) -> bool:
    return str(row.get("case", "")).startswith(QLORA)


def _qlora_target(rows: List[dict], dry: bool) -> str:
    """The QLoRA target on the summary: ours-B fwd+bwd >= 1.5x faster than PEFT (+ bitsandbytes where it imports,
    else the peft-style composition, named), at no more peak memory."""
    b = next((r for r in rows if r["provider"] == "ours-B" and r["mode"] == "fwdbwd"), None)
    if b is None:
        return "target: no ours-B fwd+bwd row (cut or failed)"
    vs = b["vs"] + ("" if b["vs"] == "peft-bnb" else " (no usable bitsandbytes here)")
    peak = b.get("peak_vs_peft")
    text = (f"target ours-B fwd+bwd >= {RATIO_TARGETS[QLORA]:.1f}x faster than {vs} at <= its peak memory: "
            f"{_fmt(b['speedup_vs_peft'], '.2f')}x" + (f", peak {peak:.2f}x" if isinstance(peak, float) else ""))
    if dry:
        return text
    met = b["speedup_vs_peft"] >= RATIO_TARGETS[QLORA] and isinstance(peak, float) and peak <= 1.0
    return text + (" met" if met else " MISSED")


def _case_family_guess(case: str) -> str:
    """The main family of a correctness case (for cases that were cut or raised before recording a check)."""
    for prefix, fam in (("TMA", "GEMM TMA"), ("pointer", "GEMM pointer"), ("odd", "odd shape (M=1, r=7)"),
                        ("split", "split arrangement"), ("persistent", "persistent grid"),
                        ("dropout", "dropout mask (Philox)"), ("r=256", "r=256"), ("beyond", ">2^31 elements"),
                        ("torch.compile", "torch.compile fullgraph"), ("candidate", "autotune candidates"),
                        ("shrink", "shrink"), ("token reductions", "dA/dB reductions"), ("NF4", NF4_FAMILY)):
        if case.startswith(prefix):
            return fam
    return ""


# ==============================================================================================================

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="where logs, CSVs, PNGs and the summary go (created)")
    ap.add_argument("--budget", type=float, default=450.0, help="hard wall-clock budget in seconds (default 450)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter), no build")
    ap.add_argument("--warm-cache", metavar="DIR", default=None,
                    help="use DIR as the Triton cache (TRITON_CACHE_DIR), e.g. one shipped with the command; the "
                         "log says how many compiled kernels were found in it (files before/after, cache hits)")
    ap.add_argument("--workers", type=int, default=0, help="parallel processes of the correct stage "
                                                           "(default: CPU cores - 4, at most 10; 2 in the dry run)")
    ap.add_argument("--no-build", action="store_true", help="do not build the C++/CUDA extension")
    ap.add_argument("--worker", choices=tuple(STAGE_FUNCS), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages are {','.join(STAGES)}")
    args.stages = stages
    if args.budget <= 0:
        ap.error("--budget must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["PYTHONUNBUFFERED"] = "1"
    if args.worker:
        return worker_main(args)
    # Before torch / triton are imported here, and inherited by every child:
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.warm_cache:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.warm_cache)
        os.makedirs(os.environ["TRITON_CACHE_DIR"], exist_ok=True)
    driver = Driver(args)

    def on_term(signum, frame):  # an outer timeout: take the children down with us
        driver.kill_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return driver.run()


if __name__ == "__main__":
    sys.exit(main())
