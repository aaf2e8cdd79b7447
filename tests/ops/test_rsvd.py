"""rsvd against float64 torch.linalg.svd on matrices with known spectra, and the extension's Jacobi vs LAPACK.

What is compared: singular values by relative error, subspaces by the largest principal-angle sine, the
reconstruction against the optimal rank-r error -- never raw singular vectors, whose signs (and, within a repeated
singular value, whose basis) are arbitrary, so two correct SVDs can differ in them entirely.

Tolerances at the defaults (k = 4r, 6 subspace iterations), from the convergence measured in docs/rsvd.md:
the slowest spectrum (σᵢ ∝ i^-0.5, relative gap σ_r/σ_{r+1} − 1 ≈ 3% at r = 16) reaches sinΘ ≈ 2e-4, so it is held
to 1e-3; faster-decaying spectra reach the fp32 floor (~1e-5), held to 1e-4.
"""

import os

import numpy as np
import pytest
import torch

from lora_kernels import _extension, rsvd, rsvd_ref
from lora_kernels.ops.rsvd import orth, principal_sine
from tests.helpers import repo_path, standalone_bound


def with_spectrum(m, n, sigma, batch=(), seed=0):
    """A = U diag(σ) Vᵀ in float64 with Haar U, V; returns A, U, σ, V (full thin factors)."""
    g = torch.Generator().manual_seed(seed)
    p = len(sigma)
    U = torch.linalg.qr(torch.randn(*batch, m, p, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, p, dtype=torch.float64, generator=g))[0]
    return (U * sigma) @ V.mT, U, sigma, V


def spectrum(name, p):
    i = torch.arange(1, p + 1, dtype=torch.float64)
    return {
        "i^-0.5": i**-0.5,
        "i^-1": i**-1.0,
        "i^-2": i**-2.0,
        "flat+gap": torch.where(i <= 16, 1.0, 0.1),  # flat top block, then a gap (flat itself has no unique subspace)
        "cond1e8": 10.0 ** (-8.0 * (i - 1) / (p - 1)),
    }[name]


def check(A64, U_true, sigma, r, U, S, V, V_true, sin_tol, sig_tol):
    assert U.shape == (*A64.shape[:-2], A64.shape[-2], r) and S.shape == (*A64.shape[:-2], r)
    assert V.shape == (*A64.shape[:-2], A64.shape[-1], r)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all()
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values must be descending"
    s_true = sigma[:r]
    sig_err = ((S.double() - s_true).abs() / s_true).max().item()
    assert sig_err <= sig_tol, f"σ rel err {sig_err:.2e}"
    su = principal_sine(U, U_true[..., :r]).max().item()
    sv = principal_sine(V, V_true[..., :r]).max().item()
    assert su <= sin_tol and sv <= sin_tol, f"sinΘ U {su:.2e} V {sv:.2e}"
    recon = torch.linalg.matrix_norm(A64 - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT)
    optimal = sigma[r:].pow(2).sum().sqrt()
    assert (recon <= optimal * (1 + 1e-3) + 1e-5 * sigma[0]).all(), f"recon {recon} vs optimal {optimal}"


@pytest.mark.parametrize("name, sin_tol", [("i^-0.5", 1e-3), ("i^-1", 1e-4), ("i^-2", 1e-4), ("flat+gap", 1e-4),
                                           ("cond1e8", 1e-4)])
@pytest.mark.parametrize("m, n", [(300, 200), (150, 260)])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batch3"])
def test_known_spectra(name, sin_tol, m, n, batch):
    r = 16
    sigma = spectrum(name, min(m, n))
    A, U_t, s, V_t = with_spectrum(m, n, sigma, batch)
    U, S, V = rsvd(A.float(), r, generator=torch.Generator().manual_seed(1))
    assert U.dtype == torch.float32
    check(A, U_t, s, r, U, S, V, V_t, sin_tol, sig_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computes_in_fp32(dtype):
    r = 8
    A, _, _, _ = with_spectrum(200, 120, spectrum("i^-1", 120), (2,))
    Aq = A.to(dtype)
    A64 = Aq.double()  # the matrix actually given: compare against its own SVD
    Ut, St, Vht = torch.linalg.svd(A64, full_matrices=False)
    U, S, V = rsvd(Aq, r)
    assert U.dtype == torch.float32
    assert ((S.double() - St[..., :r]).abs() / St[..., :r]).max() < 1e-4
    assert principal_sine(U, Ut[..., :r]).max() < 1e-4
    assert principal_sine(V, Vht.mT[..., :r]).max() < 1e-4


def test_rank_deficient_zero_and_thin():
    # true rank 5 < requested 16: top-5 subspace exact, the rest ~0, U and V still orthonormal
    A, U_t, s, _ = with_spectrum(120, 90, torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64), (2,))
    U, S, V = rsvd(A.float(), 16)
    assert principal_sine(U[..., :5], U_t).max() < 1e-5
    assert ((S[..., :5].double() - s).abs() / s).max() < 1e-5 and S[..., 5:].abs().max() < 1e-5
    eye = torch.eye(16)
    assert (U.mT @ U - eye).abs().max() < 1e-4 and (V.mT @ V - eye).abs().max() < 1e-4
    # the zero matrix: zeros, no NaN, orthonormal factors
    U, S, V = rsvd(torch.zeros(2, 40, 30), 4)
    assert torch.isfinite(U).all() and torch.isfinite(V).all() and (S == 0).all()
    assert (U.mT @ U - torch.eye(4)).abs().max() < 1e-5
    # one row and one column
    row = torch.randn(1, 50)
    U, S, V = rsvd(row, 1)
    assert abs(S.item() - row.norm().item()) < 1e-5 * row.norm().item()
    assert principal_sine(V, (row / row.norm()).t()).item() <= standalone_bound(torch.float32, 50)  # fp32, 50 long
    col = torch.randn(70, 1)
    U, S, V = rsvd(col, 1)
    assert abs(S.item() - col.norm().item()) < 1e-5 * col.norm().item()


