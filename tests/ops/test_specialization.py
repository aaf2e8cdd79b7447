"""What the GPU will compile: Triton's JIT specialises integer arguments at run time (1 becomes a constant, a multiple
of 16 is marked divisible, < 2³¹ is i32 and i64 above), so the code it runs depends on the values it is called with.

* The dropout seed, the threshold ⌊p·2³²⌋ and the GEMM's ``M_BUCKET`` (an autotune key only) must not pick a compiled
  kernel: one kernel per launch form for any seed, threshold and bucket, seed typed i64 and threshold u32 (else about
  one seed in 16 recompiles every kernel, and small seeds get an i32 signature).  Checked with the binder the JIT
  builds, for an sm_90 target, on every kernel that takes them, and through the autotuner.
* The offline compile report (``bench/sm90_compile_report.py``) must compile what the launchers launch: the
  arguments the real launchers pass (recorded at the report's shapes, every dtype, adapter dtype, precision, TMA
  setting, arrangement and dropout setting) bind to the same specialisation as the report's variant of that launch,
  and every variant of the report is such a launch.

Both need Triton's JIT (the suite runs under the interpreter): they run in a subprocess with TRITON_INTERPRET unset.
No GPU: nothing is compiled or launched.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lora_kernels._backend import HAS_TRITON
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def _run(script: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_SEEDS = """
import json, random
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import create_function_from_signature

from lora_kernels.ops.lora_linear import kernels, nf4_kernels, tuning

backend = triton.compiler.make_backend(GPUTarget("cuda", 90, 32))
rng = random.Random(0)
SEEDS = [0, 1, 16, 2**31 - 1, 2**31 + 5, 2**32, 2**62 - 1] + [rng.randrange(2**62) for _ in range(20)]
THRESHOLDS = [0, int(0.1 * 2**16), 2**15, 2**16 - 1]  # ⌊p·2¹⁶⌋
BUCKETS = [0, 1, 2, 16, 17, 256]
bf16 = lambda: torch.empty(64, dtype=torch.bfloat16)
f32 = lambda: torch.empty(64, dtype=torch.float32)
u8 = lambda: torch.empty(64, dtype=torch.uint8)
# Each kernel with representative arguments (a LLaMA-7B launch), seed and threshold left out, and its flags.
CASES = {
    "_dropout_mask_kernel": (kernels._dropout_mask_kernel, [u8(), 8192, 4096, 4096, 1], {},
                             dict(BLOCK_M=32, BLOCK_K=32)),
    "_lora_shrink_kernel": (kernels._lora_shrink_kernel, [bf16(), bf16(), bf16(), 8192, 4096, 16, 4096, 1, 4096, 1,
                                                          16, 1], {"out_scale": 2.2},
                            dict(HAS_DROPOUT=True, UPCAST=False, INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_K=64,
                                 BLOCK_R=16, num_warps=4, num_stages=3)),
    "_lora_gemm_kernel": (kernels._lora_gemm_kernel, [bf16() for _ in range(6)] + [8192, 4096, 4096, 16, 4096, 1,
                                                                                 4096, 1, 16, 1, 4096, 1, 4096, 1],
                          {}, dict(HAS_BIAS=False, HAS_LORA=True, EPI_DROPOUT=True, BASE_IN_C=False, UPCAST=False,
                                   INPUT_PRECISION="ieee", LORA_UPCAST=False, LORA_PRECISION="ieee", USE_TMA=True,
                                   W_NK=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16, GROUP_M=8,
                                   PERSISTENT=False, num_warps=8, num_stages=3)),
    "_lora_wgrad_kernel": (kernels._lora_wgrad_kernel, [bf16(), bf16(), f32(), 8192, 4096, 16, 960, 4096, 1, 16, 1,
                                                        65536, 16, 1], {},
                           dict(HAS_DROPOUT=True, UPCAST=False, INPUT_PRECISION="ieee", BLOCK_P=64, BLOCK_Q=16,
                                BLOCK_M=64, num_warps=4, num_stages=3)),
    "_lora_nf4_gemm_kernel": (nf4_kernels._lora_nf4_gemm_kernel, [bf16(), u8(), f32(), f32(), bf16(), bf16(), bf16(),
                                                                  bf16(), 8192, 4096, 4096, 16, 6, 4096, 1, 4096, 1,
                                                                  16, 1, 4096, 1, 4096, 1], {},
                              dict(HAS_BIAS=False, HAS_LORA=True, EPI_DROPOUT=True, UPCAST=False,
                                   INPUT_PRECISION="ieee", LORA_UPCAST=False, LORA_PRECISION="ieee", ROUND_BF16=True,
                                   BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, BLOCK_R=16, GROUP_M=8, num_warps=8,
                                   num_stages=3)),
}
out = {}
for name, (kernel, args, extra, flags) in CASES.items():
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    names = kernel.arg_names
    keys, types = set(), {}
    buckets = BUCKETS if "M_BUCKET" in names else [None]
    for seed in SEEDS:
        for threshold in THRESHOLDS:
            for bucket in buckets:
                call = dict(extra, seed=seed, threshold=threshold)
                if bucket is not None:
                    call["M_BUCKET"] = bucket
                pos = list(args)
                for k in names[len(args):]:  # the rest positionally, in signature order, as the launchers pass them
                    if k in call:
                        pos.append(call.pop(k))
                _, spec, _ = bind(*pos, **flags)
                keys.add(str(spec))
                for k in ("seed", "threshold", "M_BUCKET"):
                    if k in names:
                        types.setdefault(k, set()).add(str(spec[names.index(k)]))
    out[name] = dict(keys=len(keys), types={k: sorted(v) for k, v in types.items()})

