"""Count what the first training step compiles and times, without a GPU: LLaMA-7B's seven projections (q, k, v, o:
4096→4096; gate, up: 4096→11008; down: 11008→4096), forward and backward, per token count, mode and dropout.

It drives the real op -- ``lora_linear`` forward and ``backward()`` through ``dispatch`` and the launchers, with the
GPU decisions of an sm_90 device (autotuning, TMA, the "auto" arrangement) -- on CPU tensors, with:

* every Triton launch (``JITFunction.run`` of the kernels) replaced by a recorder that computes the compile key Triton
  itself would compute (its own argument binder, for an sm_90 target) and records it instead of running: distinct
  keys are the compiles;
* the autotuner's ``do_bench`` and the arrangement's ``_time_ms`` replaced by counters that call the candidate once
  (so what it would compile is recorded) and return a fixed time (fused and the first pruned tile win);
* the base product of the split arrangement (cuBLAS) replaced by an empty tensor; the SM count by the H100's 132.

So the counts follow the launchers, the pruning and the autotune keys as they are in this checkout.  "warm cache" is
a second process reading ``LORA_KERNELS_TUNING_CACHE`` written by the first (the real ``tuning_cache`` code); compile
counts there assume every key picks the same tile (the fixed times make it so; real choices may differ per key,
adding up to one compile per autotune key).

    python bench/first_call_count.py [--tokens 8192 2048] [--r 16] [--json]

Triton's interpreter must be off (it replaces the kernels): with TRITON_INTERPRET=1 set the script runs itself again
without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET", "0") == "1":
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout works too

import torch  # noqa: E402

from lora_kernels import lora_linear, settings  # noqa: E402
from lora_kernels.ops.lora_linear import arrangement, dispatch, launch, tuning, tuning_cache  # noqa: E402

LLAMA_7B = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
            ("gate", 4096, 11008), ("up", 4096, 11008), ("down", 11008, 4096)]
# Wall-clock models of one first step's extra work (not measured here):
COMPILE_S = (1.0, 2.0)  # one Triton compile of a GEMM variant, cold kernel cache (a warm ~/.triton cache: ~0.05 s)
AUTOTUNE_CONFIG_S = 0.13  # Triton's do_bench per autotune config: 25 ms warm-up + 100 ms of repetitions + estimate
ARRANGEMENT_RUN_S = 0.03  # arrangement._time_ms per candidate: do_bench(warmup=5, rep=20) + estimate
SCENARIOS = {
    "cold": dict(autotune=True, gemm="auto"),
    "warm cache": dict(autotune=True, gemm="auto"),
    "AUTOTUNE=0": dict(autotune=False, gemm="auto"),
    "AUTOTUNE=0 GEMM=fused": dict(autotune=False, gemm="fused"),
}


class Recorder:
    """Records launches as compile keys and counts timing runs, instead of running anything."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", capability, 32))
        self.reset()

    def reset(self):
        self.compiles = set()  # (kernel, Triton's compile key)
        self.launches = 0
        self.configs_timed = 0
        self.arrangement_runs = 0
        self.base_products = 0

    def jit_run(self, kernel):
        from triton import knobs
        from triton.runtime.jit import compute_cache_key, create_function_from_signature

        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)

        def run(*args, grid, warmup, **kwargs):  # what JITFunction.run does up to the compile-cache lookup
            kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound, specialization, options = binder(*args, **kwargs)
            self.compiles.add((kernel.__name__, compute_cache_key({}, specialization, options)))
            if callable(grid):
                grid(bound)
            self.launches += 1

        return run

    def autotune_bench(self, kernel_call, quantiles=None):
        kernel_call()
        self.configs_timed += 1
        return [1.0, 1.0, 1.0]

    def arrangement_time(self, fn):
        fn()
        self.arrangement_runs += 1
        return 1.0 if self.arrangement_runs % 2 else 2.0  # candidates come fused, split: fused wins

    def base_product(self, a2d, base, w_nk, bias):
        self.base_products += 1
        return torch.empty(a2d.shape[0], base.out_features if w_nk else base.in_features, dtype=a2d.dtype)


@contextlib.contextmanager
def recording(rec: Recorder):
    """The launchers as on an sm_90 GPU, launching into ``rec``."""
    from triton.runtime.jit import JITFunction

    from lora_kernels.ops.lora_linear import kernels, nf4_kernels

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, obj.__dict__.get(name, _MISSING) if isinstance(obj, JITFunction)
                      else getattr(obj, name)))
        setattr(obj, name, value)

    jits = {id(v): v for mod in (kernels, nf4_kernels) for v in vars(mod).values() if isinstance(v, JITFunction)}
    if not isinstance(kernels._lora_gemm_kernel, JITFunction):
        raise RuntimeError("first_call_count needs Triton's JIT, not its interpreter: run it without TRITON_INTERPRET")
    try:
        for k in jits.values():
            patch(k, "run", rec.jit_run(k))
        tuned = tuning._lora_gemm_kernel_tuned
        saved.append((tuned, "do_bench", tuned.__dict__.get("do_bench", _MISSING)))
        tuned.__dict__["do_bench"] = rec.autotune_bench
        patch(tuned, "cache", {})
        patch(dispatch, "use_triton", lambda t: True)
        patch(launch, "_times_arrangement", lambda a2d: True)
        patch(launch, "_base_product", rec.base_product)
        patch(launch, "_ensure_tma_allocator", lambda: None)
        patch(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        patch(tuning, "sm_count", lambda device: tuning._OFFLINE_SMS)
        patch(tuning_cache, "device_name", lambda index=None: "sm_90 (offline count)")
        patch(tuning_cache, "capturing", lambda: False)
        patch(arrangement, "_time_ms", rec.arrangement_time)
        patch(arrangement, "_measured", {})
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, value)