def test_at_least_as_accurate_as_svd_lowrank():
    """Equal q (= k) and niter: our error ≤ torch.svd_lowrank's, over 6 matrices (ratio of medians ≤ 1.2)."""
    r, k, niter = 16, 32, 2
    A, U_t, _, _ = with_spectrum(400, 300, spectrum("i^-0.5", 300), (6,), seed=5)
    U, _, _ = rsvd(A.float(), r, oversample=k - r, niter=niter, generator=torch.Generator().manual_seed(0))
    ours = principal_sine(U, U_t[..., :r])
    torch.manual_seed(0)
    theirs = torch.stack([principal_sine(torch.svd_lowrank(A[i].float(), q=k, niter=niter)[0][:, :r], U_t[i, :, :r])
                          for i in range(A.shape[0])])
    assert ours.median() <= 1.2 * theirs.median(), f"ours {ours.tolist()} vs svd_lowrank {theirs.tolist()}"


def test_reference_implements_the_same_algorithm():
    A, U_t, _, _ = with_spectrum(200, 150, spectrum("i^-1", 150), (2,))
    a = rsvd(A.float(), 8, generator=torch.Generator().manual_seed(7))
    b = rsvd_ref(A.float(), 8, generator=torch.Generator().manual_seed(7))
    assert principal_sine(a[0], b[0]).max() < 1e-4
    assert ((a[1] - b[1]).abs() / b[1]).max() < 1e-5


