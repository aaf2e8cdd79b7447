"""Batched randomized SVD: the top-r singular triplets of many matrices at once (LoRA-One / LoRA-GA / PiSSA inits).

Algorithm (Halko, Martinsson, Tropp 2011, with normalised subspace iteration):
  Ω ~ N(0, 1)^{n×k}, independent per batch element, k = rank + oversample
  Q = orth(A Ω)                                         1 pass over A
  repeat niter times:  Z = orth(Aᵀ Q);  Q = orth(A Z)     2 passes each
  Bᵀ = Aᵀ Q = Q₂ R₂  (so B = Qᵀ A = R₂ᵀ Q₂ᵀ)              1 pass
  R₂ᵀ = Ũ Σ Ṽᵀ (k×k, batched)  →  U = Q Ũ, V = Q₂ Ṽ, top rank columns
Passes over A: 2 + 2·niter.  Everything that touches A is a batched GEMM (memory- or tensor-core-bound, already at
the roofline in cuBLAS; no Triton kernel would beat it), and:
  * ``orth`` is shifted CholeskyQR3 (Fukaya et al. 2020): three Gram + Cholesky + triangular-solve steps, all GEMM-
    shaped, instead of Householder QR (slow on tall-skinny blocks and looping over the batch on GPU).  A batch
    element whose Cholesky fails (exactly rank-deficient or zero input) is redone with Householder QR.
  * the k×k SVD of the whole batch is one call: on CUDA the compiled extension's one-sided Jacobi
    (``lora_kernels._C``) when built, else ``torch.linalg.svd`` (which loops over the batch on GPU for k > 32), said
    once in the log; on CPU LAPACK (faster there than Jacobi, measured).
Math is in fp32 for fp32/fp16/bf16 input (fp64 stays fp64).

Defaults (CPU measurement, 1024², σᵢ ∝ i^-0.5, rank 16, largest principal-angle sine of the top-16 left subspace;
docs/rsvd.md): oversample = 3·rank (k = 4·rank) and niter = 6 give 1.6e-4; k = 3·rank gives 9e-4, k = 2·rank
1.3e-2.  Faster-decaying spectra (i^-1 and steeper) reach the fp32 floor (~5e-6) by niter = 4.  ``tol`` replaces the
fixed count: iterate (up to ``niter``, default 12 then) until the top-rank Ritz values move by less than ``tol``
(relative to σ₁) between iterations; Ritz values converge about twice as fast as the subspace, so the subspace
error is then roughly √tol · (σ₁/gap).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lora_kernels import settings
from lora_kernels.config import math_dtype
from lora_kernels._backend import _say_once

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(A, rank, oversample, niter, tol):
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in _FLOATS:
        raise TypeError(f"A must be float32, float16, bfloat16 or float64, got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"A must have shape (..., m, n), got {tuple(A.shape)}")
    m, n = A.shape[-2:]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"rank={rank} exceeds min(m, n)={min(m, n)} of A with shape {tuple(A.shape)}")
    if oversample is not None and (not isinstance(oversample, int) or oversample < 0):
        raise ValueError(f"oversample must be a non-negative int, got {oversample!r}")
    if niter is not None and (not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be a non-negative int, got {niter!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive float, got {tol!r}")


# --------------------------------------------------------------------------------------------------------------
# Orthonormalisation: shifted CholeskyQR3 with a Householder fallback per failed batch element
# --------------------------------------------------------------------------------------------------------------

def _chol_step(Y: torch.Tensor, shift: Optional[torch.Tensor]):
    G = Y.mT @ Y
    if shift is not None:
        G = G + shift[..., None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    R = L.mT
    ok = info == 0
    # Guard the solve for failed elements (their result is replaced by the fallback anyway).
    R = torch.where(ok[..., None, None], R, torch.eye(R.shape[-1], dtype=R.dtype, device=R.device))
    Q = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    return Q, R, ok


def orth(Y: torch.Tensor, return_r: bool = False):
    """Orthonormal basis of the columns of Y (..., m, k), m ≥ k, by shifted CholeskyQR3; Y = Q R.

    Computed in float64 (Q returned in Y's dtype, R in float64): these are m·k² flops against the m·n·k of a pass
    over A, and in fp32 the Gram step lost u·cond(Y) of the subspace — on σᵢ ∝ i^-2 with k = 96, sinΘ rose from
    the ~5e-6 fp32 floor to 9e-5 as iterations sharpened cond(AZ) to ~10⁴ (bench/rsvd_convergence.py).
    Elements whose Cholesky fails or whose result is not finite are recomputed with Householder QR.
    """
    out_dtype = Y.dtype
    Y = Y.double()
    m, k = Y.shape[-2:]
    u = torch.finfo(Y.dtype).eps / 2
    norm2 = Y.pow(2).sum(dim=(-2, -1))  # ‖Y‖_F² ≥ ‖Y‖₂²
    shift = 11.0 * (m * k + k * (k + 1)) * u * norm2
    Q1, R1, ok1 = _chol_step(Y, shift)
    Q2, R2, ok2 = _chol_step(Q1, None)
    Q, R3, ok3 = _chol_step(Q2, None)
    ok = ok1 & ok2 & ok3 & torch.isfinite(Q).all(dim=(-2, -1))
    R = R3 @ R2 @ R1 if return_r else None
    if not bool(ok.all()):
        bad = ~ok
        Qh, Rh = torch.linalg.qr(Y[bad])
        Q = Q.clone()
        Q[bad] = Qh
        if return_r:
            R = R.clone()
            R[bad] = Rh
    Q = Q.to(out_dtype)
    return (Q, R) if return_r else Q


# --------------------------------------------------------------------------------------------------------------
# The small k×k SVD of the whole batch
# --------------------------------------------------------------------------------------------------------------

def small_svd(M: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a batch of small square matrices (..., k, k): (U, S descending, V) with M = U diag(S) Vᵀ.

    CUDA: the extension's batched one-sided Jacobi (one thread block per matrix), because torch.linalg.svd loops
    over the batch there for k > 32.  CPU: LAPACK through torch.linalg.svd, measured 2-18x faster than the CPU
    Jacobi twin for k = 32..256 (docs/rsvd.md).  ``LORA_KERNELS_SMALL_SVD=torch|jacobi`` overrides, for measuring.
    """
    from lora_kernels import _extension

    choice = settings.get().small_svd
    if choice == "jacobi" or (choice == "auto" and M.is_cuda):
        fn = _extension.jacobi_svd_for(M)
        if fn is not None:
            return fn(M)
        if M.is_cuda or choice == "jacobi":
            _say_once(f"lora_kernels: compiled extension lora_kernels._C is not available for {M.device.type}; "
                      "the batched k×k SVD of rsvd uses torch.linalg.svd instead (on GPU it loops over the batch "
                      "for k > 32).")
    U, S, Vh = torch.linalg.svd(M)
    return U, S, Vh.mT


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------

def rsvd(A: torch.Tensor, rank: int, *, oversample: Optional[int] = None, niter: Optional[int] = None,
         generator: Optional[torch.Generator] = None, tol: Optional[float] = None):
    """Top-``rank`` SVD of A (..., m, n): returns U (..., m, rank), S (..., rank) descending, V (..., n, rank) with
    A ≈ U diag(S) Vᵀ.  fp32/fp16/bf16 input is computed in fp32 (outputs fp32); fp64 in fp64.

    oversample: extra subspace columns (default 3·rank; k = rank + oversample is capped at min(m, n)).
    niter: subspace iterations (default 6; with ``tol``, the maximum, default 12).
    generator: a torch.Generator on A's device for reproducible test matrices (independent per batch element).
    tol: stop iterating once the top-rank Ritz values change by less than tol·σ₁ between iterations.
    """
    _check(A, rank, oversample, niter, tol)
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    wdt = math_dtype(A.dtype)
    X = A.to(wdt)
    k = min(rank + (3 * rank if oversample is None else oversample), m, n)
    if niter is None:
        niter = 12 if tol is not None else 6
    if X.numel() == 0:
        raise ValueError(f"A has no elements (shape {tuple(A.shape)})")

    omega = torch.randn((*batch, n, k), dtype=wdt, device=A.device, generator=generator)
    Q = orth(X @ omega)
    prev = None
    for _ in range(niter):
        Z = orth(X.mT @ Q)
        Q, R = orth(X @ Z, return_r=True)
        if tol is not None:
            ritz = torch.linalg.svdvals(R)[..., :rank]  # σ(A Z) ≈ top σ(A); k×k, values only (cheap)
            if prev is not None:
                scale = ritz[..., :1].clamp_min(torch.finfo(wdt).tiny)
                if bool(((ritz - prev).abs() / scale).max() < tol):
                    break
            prev = ritz
    Q2, R2 = orth(X.mT @ Q, return_r=True)  # Bᵀ = Aᵀ Q = Q₂ R₂ (R₂ in float64)
    Ut, S, Vt = small_svd(R2.mT)  # B = R₂ᵀ Q₂ᵀ = Ũ Σ (Q₂ Ṽ)ᵀ, in float64
    U = Q @ Ut[..., :rank].to(wdt)
    V = Q2 @ Vt[..., :rank].to(wdt)
    return U, S[..., :rank].to(wdt), V


def rsvd_ref(A: torch.Tensor, rank: int, *, oversample: Optional[int] = None, niter: Optional[int] = None,
             generator: Optional[torch.Generator] = None, tol: Optional[float] = None):
    """Plain-torch reference of the same algorithm: Householder QR, full SVD of B = Qᵀ A, one batch element at a
    time, same test-matrix draw (so with the same generator state it sees the same Ω)."""
    _check(A, rank, oversample, niter, tol)
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    wdt = math_dtype(A.dtype)
    k = min(rank + (3 * rank if oversample is None else oversample), m, n)
    niter = (12 if tol is not None else 6) if niter is None else niter
    omega = torch.randn((*batch, n, k), dtype=wdt, device=A.device, generator=generator)
    X = A.to(wdt).reshape(-1, m, n)
    omega = omega.reshape(-1, n, k)
    Us, Ss, Vs = [], [], []
    for i in range(X.shape[0]):
        a = X[i]
        q = torch.linalg.qr(a @ omega[i])[0]
        prev = None
        for _ in range(niter):
            z = torch.linalg.qr(a.mT @ q)[0]
            y = a @ z
            q = torch.linalg.qr(y)[0]
            if tol is not None:
                ritz = torch.linalg.svdvals(y)[:rank]
                if prev is not None and float(((ritz - prev).abs() / ritz[:1].clamp_min(1e-300)).max()) < tol:
                    break
                prev = ritz
        ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
        Us.append(q @ ub[:, :rank])
        Ss.append(s[:rank])
        Vs.append(vh[:rank].mT)
    return (torch.stack(Us).reshape(*batch, m, rank), torch.stack(Ss).reshape(*batch, rank),
            torch.stack(Vs).reshape(*batch, n, rank))


def principal_sine(U: torch.Tensor, U_true: torch.Tensor) -> torch.Tensor:
    """Largest principal-angle sine between span(U) and span(U_true), batched, computed in float64 as
    ‖(I − P_true) Û‖₂ with Û an orthonormalised U (accurate down to ~1e-15, unlike √(1 − σ_min²))."""
    Uq = torch.linalg.qr(U.double())[0]
    Ut = U_true.double()
    return torch.linalg.matrix_norm(Uq - Ut @ (Ut.mT @ Uq), ord=2)


