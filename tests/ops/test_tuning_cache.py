"""Tuning choices that outlive a process and agree across ranks (``tuning_cache``): the on-disk cache of arrangement
and autotune choices (round trip without timing, keyed by device and versions, corrupt / foreign files, atomic and
concurrent writes), rank 0 deciding for every rank, and no timing inside a CUDA graph capture."""

import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from lora_kernels import settings
from lora_kernels._backend import HAS_TRITON, _say_once
from lora_kernels.ops.lora_linear import arrangement, tuning_cache
from tests.helpers import REPO_ROOT, make_case, rel_err

KEY = ("fwd", 0, "bfloat16", 8192, 4096, 4096, 16, False, False, True, "ieee", True, "bfloat16", "dense")
KEY2 = ("dgrad", 0, "bfloat16", 8192, 4096, 11008, 16, False, True, True, "ieee", True, "bfloat16", "dense")
CANDIDATES = {"fused": lambda: "fused", "split": lambda: "split"}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Every test starts as a fresh process: nothing measured, no cache file read."""
    monkeypatch.setattr(arrangement, "_measured", {})
    tuning_cache.forget()
    yield
    tuning_cache.forget()


@pytest.fixture
def timer(monkeypatch):
    """arrangement._time_ms replaced: records each call; fused 1.3 ms, split 0.9 ms unless a test changes ``times``."""
    class Timer:
        calls = []
        times = {"fused": 1.3, "split": 0.9}

    Timer.calls = []

    def fake(fn):
        name = fn()
        Timer.calls.append(name)
        return Timer.times[name]

    monkeypatch.setattr(arrangement, "_time_ms", fake)
    return Timer


def _new_process(monkeypatch):
    """What a later process starts with: nothing in memory (the file stays)."""
    monkeypatch.setattr(arrangement, "_measured", {})
    tuning_cache.forget()


def _warnings(caplog, text):
    return [r for r in caplog.records if r.name == "lora_kernels" and text in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------------------------------------------

def test_setting_is_read_once_and_validated(monkeypatch, tmp_path):
    assert settings.from_env({}).tuning_cache is None  # unset: no disk cache
    assert settings.from_env({"LORA_KERNELS_TUNING_CACHE": ""}).tuning_cache is None
    monkeypatch.chdir(tmp_path)
    got = settings.from_env({"LORA_KERNELS_TUNING_CACHE": "sub/tuning.json"}).tuning_cache
    assert got == os.path.join(str(tmp_path), "sub", "tuning.json")  # absolute: a later chdir does not move it
    monkeypatch.setenv("LORA_KERNELS_TUNING_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="LORA_KERNELS_TUNING_CACHE.*directory"):
        settings.reload()
    with pytest.raises(ValueError, match="LORA_KERNELS_TUNING_CACHE"):
        with settings.override(tuning_cache=""):
            pass


# --------------------------------------------------------------------------------------------------------------
# The file: arrangement choices
# --------------------------------------------------------------------------------------------------------------

def test_arrangement_choice_round_trips_without_timing(monkeypatch, tmp_path, timer):
    path = str(tmp_path / "cache" / "tuning.json")  # its directory is created on the first write
    with settings.override(tuning_cache=path):
        assert arrangement.choose(KEY, CANDIDATES) == "split"
        assert timer.calls == ["fused", "split"]
        data = json.load(open(path))
        assert data["format"] == tuning_cache.FORMAT
        (entry,) = data["entries"].values()
        assert entry["kind"] == "arrangement" and entry["value"]["choice"] == "split"
        assert entry["device"] == tuning_cache.device_name(0) and entry["torch"] == torch.__version__
        assert entry["triton"] and entry["code"]
        assert entry["key"] == json.loads(json.dumps(KEY[:1] + KEY[2:]))  # no device index: the name keys it

        _new_process(monkeypatch)
        timer.times = {"fused": 0.1, "split": 5.0}  # would now choose fused, if it timed
        assert arrangement.choose(KEY, CANDIDATES) == "split"
        assert arrangement.choose(KEY, CANDIDATES) == "split"
        assert timer.calls == ["fused", "split"]  # nothing timed in the second process
        report = arrangement.gemm_arrangement_report()[KEY]
        assert report == {"choice": "split", "fused_ms": 1.3, "split_ms": 0.9, "source": "disk cache"}

        assert arrangement.choose(KEY2, CANDIDATES) == "fused"  # a new key is timed and added
        assert len(json.load(open(path))["entries"]) == 2


def test_without_the_setting_nothing_is_written(tmp_path, timer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings.get().tuning_cache is None
    arrangement.choose(KEY, CANDIDATES)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("foreign", ["torch", "triton", "code", "device"])
def test_other_versions_and_devices_are_not_matched(monkeypatch, tmp_path, timer, foreign):
    path = str(tmp_path / "tuning.json")
    with settings.override(tuning_cache=path):
        arrangement.choose(KEY, CANDIDATES)
        _new_process(monkeypatch)
        if foreign == "device":
            monkeypatch.setattr(tuning_cache, "device_name", lambda index=None: "NVIDIA H200")
        else:
            ident = dict(tuning_cache._identity(), **{foreign: "other"})
            monkeypatch.setattr(tuning_cache, "_identity", lambda: ident)
        arrangement.choose(KEY, CANDIDATES)
        assert len(timer.calls) == 4  # timed again
        entries = json.load(open(path))["entries"].values()
        assert len(entries) == 2  # both kept: one file can serve several machines and versions
        assert {e[foreign] for e in entries} >= {"other" if foreign != "device" else "NVIDIA H200"}


def test_corrupt_file_warns_once_and_is_rewritten(tmp_path, timer, caplog):
    path = tmp_path / "tuning.json"
    path.write_text('{"format": 1, "entries": {"abc": ')  # cut short
    with caplog.at_level(logging.WARNING, logger="lora_kernels"), settings.override(tuning_cache=str(path)):
        assert arrangement.choose(KEY, CANDIDATES) == "split"
        assert arrangement.choose(KEY2, CANDIDATES) == "split"
    assert len(timer.calls) == 4
    assert len(_warnings(caplog, "not a valid cache file")) == 1
    assert len(json.load(open(path))["entries"]) == 2  # a valid file again


@pytest.mark.parametrize("content", [b'[1, 2]', b'{"format": 1, "entries": 7}', b'{"entries": {}}', b'\x00\x01',
                                     b'\xff\xfe{"format": 1}', b''])
def test_other_malformed_files_never_crash(tmp_path, timer, content):
    path = tmp_path / "tuning.json"
    path.write_bytes(content)
    with settings.override(tuning_cache=str(path)):
        assert arrangement.choose(KEY, CANDIDATES) == "split"
    assert len(json.load(open(path))["entries"]) == 1


def test_file_of_another_format_version_is_ignored_and_left_alone(tmp_path, timer, caplog):
    path = tmp_path / "tuning.json"
    text = json.dumps({"format": 99, "entries": {"x": {"value": {"choice": "fused"}}}})
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="lora_kernels"), settings.override(tuning_cache=str(path)):
        assert arrangement.choose(KEY, CANDIDATES) == "split"
        assert arrangement.choose(KEY2, CANDIDATES) == "split"
    assert len(_warnings(caplog, "has format 99")) == 1
    assert path.read_text() == text


def test_an_interrupted_write_leaves_the_previous_file(monkeypatch, tmp_path, timer, caplog):
    path = tmp_path / "tuning.json"
    with settings.override(tuning_cache=str(path)):
        arrangement.choose(KEY, CANDIDATES)
        before = path.read_text()

        def dies_half_way(data, f):
            f.write(json.dumps(data)[:20])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(tuning_cache, "_dump", dies_half_way)
        with caplog.at_level(logging.WARNING, logger="lora_kernels"):
            assert arrangement.choose(KEY2, CANDIDATES) == "split"  # the step goes on
    assert path.read_text() == before  # never a partial file
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary file left
    assert len(_warnings(caplog, "cannot write the tuning cache")) == 1


def test_out_of_memory_fallback_is_not_persisted(tmp_path, monkeypatch):
    def oom(fn):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(arrangement, "_time_ms", oom)
    path = tmp_path / "tuning.json"
    with settings.override(tuning_cache=str(path)):
        assert arrangement.choose(KEY, CANDIDATES) == "fused"
    assert not path.exists()


def _writer(path, tag, n, start):
    """One of two processes recording n choices each into the same file at the same time."""
    start.wait(60)
    with settings.override(tuning_cache=path):
        for i in range(n):
            tuning_cache.record("arrangement", (tag, i), {"choice": "fused", "fused_ms": 1.0, "split_ms": 2.0})


def test_concurrent_processes_keep_each_others_entries(tmp_path):
    import multiprocessing

    path = str(tmp_path / "tuning.json")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)  # both write at once
    procs = [ctx.Process(target=_writer, args=(path, tag, 15, start)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = json.load(open(path))["entries"].values()
    assert sorted(tuple(e["key"]) for e in entries) == sorted((t, i) for t in "ab" for i in range(15))


# --------------------------------------------------------------------------------------------------------------
# The file: the autotuner's choices
# --------------------------------------------------------------------------------------------------------------

def _toy_autotuner(blocks=(16, 32, 64)):
    """A real ``triton.autotune`` Autotuner over a kernel stand-in that records its launches instead of running."""
    import triton
    from triton.runtime.autotuner import Autotuner

    def _toy_kernel(x, n, BLOCK):  # what the autotuner wraps: only its name is read
        pass

    class Kernel:
        fn = staticmethod(_toy_kernel)

        def __init__(self):
            self.launches = []

        def run(self, *args, grid=None, warmup=False, **kwargs):
            self.launches.append(kwargs["BLOCK"])

    kernel = Kernel()
    configs = [triton.Config({"BLOCK": b}, num_warps=4 if b < 64 else 8) for b in blocks]
    return Autotuner(kernel, ["x", "n"], configs, ["n"], None, None), kernel


def _bench_counter(autotuner, times):
    """Replace the autotuner's timing (``_bench``): config BLOCK -> times[BLOCK] ms; returns the list of calls."""
    calls = []

    def bench(*args, config, **kwargs):
        calls.append(config.kwargs["BLOCK"])
        return [times[config.kwargs["BLOCK"]]] * 3

    autotuner._bench = bench
    return calls


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_autotuned_config_round_trips_without_timing(tmp_path):
    path = str(tmp_path / "tuning.json")
    x = torch.empty(4)
    with settings.override(tuning_cache=path):
        at, kernel = _toy_autotuner()
        tuning_cache.install(at)
        calls = _bench_counter(at, {16: 3.0, 32: 1.0, 64: 2.0})
        assert tuning_cache.launch_tuned(at, (1,), (x, 64), {})
        assert calls == [16, 32, 64] and kernel.launches == [32]
        (entry,) = json.load(open(path))["entries"].values()
        assert entry["kind"] == "autotune:_toy_kernel" and entry["key"] == [64, "torch.float32"]
        assert entry["value"]["config"]["kwargs"] == {"BLOCK": 32}

        tuning_cache.forget()  # a later process: a fresh autotuner, the same file
        at, kernel = _toy_autotuner()
        calls = _bench_counter(at, {16: 0.1, 32: 9.0, 64: 9.0})
        assert tuning_cache.launch_tuned(at, (1,), (x, 64), {})
        assert tuning_cache.launch_tuned(at, (1,), (x, 64), {})
        assert calls == [] and kernel.launches == [32, 32]
        assert tuning_cache.launch_tuned(at, (1,), (x, 128), {})  # another key: timed
        assert calls == [16, 32, 64] and kernel.launches[-1] == 16

        tuning_cache.forget()  # candidates changed since: the stored config is not one of them, so it times
        at, kernel = _toy_autotuner(blocks=(16, 64, 128))
        calls = _bench_counter(at, {16: 2.0, 64: 1.0, 128: 3.0})
        assert tuning_cache.launch_tuned(at, (1,), (x, 64), {})
        assert calls == [16, 64, 128] and kernel.launches == [64]


