"""GEMM arrangement: "fused" (our kernel does the base GEMM and the LoRA term) or "split" (cuBLAS -- or the base
weight's own product -- does the base GEMM, our kernel adds the LoRA term in place), measured per shape bucket.

The setting is ``settings.get().gemm`` (``LORA_KERNELS_GEMM``; ``gemm_arrangement`` overrides it in a block).
"auto" times both candidates once per key with ``do_bench`` medians, as Triton's autotuner does, and keeps the
faster; ``gemm_arrangement_report()`` returns what it measured.  A choice made by another process
(``LORA_KERNELS_TUNING_CACHE``) or by rank 0 of a process group is taken instead of timing (``tuning_cache``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch

from lora_kernels import settings
from lora_kernels.ops.lora_linear import tuning_cache
from lora_kernels.settings import ARRANGEMENTS

_measured: Dict[tuple, dict] = {}


@contextlib.contextmanager
def gemm_arrangement(name: str):
    """Force the GEMM arrangement inside a ``with`` block: "fused", "split" or "auto" (the default: measured once
    per shape bucket on CUDA, fused elsewhere).  The environment variable LORA_KERNELS_GEMM sets the same thing
    process-wide.

    The override is process-wide (not per thread) and is read when each GEMM launches: wrap the backward pass too
    (``loss.backward()`` inside the block) to force it there.  Under ``torch.compile`` set the environment variable
    instead.  The two arrangements round differently (split rounds the base product to the output dtype before
    adding the LoRA term), so for bit-reproducible runs across processes pin one of them."""
    if name not in ARRANGEMENTS + ("auto",):
        raise ValueError(f"gemm_arrangement name must be 'auto', 'fused' or 'split', got {name!r}")
    with settings.override(gemm=name):
        yield


def gemm_arrangement_report() -> Dict[tuple, dict]:
    """What "auto" measured: {(pass, device, dtype, M bucket, N, K, r, bias, dropout, tma, input precision,
    autotune, LoRA operand dtype): {"choice", "fused_ms", "split_ms"}} for every GEMM shape met so far in this
    process (the LoRA dtype is float32 for fp32 adapters on a 16-bit base, else the dtype's).  A choice taken from
    the tuning cache file or from rank 0 adds "source": "disk cache" or "rank 0" (with the times its decider
    measured, where known)."""
    return {k: dict(v) for k, v in _measured.items()}


def _time_ms(fn) -> float:
    import triton.testing

    # do_bench runs fn once before its estimate, so compilation and autotuning stay outside the measurement.
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def choose(key: tuple, candidates: Dict[str, Callable[[], object]]) -> str:
    """The faster arrangement for ``key``, timed once per process (do_bench medians, as the autotuner does) -- or
    decided once for good: by rank 0 of a process group, or by an earlier process (``tuning_cache``).  ``key[1]``
    is the CUDA device index; the shared key leaves it out (the device's name keys the file instead)."""
    hit = _measured.get(key)
    if hit is not None:
        return hit["choice"]
    device, shape = key[1], key[:1] + key[2:]
    capture = tuning_cache.capturing()
    shared = tuning_cache.lookup("arrangement", shape, device, wait=not capture)
    if shared is not None and shared[0].get("choice") in ARRANGEMENTS:
        value, source = shared
        _measured[key] = dict(value, source=source)
        return value["choice"]
    if capture:
        tuning_cache.note_capture()  # no timing inside a CUDA graph capture; not cached: a later eager call measures
        return "fused"
    try:
        times = {name: _time_ms(fn) for name, fn in candidates.items()}
    except torch.cuda.OutOfMemoryError:
        # Timing needs extra outputs and do_bench's 256 MB L2-flush buffer; a run near full memory must not fail
        # for that: keep the fused arrangement for this key (no extra memory) and record why.  Other ranks follow
        # rank 0; the file does not keep it (it depends on the moment).
        torch.cuda.empty_cache()
        _measured[key] = dict(choice="fused", fused_ms=float("nan"), split_ms=float("nan"), note="out of memory")
        tuning_cache.record("arrangement", shape, _measured[key], device, persist=False)
        return "fused"
    choice = min(times, key=times.get)
    _measured[key] = dict(choice=choice, **{f"{name}_ms": ms for name, ms in times.items()})
    tuning_cache.record("arrangement", shape, _measured[key], device)
    return choice
