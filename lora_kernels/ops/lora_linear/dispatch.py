"""Which backend serves a call: the Triton launchers (``launch``) or the pure-PyTorch path (``torch_path``).

The one place the choice is made; both modules expose the same entry points (``keep_mask``, ``shrink``, ``gemm``,
``grad_A``, ``grad_B``).
"""

from __future__ import annotations

import contextlib

import torch

from lora_kernels._backend import HAS_TRITON, use_triton
from lora_kernels.ops.lora_linear import torch_path

if HAS_TRITON:
    from lora_kernels.ops.lora_linear import launch
else:  # pragma: no cover - exercised only where triton is missing
    launch = None

MAX_KERNEL_RANK = 256  # the shrink kernel holds all of r in one tile; larger ranks take the PyTorch path


def backend(x: torch.Tensor, r: int = 1):
    """``launch`` when the kernels serve tensor x at rank r, else ``torch_path``."""
    return launch if r <= MAX_KERNEL_RANK and use_triton(x) else torch_path


def on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' device (e.g. device_map="auto")."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