# --------------------------------------------------------------------------------------------------------------
# Ranks: rank 0 decides, every rank runs its choice
# --------------------------------------------------------------------------------------------------------------

def _dist_worker(rank, world, init_file, out_dir, cache_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        timed = []
        prefers = {0: {"fused": 2.0, "split": 1.0}, 1: {"fused": 1.0, "split": 2.0}}[rank]
        arrangement._time_ms = lambda fn: timed.append(fn()) or prefers[timed[-1]]
        out = {"rank": rank}
        with settings.override(tuning_cache=cache_path):
            out["choice"] = arrangement.choose(KEY, CANDIDATES)
            out["source"] = arrangement.gemm_arrangement_report()[KEY].get("source")
            out["timed"] = list(timed)
            at, kernel = _toy_autotuner()
            calls = _bench_counter(at, {0: {16: 3.0, 32: 1.0, 64: 2.0}, 1: {16: 1.0, 32: 3.0, 64: 2.0}}[rank])
            tuning_cache.launch_tuned(at, (1,), (torch.empty(4), 64), {})
            out["benched"], out["launched"] = list(calls), list(kernel.launches)
            # A key only rank 1 meets (its token bucket differs): it waits SHARED_WAIT_S, then decides for itself,
            # and from then on decides every key itself without waiting.
            tuning_cache.SHARED_WAIT_S = 1.0
            if rank == 1:
                start = time.time()
                out["alone"] = arrangement.choose(KEY[:3] + (4096,) + KEY[4:], CANDIDATES)
                out["waited_s"] = time.time() - start
                start = time.time()
                out["after"] = arrangement.choose(KEY2, CANDIDATES)
                out["after_waited_s"] = time.time() - start
            out["timed_all"] = list(timed)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(out, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_rank0_decides_and_every_rank_runs_its_choice():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "tuning.json")
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), tmp, cache), nprocs=2, join=True)
        r0, r1 = (json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(2))
        entries = list(json.load(open(cache))["entries"].values())
    assert r0["choice"] == r1["choice"] == "split"  # rank 0's (rank 1 alone would have chosen fused)
    assert r0["timed"] == ["fused", "split"] and r1["timed"] == []  # rank 1 never timed
    assert r0["source"] is None and r1["source"] == "rank 0"
    assert r0["benched"] == [16, 32, 64] and r1["benched"] == []
    assert r0["launched"] == r1["launched"] == [32]  # rank 0's tile on both
    assert r1["alone"] == "fused" and r1["waited_s"] >= 0.9  # nobody published it: waited, then timed itself
    assert r1["after"] == "fused" and r1["after_waited_s"] < 0.9  # no more waiting
    assert r1["timed_all"] == ["fused", "split"] * 2
    assert sorted(e["kind"] for e in entries) == ["arrangement", "autotune:_toy_kernel"]  # only rank 0 writes


