"""The optional compiled extension ``lora_kernels._C`` and the Python side of its batched Jacobi SVD.

The bound C++/CUDA functions return unsorted factors with zero columns of U where a singular value is zero; the
wrapper here sorts by descending singular value and completes such columns to an orthonormal basis, once for both
devices.  Without the extension every caller falls back to torch: ``rsvd`` says so once in the log where that is
slower (CUDA, or ``LORA_KERNELS_SMALL_SVD=jacobi``; on CPU it uses LAPACK anyway).  An extension that was built but
does not load (e.g. compiled against another torch) is said once at import, with the loader's error.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch

from lora_kernels._backend import _say_once

_C_ERROR: Optional[str] = None  # why _C is None (see unavailable_reason)
try:
    from lora_kernels import _C
except ImportError as _exc:
    _C = None
    if importlib.util.find_spec("lora_kernels._C") is None:
        _C_ERROR = "lora_kernels._C was not built"
    else:  # built but does not load: a stale or broken build
        _C_ERROR = str(_exc)
        _say_once(f"lora_kernels: compiled extension lora_kernels._C does not load ({_exc}); continuing without it "
                  "(rebuild with `python3 -m pip install --no-build-isolation -e .`).")


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded; otherwise why not (not built: no compiler or no torch at install time,
    ``LORA_KERNELS_NO_EXT=1``, an isolated build; or a build that does not load)."""
    return _C_ERROR


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def _sorted_completed(U, S, V):
    S, order = torch.sort(S, dim=-1, descending=True)
    idx = order.unsqueeze(-2).expand_as(U)
    U = torch.gather(U, -1, idx)
    V = torch.gather(V, -1, idx)
    tiny = S[..., :1] * (S.shape[-1] * torch.finfo(S.dtype).eps)
    null = S <= tiny
    if bool(null.any()):
        # Replace null columns by random directions and re-orthonormalise: Householder QR keeps the leading
        # (non-null) columns' directions; fix the QR signs so they are kept exactly.
        gen = torch.Generator(device=U.device).manual_seed(0)
        filler = torch.randn(U.shape, dtype=U.dtype, device=U.device, generator=gen)
        Uf = torch.where(null.unsqueeze(-2), filler, U)
        Q, R = torch.linalg.qr(Uf)
        sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        U = Q * sign.unsqueeze(-2)
    return U, S, V


def _jacobi(M: torch.Tensor, cuda: bool):
    k = M.shape[-1]
    batch = M.shape[:-2]
    dt = M.dtype
    work = M.reshape(-1, k, k)
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    # Converged when every column pair is orthogonal to ~k·eps (tighter only makes fp32 rotate on rounding noise).
    tol = float(max(k, 8) * torch.finfo(work.dtype).eps)
    fn = _C.jacobi_svd_cuda if cuda else _C.jacobi_svd_cpu
    U, S, V = fn(work.contiguous(), 30, tol)
    U, S, V = _sorted_completed(U, S, V)
    return (U.reshape(*batch, k, k).to(dt), S.reshape(*batch, k).to(dt), V.reshape(*batch, k, k).to(dt))


def jacobi_svd_for(M: torch.Tensor) -> Optional[Callable]:
    """The extension's batched SVD for M's device, or None when it is not built for that device."""
    if _C is None:
        return None
    if M.is_cuda:
        return functools.partial(_jacobi, cuda=True) if has_cuda() else None
    if M.device.type == "cpu":
        return functools.partial(_jacobi, cuda=False)
    return None


def jacobi_svd(M: torch.Tensor):
    """Batched SVD (U, S descending, V) of square matrices (..., k, k) by one-sided Jacobi; needs the extension."""
    fn = jacobi_svd_for(M)
    if fn is None:
        raise RuntimeError(f"lora_kernels._C has no Jacobi SVD for device {M.device} (extension not built)")
    return fn(M)