# Through the autotuner: it calls the same JITFunction's run, so the same binder; bench replaced (no GPU), each
# candidate recorded, for several seeds and buckets.
tuned = tuning._lora_gemm_kernel_tuned
assert tuned.fn is kernels._lora_gemm_kernel
bind = create_function_from_signature(tuned.fn.signature, tuned.fn.params, backend)
seen = {}
def record(*args, grid, warmup, **kwargs):
    _, spec, _ = bind(*args, **kwargs)
    cfg = tuple(sorted((k, v) for k, v in kwargs.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PERSISTENT",
                                                                   "num_warps", "num_stages")))
    seen.setdefault(cfg, set()).add(str(spec))
kernels._lora_gemm_kernel.run = record
tuned._bench = lambda *args, config, **kw: (record(*args, **kw, **config.all_kwargs()), [1.0, 1.0, 1.0])[1]
kernel, args, _, flags = CASES["_lora_gemm_kernel"]
flags = {k: v for k, v in flags.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT",
                                                      "num_warps", "num_stages")}
for seed in SEEDS[:8]:
    for bucket in (1, 16, 256):
        tuned.run(*args, seed, int(0.1 * 2**16), bucket, grid=lambda meta: (1,), warmup=False, **flags)
out["autotuned"] = dict(configs=len(seen), keys=max(len(v) for v in seen.values()))
print(json.dumps(out))
"""


def test_seed_threshold_and_bucket_never_pick_a_kernel():
    res = _run(_SEEDS)
    for name in ("_dropout_mask_kernel", "_lora_shrink_kernel", "_lora_gemm_kernel", "_lora_wgrad_kernel",
                 "_lora_nf4_gemm_kernel"):
        r = res[name]
        assert r["keys"] == 1, f"{name}: {r['keys']} compiled kernels across seeds / thresholds / buckets"
        assert r["types"]["seed"] == ["('i64', None)"], (name, r["types"])
        assert r["types"]["threshold"] == ["('u32', None)"], (name, r["types"])
    assert res["_lora_gemm_kernel"]["types"]["M_BUCKET"] == ["('i32', None)"]
    assert res["autotuned"]["configs"] > 1 and res["autotuned"]["keys"] == 1, res["autotuned"]


_DRIFT = """
import json, importlib.util, itertools, os
import torch, triton
from lora_kernels import settings
from lora_kernels.ops.lora_linear import kernels, launch, nf4_kernels, nf4_launch, tuning
from lora_kernels.ops.lora_linear.base_weight import DenseWeight
from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight
from lora_kernels.quant.nf4 import NF4Tensor

spec = importlib.util.spec_from_file_location("sm90_compile_report", os.path.join("bench", "sm90_compile_report.py"))
aot = importlib.util.module_from_spec(spec)
sys.modules["sm90_compile_report"] = aot
spec.loader.exec_module(aot)

# An sm_90 device's decisions on CPU tensors; nothing runs.
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
tuning.sm_count = lambda device: tuning._OFFLINE_SMS
launch._base_product = lambda a2d, base, w_nk, bias: torch.empty(
    (a2d.shape[0], base.out_features if w_nk else base.in_features), dtype=a2d.dtype)
KERNELS = [kernels._lora_shrink_kernel, kernels._lora_gemm_kernel, kernels._lora_wgrad_kernel,
           nf4_kernels._lora_nf4_gemm_kernel, nf4_kernels._nf4_dequant_kernel]