# --------------------------------------------------------------------------------------------------------------
# CUDA graph capture: nothing timed, the pinned tile for keys not tuned yet
# --------------------------------------------------------------------------------------------------------------

class _PinnedSpy:
    """Stands for launch._lora_gemm_kernel (the pinned launch): records the meta-parameters, optionally runs it."""

    def __init__(self, real=None):
        self.real, self.metas = real, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.metas.append({k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT")})
            if self.real is not None:
                self.real[grid](*args, **kwargs)
        return launch


def _capture(monkeypatch, on=True):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_capture_takes_the_pinned_tile_and_says_so_once(monkeypatch, caplog):
    """While capturing, a key not tuned yet launches the pinned tile (no timing: do_bench would synchronise); a key
    tuned before the capture keeps its tuned tile; the log says it once."""
    from lora_kernels.ops.lora_linear import launch, tuning

    at = tuning._lora_gemm_kernel_tuned
    monkeypatch.setattr(at, "cache", {})
    monkeypatch.setattr(launch, "autotune_enabled", lambda: True)
    tuned_runs = []

    class TunedFn:  # the autotuner's kernel, recording instead of running
        fn = at.fn

        def run(self, *args, grid=None, warmup=False, **kwargs):
            tuned_runs.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))

    monkeypatch.setattr(at, "fn", TunedFn())
    benched = []
    monkeypatch.setattr(at, "_bench", lambda *a, config, **k: benched.append(config) or
                        [float(config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])] * 3)
    pinned = _PinnedSpy()
    monkeypatch.setattr(launch, "_lora_gemm_kernel", pinned)
    _say_once.cache_clear()

    x, w, _, a, b = make_case(128, 48, 128, 4, torch.float32)  # fp32: no TMA, nothing asks the device
    t = torch.randn(128, 4)

    def gemm(rows=128):
        c = torch.empty(rows, 128)
        launch._gemm_launch(x.detach()[:rows], w, True, None, t[:rows], b.detach().t(), c, 0, 0.0, False, False)

    with caplog.at_level(logging.WARNING, logger="lora_kernels"):
        _capture(monkeypatch)
        gemm()
        gemm()
        assert benched == [] and tuned_runs == []
        assert pinned.metas == [{k: v for k, v in tuning.pinned_gemm_meta(torch.float32, False).items()
                                 if k in pinned.metas[0]}] * 2
        _capture(monkeypatch, False)
        gemm()  # eager: tuned (the smallest of the pruned tiles "wins")
        swept = len(benched)
        best = min(benched, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        tile = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"])
        assert swept >= 1 and tuned_runs == [tile]
        _capture(monkeypatch)
        gemm()  # tuned before the capture: the tuned tile, no timing
        assert len(benched) == swept and tuned_runs == [tile] * 2 and len(pinned.metas) == 2
        gemm(rows=16)  # another token bucket, not tuned yet: pinned again
        assert len(benched) == swept and len(pinned.metas) == 3
        assert arrangement.choose(KEY, CANDIDATES) == "fused"  # arrangement: not timed either (no _time_ms call)
    assert len(_warnings(caplog, "CUDA graph capture")) == 1


def test_capture_arrangement_is_fused_and_not_remembered(monkeypatch, timer):
    _capture(monkeypatch)
    assert arrangement.choose(KEY, CANDIDATES) == "fused" and timer.calls == []
    _capture(monkeypatch, False)
    assert arrangement.choose(KEY, CANDIDATES) == "split" and timer.calls == ["fused", "split"]


def test_capture_runs_the_pinned_kernel_correctly(kernels, monkeypatch):
    """Under the interpreter: the fallback launch computes the same product as the reference."""
    from lora_kernels import lora_linear, lora_linear_ref
    from lora_kernels.ops.lora_linear import launch, tuning

    monkeypatch.setattr(tuning._lora_gemm_kernel_tuned, "cache", {})
    monkeypatch.setattr(launch, "autotune_enabled", lambda: True)
    monkeypatch.setattr(tuning._lora_gemm_kernel_tuned, "_bench", lambda *a, **k: pytest.fail("timed in capture"))
    spy = _PinnedSpy(real=launch._lora_gemm_kernel)
    monkeypatch.setattr(launch, "_lora_gemm_kernel", spy)
    _capture(monkeypatch)
    x, w, bias, a, b = make_case(37, 48, 40, 4, torch.float32)
    with torch.no_grad():
        y = lora_linear(x, w, bias, a, b, 0.5)
        ref = lora_linear_ref(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5)
    assert len(spy.metas) == 1
    assert rel_err(y, ref) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# The count of the first step (bench/first_call_count.py)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_first_call_count_runs_and_the_cache_removes_all_timing():
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "first_call_count.py"), "--tokens", "512",
                          "--hidden", "256", "--intermediate", "512", "--modes", "AB", "--dropout", "0.1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout)
    cold, warm = row["cold"], row["warm cache"]
    assert cold["configs_timed"] > cold["autotune_keys"] == 6 and cold["arrangement_runs"] == 12
    assert warm["configs_timed"] == warm["arrangement_runs"] == 0 and 0 < warm["compiles"] < cold["compiles"]
    off = row["AUTOTUNE=0 GEMM=fused"]
    assert off["configs_timed"] == off["arrangement_runs"] == 0
    assert row["AUTOTUNE=0"]["configs_timed"] == 0 and row["AUTOTUNE=0"]["arrangement_runs"] == 12
