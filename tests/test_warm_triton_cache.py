"""bench/warm_triton_cache.py: the sm_90 Triton cache built without a GPU for gpu_check's launches.

What can be checked here, with no GPU: (1) the recording covers every correctness case of gpu_check but the two it
documents as not recorded, and every kernel family, so the builder cannot silently drift from the check it serves;
(2) what it compiles is found again by Triton's own ``JITFunction.run`` (warm-up launches through a stand-in sm_90
driver), i.e. the kernel side of the cache key is what the GPU's JIT computes; (3) the fingerprint comparison that
gpu_check prints before its first stage (the machine side of the key) says match or differs, and why.
Both builder runs need Triton's compiled JIT: subprocesses with TRITON_INTERPRET unset.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import load_repo_module, repo_path

pytest.importorskip("triton")

SCRIPT = repo_path("bench", "warm_triton_cache.py")
KERNELS = {"_lora_shrink_kernel", "_lora_gemm_kernel", "_lora_wgrad_kernel", "_dropout_mask_kernel",
           "_lora_nf4_gemm_kernel", "_nf4_dequant_kernel"}


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}


def test_records_every_case_then_the_jit_finds_what_it_compiled(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, SCRIPT, str(cache), "--limit", "3", "--jobs", "1"], env=_env(),
                          cwd=repo_path(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = json.loads((cache / "manifest.json").read_text())

    gc = load_repo_module("bench", "gpu_check.py")
    wc = load_repo_module("bench", "warm_triton_cache.py")
    every = [name for name, _ in gc.correct_cases(False)]
    assert sorted(m["cases"]) == sorted(n for n in every if n not in wc.NOT_RECORDED)
    assert "beyond int32" in m["cases"] and wc.NOT_RECORDED == ("torch.compile",)
    assert set(wc.NOT_RECORDED) <= set(every), "a case named as not recorded no longer exists"
    assert set(m["by_kernel"]) == KERNELS, m["by_kernel"]
    # The autotuner's candidates at the ratios shapes are recorded too (more GEMM launches than one per form).
    assert m["by_kernel"]["_lora_gemm_kernel"] > len(gc._candidates()), m["by_kernel"]
    assert m["ratio_calls"] == len(wc.ratio_launches()) and m["distinct"] > 100

    assert not m["errors"]
    assert m["compiled"] + m["already"] == 3 and m["compiled"] >= 1
    assert m["verify"]["hits"] == 3 and m["verify"]["misses"] == 0, m["verify"]
    assert len(list(cache.rglob("*.cubin"))) == m["compiled"]
    assert not list(cache.rglob("*.ptx")), "binaries only: the GPU reads the cubin and its metadata"
    fp = m["fingerprint"]
    assert fp["triton"] and len(fp["triton_key"]) == 16 and "release" in fp["ptxas"]


def test_standin_rows_bind_like_the_real_count():
    """The >2^31-element case is recorded at fewer rows: the JIT must specialise that count as the real one."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl

    wc = load_repo_module("bench", "warm_triton_cache.py")
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for n in (1, 17, 4096, 2**31 // 2048 + 1000, 2**20 + 1, 2**20 + 16, 2**30 + 3):
        small = wc.standin_rows(n)
        assert small < 2**15 or small == n
        assert native_specialize_impl(backend, small, False, True, True) == \
            native_specialize_impl(backend, n, False, True, True), n


def test_fingerprint_comparison_names_what_differs():
    wc = load_repo_module("bench", "warm_triton_cache.py")
    here = wc.fingerprint(90)
    ok, line = wc.compare_fingerprints(dict(here), here)
    assert ok and "matches" in line
    ok, line = wc.compare_fingerprints(dict(here, python="3.10"), here)
    assert ok, "Python's version alone does not enter the key (libtriton's hash does)"
    ok, line = wc.compare_fingerprints(dict(here, triton_key="0" * 16), here)
    assert not ok and "triton_key" in line and "differs" in line
    ok, line = wc.compare_fingerprints({}, here)
    assert not ok and "backend" in line


def test_gpu_check_reports_the_manifest_fingerprint(tmp_path):
    wc = load_repo_module("bench", "warm_triton_cache.py")
    for name, fp, want in (("same", wc.fingerprint(90), "fingerprint matches"),
                           ("other", dict(wc.fingerprint(90), triton_key="f" * 16), "fingerprint differs")):
        cache = tmp_path / name
        cache.mkdir()
        (cache / "manifest.json").write_text(json.dumps(dict(fingerprint=fp, commit="abc1234", date="d",
                                                             capability=90, compiled=5, already=1)))
        out = tmp_path / f"out_{name}"
        env = dict(_env(), TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run([sys.executable, repo_path("bench", "gpu_check.py"), str(out), "--dry-run",
                               "--stages", "env", "--warm-cache", str(cache)], env=env, cwd=repo_path(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        log = (out / "gpu_check.log").read_text()
        assert "warm cache built by bench/warm_triton_cache.py at abc1234 d (6 kernels for sm_90)" in log
        assert want in log, log[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["cache"]["fingerprint_match"] is (name == "same")
