"""Run-time switches, read from the environment once at import into one immutable ``Settings`` object.

| variable                 | field       | values                          | effect                                          |
|--------------------------|-------------|---------------------------------|-------------------------------------------------|
| ``LORA_KERNELS_GEMM``    | ``gemm``    | ``auto`` (default), ``fused``, ``split`` | GEMM arrangement (ops/lora_linear/arrangement.py) |
| ``LORA_KERNELS_AUTOTUNE``| ``autotune``| ``1`` (default), ``0``          | ``0`` pins one GEMM tile per dtype              |
| ``LORA_KERNELS_TMA``     | ``tma``     | ``1`` (default), ``0``          | ``0`` forces pointer loads in the GEMM          |
| ``LORA_KERNELS_SMALL_SVD``| ``small_svd``| ``auto`` (default), ``jacobi``, ``torch`` | the k×k solver inside rsvd          |
| ``LORA_KERNELS_TUNING_CACHE``| ``tuning_cache``| file path; unset (default) | tuning choices kept on disk (tuning_cache.py) |
| ``TRITON_INTERPRET``     | ``interpret``| ``0`` (default), ``1``         | Triton's CPU interpreter (Triton itself reads it at import) |

``get()`` returns the object in force.  ``override(**fields)`` changes it inside a ``with`` block, process-wide (not
per thread: autograd runs a CUDA backward on its own worker thread, which must see the same setting as the forward).
``reload()`` re-reads the environment (tests that set a variable call it).  Nothing here reads the environment on a
hot path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Iterator, Mapping, Optional

ARRANGEMENTS = ("fused", "split")
_CHOICES = {"gemm": ("auto",) + ARRANGEMENTS, "small_svd": ("auto", "jacobi", "torch")}
_ENV = {"gemm": "LORA_KERNELS_GEMM", "autotune": "LORA_KERNELS_AUTOTUNE", "tma": "LORA_KERNELS_TMA",
        "small_svd": "LORA_KERNELS_SMALL_SVD", "tuning_cache": "LORA_KERNELS_TUNING_CACHE",
        "interpret": "TRITON_INTERPRET"}


@dataclasses.dataclass(frozen=True)
class Settings:
    gemm: str = "auto"
    autotune: bool = True
    tma: bool = True
    small_svd: str = "auto"
    tuning_cache: Optional[str] = None  # an absolute file path, or None: no disk cache
    interpret: bool = False

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_ENV[name]} (setting {name!r}) must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("autotune", "tma", "interpret"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"setting {name!r} must be a bool, got {getattr(self, name)!r}")
        path = self.tuning_cache
        if path is not None and (not isinstance(path, str) or not path or os.path.isdir(path)):
            raise ValueError(f"{_ENV['tuning_cache']} (setting 'tuning_cache') must be a file path (or unset), "
                             f"got {path!r}" + (": that is a directory" if isinstance(path, str) and path else ""))


def from_env(env: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings from environment variables (``os.environ`` by default); an invalid value raises naming it."""
    env = os.environ if env is None else env
    flag = {"autotune": ("1", "0"), "tma": ("1", "0"), "interpret": ("1", "0")}
    values = {}
    for name, var in _ENV.items():
        raw = env.get(var)
        if raw is None:
            continue
        if name in flag:
            if name == "interpret":  # Triton treats anything but "1" as off; so do we
                values[name] = raw == "1"
                continue
            if raw not in flag[name]:
                raise ValueError(f"{var} must be '1' or '0', got {raw!r}")
            values[name] = raw == "1"
        elif name == "tuning_cache":
            if raw:  # empty: unset, as a shell's VAR= leaves it
                values[name] = os.path.abspath(os.path.expanduser(raw))  # a later chdir does not move it
        else:
            values[name] = raw
    return Settings(**values)


_lock = threading.Lock()
_current: Settings = from_env()


def get() -> Settings:
    return _current


def reload() -> Settings:
    """Re-read the environment (for tests and tools that change it after import)."""
    global _current
    with _lock:
        _current = from_env()
    return _current


@contextlib.contextmanager
def override(**fields) -> Iterator[Settings]:
    """``with settings.override(gemm="split"): ...`` -- validated, restored on exit, process-wide."""
    global _current
    with _lock:
        previous = _current
        _current = dataclasses.replace(previous, **fields)
    try:
        yield _current
    finally:
        with _lock:
            _current = previous