records = {}
tag = site = None
def recorder(kernel):
    def run(*args, grid, warmup, **kwargs):
        # Tensors by what the binder reads (dtype, 16-byte alignment): identical launches bound once.
        sig = tuple((str(a.dtype), a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args)
        records.setdefault((tag, site, kernel, sig, tuple(sorted(kwargs.items()))), (args, kwargs))
    return run
for k in KERNELS:
    k.run = recorder(k)

def key(shape_tag, call_site, kernel, args, kwargs):
    sp = aot.specialization(kernel, args, kwargs)
    ptrs = tuple(t for t, _ in sp[:len(args)] if t.startswith("*"))
    flags = tuple(sorted((k, v) for k, v in kwargs.items() if k not in aot.TILE_KEYS))
    return (call_site, kernel.fn.__name__, shape_tag, ptrs, flags), str(sp[:len(args)])

def variant_site(form):  # the launcher call a report variant stands for
    if form.startswith("shrink"):
        return "shrink gB" if form.startswith("shrink gB") else "shrink x"
    if form.startswith("wgrad"):
        return "grad_A" if "dAT" in form else "grad_B"
    if "dequant" in form:
        return "dequantize"
    return "gemm fwd" if "fwd" in form else "gemm dgrad"

def tiles(kernel, kwargs):
    backend, _ = aot.binder(kernel)
    opts = backend.parse_options(aot.run_kwargs(kernel, kwargs))
    return (tuple(sorted((k, v) for k, v in kwargs.items() if k in aot.TILE_KEYS and not k.startswith("num_"))),
            opts.num_warps, opts.num_stages)

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEEDS = (7, 2**61 + 3)
for shape in aot.SHAPES:
    r = shape.r
    for (m, k_in, n_out), (x_dt, a_dt), tf32 in itertools.product(
            shape.sizes, [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32")],
            (False, True)):
        xd, ad = DT[x_dt], DT[a_dt]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, g = torch.empty(m, k_in, dtype=xd), torch.empty(m, n_out, dtype=xd)
        W, bias = torch.empty(n_out, k_in, dtype=xd), torch.empty(n_out, dtype=xd)
        A, B = torch.empty(r, k_in, dtype=ad), torch.empty(n_out, r, dtype=ad)
        q = NF4Tensor(torch.empty((n_out * k_in + 1) // 2, dtype=torch.uint8),
                      torch.empty(-(-n_out * k_in // 64), dtype=torch.float32), (n_out, k_in), xd)
        tag = shape.tag
        for seed, p, tma, arr in itertools.product(SEEDS, (0.0, 0.1), (True, False), ("fused", "split")):
            with settings.override(autotune=False, tma=tma, gemm=arr, interpret=False):
                site = "shrink x"
                t = launch.shrink(x, A, seed, p, 2.0 / (1.0 - p))
                site = "shrink gB"
                gb = launch.shrink(g, B.t(), 0, 0.0, 2.0 / (1.0 - p))
                for base in (DenseWeight(W), NF4Weight(q)):
                    site = "gemm fwd"
                    launch.gemm(x, base, True, bias, t, B.t(), seed, 0.0, False)
                    site = "gemm dgrad"
                    launch.gemm(g, base, False, None, gb, A, seed, p, True)
                site = "grad_A"
                launch.grad_A(x, gb, seed, p, ad)
                site = "grad_B"
                launch.grad_B(g, t, ad)
                if a_dt == x_dt and seed == SEEDS[0]:
                    site = "dequantize"
                    nf4_launch.dequantize(q, xd)
torch.backends.cuda.matmul.allow_tf32 = False

launches = {}
for (shape_tag, call_site, kernel, _, _), (args, kwargs) in records.items():
    k, sp = key(shape_tag, call_site, kernel, args, kwargs)
    e = launches.setdefault(k, dict(specs=set(), tiles=set()))
    e["specs"].add(sp)
    e["tiles"].add(tiles(kernel, kwargs))

variants = aot.checked_variants() + [v for _, vs in aot.report_sections() for v in vs]
out = dict(records=len(records), keys=len(launches), variants=len(variants), unmatched=[], split=[], differ=[],
           tiles=[])
for k, e in launches.items():
    if len(e["specs"]) > 1:
        out["split"].append(f"{k}: {sorted(e['specs'])}")
for v in variants:
    k, sp = key(v.shape.tag, variant_site(v.form), v.kernel, v.args, v.kwargs())
    e = launches.get(k)
    if e is None:
        out["unmatched"].append(f"{v.name} ({v.dtype})")
        continue
    if sp not in e["specs"]:
        out["differ"].append(f"{v.name} ({v.dtype}): report {sp}, launchers {sorted(e['specs'])}")
    if not v.tuned and tiles(v.kernel, v.kwargs()) not in e["tiles"]:
        out["tiles"].append(f"{v.name} ({v.dtype}): report {tiles(v.kernel, v.kwargs())}, launchers {e['tiles']}")
print(json.dumps(out))
"""


def test_compile_report_binds_what_the_launchers_pass():
    res = _run(_DRIFT)
    assert res["records"] > 1000 and res["variants"] > 200, res
    assert not res["split"], "one launch form, several specialisations:\n" + "\n".join(res["split"][:10])
    assert not res["unmatched"], "report variants no launcher makes:\n" + "\n".join(res["unmatched"][:20])
    assert not res["differ"], "report and launchers bind differently:\n" + "\n".join(res["differ"][:10])
    assert not res["tiles"], "report and launchers use different tiles:\n" + "\n".join(res["tiles"][:10])
