"""Backend selection shared by every op: Triton kernels or the pure-PyTorch path.

The Triton kernels run when the tensors live on a CUDA device and Triton imports, or on CPU tensors when
``TRITON_INTERPRET=1`` is set (how CI tests the kernels themselves).  Everywhere else -- a laptop with a plain
``import lora_kernels`` -- the same public functions run a pure-PyTorch implementation with the same
semantics.  Nothing here queries a device at import time.
"""

from __future__ import annotations

import functools
import logging

import torch

from lora_kernels import settings

logger = logging.getLogger("lora_kernels")

try:  # Triton is optional at run time (e.g. macOS, or a CPU-only install without it).
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``, read once with the settings)."""
    return settings.get().interpret


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    logger.warning(message)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels should serve an op on tensor ``t``."""
    if t.dtype == torch.float64:
        # The kernels serve fp32/fp16/bf16; float64 exists for gradcheck and references.
        return False
    if t.is_cuda:
        if HAS_TRITON:
            return True
        _say_once("lora_kernels: triton is not importable; CUDA tensors use the slower pure-PyTorch path.")
        return False
    return HAS_TRITON and t.device.type == "cpu" and interpreter_enabled()