def test_generator_reproducible_and_independent_per_element():
    A, _, _, _ = with_spectrum(60, 50, torch.ones(50, dtype=torch.float64))  # flat: the result depends on Ω
    A2 = A.expand(2, 60, 50).float()
    U1 = rsvd(A2, 4, niter=0, oversample=0, generator=torch.Generator().manual_seed(3))[0]
    U2 = rsvd(A2, 4, niter=0, oversample=0, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(U1, U2)
    assert principal_sine(U1[0], U1[1]).item() > 0.1, "batch elements must get independent test matrices"


def test_tol_stops_early_and_is_accurate(monkeypatch):
    import lora_kernels.ops.rsvd as mod

    calls = []
    orig = mod.orth
    monkeypatch.setattr(mod, "orth", lambda *a, **k: calls.append(1) or orig(*a, **k))
    A, U_t, _, _ = with_spectrum(300, 200, spectrum("i^-2", 200))
    U, _, _ = rsvd(A.float(), 8, tol=1e-6)
    iterations = (len(calls) - 2) // 2
    assert iterations < 12, "i^-2 converges long before the cap"
    assert principal_sine(U, U_t[:, :8]).item() < 1e-4


def test_orth_handles_ill_conditioned_blocks():
    Y = torch.randn(500, 24, dtype=torch.float64) @ torch.diag(10.0 ** -torch.linspace(0, 7, 24, dtype=torch.float64))
    Q, R = orth(Y.float(), return_r=True)
    assert (Q.mT @ Q - torch.eye(24)).abs().max() < 1e-5
    assert ((Q.double() @ R.double() - Y).norm() / Y.norm()) < 1e-5


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(rank=0), ValueError, "rank"), (dict(rank=31), ValueError, "rank=31"), (dict(rank=2.0), ValueError, "rank"),
    (dict(rank=2, niter=-1), ValueError, "niter"), (dict(rank=2, oversample=-2), ValueError, "oversample"),
    (dict(rank=2, tol=0.0), ValueError, "tol"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        rsvd(torch.randn(40, 30), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="A must be"):
        rsvd(torch.ones(4, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="shape"):
        rsvd(torch.randn(5), 1)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        rsvd(np.ones((4, 4)), 1)


# ------------------------------------------------------------------------------------------------------------
# The compiled extension's batched Jacobi SVD, tested directly against numpy (LAPACK)
# ------------------------------------------------------------------------------------------------------------

needs_ext = pytest.mark.skipif(not _extension.available(), reason="lora_kernels._C not built")


@needs_ext
@pytest.mark.parametrize("k", [1, 2, 7, 32, 65, 256])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_jacobi_cpu_matches_lapack(k, dtype, tol):
    M = torch.randn(3 if k < 256 else 1, k, k, dtype=torch.float64)
    U, S, V = _extension.jacobi_svd(M.to(dtype))
    s_np = np.linalg.svd(M.numpy(), compute_uv=False)
    assert np.abs(S.double().numpy() - s_np).max() <= tol * s_np.max()
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.double().mT @ U.double() - eye).abs().max() <= 50 * tol * k ** 0.5
    assert (V.double().mT @ V.double() - eye).abs().max() <= 50 * tol * k ** 0.5
    recon = U.double() @ torch.diag_embed(S.double()) @ V.double().mT
    assert (recon - M).abs().max() <= 50 * tol * k ** 0.5 * s_np.max()


@needs_ext
def test_jacobi_cpu_degenerate():
    U, S, V = _extension.jacobi_svd(torch.zeros(2, 9, 9))
    assert (S == 0).all() and (U.mT @ U - torch.eye(9)).abs().max() < 1e-6
    low = torch.randn(2, 20, 3, dtype=torch.float64) @ torch.randn(2, 3, 20, dtype=torch.float64)
    U, S, V = _extension.jacobi_svd(low)
    s_np = np.linalg.svd(low.numpy(), compute_uv=False)
    assert np.abs(S.numpy() - s_np).max() < 1e-12 * s_np.max()
    assert (U.mT @ U - torch.eye(20, dtype=torch.float64)).abs().max() < 1e-12


@needs_ext
def test_jacobi_bad_input_names_argument():
    from lora_kernels import _C

    with pytest.raises(RuntimeError, match="M must have shape"):
        _C.jacobi_svd_cpu(torch.randn(3, 4, 5), 30, 1e-12)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _C.jacobi_svd_cpu(torch.ones(1, 3, 3, dtype=torch.int32), 30, 1e-12)


def test_cuda_kernel_compiles_for_sm90(tmp_path):
    """The CUDA Jacobi kernel is plain CUDA: nvcc (where present) must compile it for Hopper."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    src = repo_path("csrc", "cuda", "jacobi_svd_kernel.cu")
    out = tmp_path / "k.o"
    proc = subprocess.run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-c", src, "-o",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0


def test_cuda_binding_compiles_against_the_cuda_runtime_headers():
    """The binding (csrc/cuda/jacobi_svd_cuda.cpp) needs the CUDA runtime's headers only, not cuBLAS / cuSPARSE /
    cuSOLVER's (ATen/cuda/CUDAContext.h pulls those in; a toolkit with nvcc and cudart alone lacks them, and the
    extension then silently builds without CUDA).  Syntax-checked with the host compiler against torch's headers
    and the first CUDA include folder found."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    cxx = shutil.which("c++")
    homes = [h for h in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda") if h]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if os.path.isfile(os.path.join(h, "include", "cuda_runtime_api.h"))), None)
    if cxx is None or cuda_inc is None or torch.version.cuda is None:
        pytest.skip("needs a C++ compiler, the CUDA runtime headers and a CUDA build of torch (its c10/cuda headers)")
    incs = cpp_extension.include_paths() + [cuda_inc, sysconfig.get_paths()["include"]]
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f"-I{i}" for i in incs] + [repo_path("csrc", "cuda",
                                                                                       "jacobi_svd_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_batch_accuracy_and_jacobi():
    r = 16
    A, U_t, s, V_t = with_spectrum(1024, 1024, spectrum("i^-0.5", 1024), (4,))
    U, S, V = rsvd(A.float().cuda(), r, generator=torch.Generator("cuda").manual_seed(0))
    check(A, U_t, s, r, U.cpu(), S.cpu(), V.cpu(), V_t, 1e-3, 1e-4)
    if _extension.has_cuda():
        M = torch.randn(8, 100, 100, device="cuda")
        U, S, V = _extension.jacobi_svd(M)
        s_ref = torch.linalg.svdvals(M.double())
        assert ((S.double() - s_ref).abs().max() / s_ref.max()) < 2e-5
        assert (U.mT @ U - torch.eye(100, device="cuda")).abs().max() < 1e-4