_MISSING = object()


def first_step(tokens: int, mode: str, p: float, r: int, shapes, dtype=torch.bfloat16) -> None:
    """Forward and backward of every projection once, as the first step of a fine-tune does."""
    for _, d_in, d_out in shapes:
        x = torch.empty(tokens, d_in, dtype=dtype, requires_grad=True)  # a hidden state: it needs dx
        w = torch.empty(d_out, d_in, dtype=dtype)
        a = torch.empty(r, d_in, dtype=dtype, requires_grad=mode == "AB")
        b = torch.empty(d_out, r, dtype=dtype, requires_grad=True)
        y = lora_linear(x, w, None, a, b, 2.0, p, seed=1)
        y.backward(torch.empty_like(y))


def _fresh_process(rec: Recorder) -> None:
    rec.reset()
    arrangement._measured.clear()
    tuning._lora_gemm_kernel_tuned.cache = {}
    tuning_cache.forget()


def count(tokens, mode: str, p: float, r: int = 16, shapes=LLAMA_7B) -> dict:
    """{scenario: counts} for one configuration; every scenario starts as a fresh process.  ``tokens``: one token
    count, or several met one after the other in the same process (e.g. batches in two token buckets)."""
    steps = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    rec = Recorder()
    out = {}
    with tempfile.TemporaryDirectory() as tmp, recording(rec):
        cache_file = os.path.join(tmp, "tuning.json")
        for name, switches in SCENARIOS.items():
            path = cache_file if name in ("cold", "warm cache") else None
            _fresh_process(rec)
            if name == "warm cache":  # the cold run wrote the file; this is the next process
                assert os.path.exists(cache_file)
            with settings.override(interpret=False, tma=True, tuning_cache=path, **switches):
                for n in steps:
                    first_step(n, mode, p, r, shapes)
            autotune_keys = len(tuning._lora_gemm_kernel_tuned.cache)
            row = dict(compiles=len(rec.compiles), autotune_keys=autotune_keys, configs_timed=rec.configs_timed,
                       arrangement_keys=len(arrangement._measured), arrangement_runs=rec.arrangement_runs,
                       launches_recorded=rec.launches)
            row["first_step_s"] = [round(len(rec.compiles) * c + rec.configs_timed * AUTOTUNE_CONFIG_S
                                         + rec.arrangement_runs * ARRANGEMENT_RUN_S, 1) for c in COMPILE_S]
            row["by_kernel"] = {}
            for kernel, _ in rec.compiles:
                row["by_kernel"][kernel] = row["by_kernel"].get(kernel, 0) + 1
            out[name] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 2048])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["AB", "B"])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--hidden", type=int, default=4096, help="LLaMA's hidden size (7B: 4096)")
    ap.add_argument("--intermediate", type=int, default=11008, help="LLaMA's MLP size (7B: 11008)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    h, i = args.hidden, args.intermediate
    shapes = [("q", h, h), ("k", h, h), ("v", h, h), ("o", h, h), ("gate", h, i), ("up", h, i), ("down", i, h)]
    rows = []
    for tokens in args.tokens:
        for mode in args.modes:
            for p in args.dropout:
                rows.append(dict(tokens=tokens, mode=mode, dropout=p, **count(tokens, mode, p, args.r, shapes)))
    if len(args.tokens) > 1:  # the first mode and dropout again, every token count in one process
        both = "+".join(map(str, args.tokens))
        rows.append(dict(tokens=both, mode=args.modes[0], dropout=args.dropout[0],
                         **count(args.tokens, args.modes[0], args.dropout[0], args.r, shapes)))
    if args.json:
        print(json.dumps(rows, indent=1))
        return rows
    print(f"hidden {h}, intermediate {i}, r = {args.r}, bf16, 7 projections, forward + backward, sm_90 "
          f"(132 SMs); seconds: compiles x {COMPILE_S[0]:g}-{COMPILE_S[1]:g} s + autotune configs x "
          f"{AUTOTUNE_CONFIG_S} s + arrangement runs x {ARRANGEMENT_RUN_S} s\n")
    print("| tokens | mode | p | cold: compiles / autotune keys / configs timed / arrangement keys / runs | s "
          "| warm cache: compiles / timed | s | AUTOTUNE=0: compiles / arrangement runs | s "
          "| AUTOTUNE=0 GEMM=fused: compiles | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        c, w, a, f = (row[k] for k in SCENARIOS)

        def s(x):
            return f"{x['first_step_s'][0]:g}-{x['first_step_s'][1]:g}"

        print(f"| {row['tokens']} | {row['mode']} | {row['dropout']:g} "
              f"| {c['compiles']} / {c['autotune_keys']} / {c['configs_timed']} / {c['arrangement_keys']} / "
              f"{c['arrangement_runs']} | {s(c)} "
              f"| {w['compiles']} / {w['configs_timed'] + w['arrangement_runs']} | {s(w)} "
              f"| {a['compiles']} / {a['arrangement_runs']} | {s(a)} | {f['compiles']} | {s(f)} |")
    print("\ncompiles by kernel (cold):")
    for row in rows:
        print(f"  {row['tokens']} {row['mode']} p={row['dropout']:g}: {row['cold']['by_kernel']}")
    return rows


if __name__ == "__main__":
    main()
