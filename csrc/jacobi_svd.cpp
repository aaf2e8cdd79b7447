// CPU implementation of the batched one-sided Jacobi SVD (one matrix per task, at::parallel_for over the batch).
//
// One-sided Jacobi (Hestenes): orthogonalise the columns of W = M by plane rotations applied on the right,
// accumulating V; at convergence W = U diag(S).  It computes small singular values to high relative accuracy,
// and unlike a Golub–Kahan SVD it is the same simple loop for every matrix, which is what a GPU wants (see
// cuda/jacobi_svd_kernel.cu).  Arithmetic is in double for both float32 and float64 input.
#include "jacobi_svd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

void jacobi_one(std::vector<double>& w, std::vector<double>& v, int64_t k, int64_t max_sweeps, double tol) {
  // w, v: column-major k×k (column j at [j*k, j*k + k)).
  for (int64_t sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p < k - 1; ++p) {
      for (int64_t q = p + 1; q < k; ++q) {
        double* wp = &w[p * k];
        double* wq = &w[q * k];
        double alpha = 0.0, beta = 0.0, gamma = 0.0;
        for (int64_t i = 0; i < k; ++i) {
          alpha += wp[i] * wp[i];
          beta += wq[i] * wq[i];
          gamma += wp[i] * wq[i];
        }
        if (gamma == 0.0 || std::abs(gamma) <= tol * std::sqrt(alpha) * std::sqrt(beta)) continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / std::sqrt(1.0 + t * t);
        const double s = c * t;
        double* vp = &v[p * k];
        double* vq = &v[q * k];
        for (int64_t i = 0; i < k; ++i) {
          const double a = wp[i], b = wq[i];
          wp[i] = c * a - s * b;
          wq[i] = s * a + c * b;
          const double x = vp[i], y = vq[i];
          vp[i] = c * x - s * y;
          vq[i] = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
}

template <typename scalar_t>
void run(const torch::Tensor& M, torch::Tensor& U, torch::Tensor& S, torch::Tensor& V, int64_t max_sweeps,
         double tol) {
  const int64_t batch = M.size(0), k = M.size(1);
  const scalar_t* m = M.data_ptr<scalar_t>();
  scalar_t* u = U.data_ptr<scalar_t>();
  scalar_t* s = S.data_ptr<scalar_t>();
  scalar_t* vv = V.data_ptr<scalar_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> w(k * k), v(k * k);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* mb = m + b * k * k;  // row-major input
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) {
          w[j * k + i] = static_cast<double>(mb[i * k + j]);
          v[j * k + i] = (i == j) ? 1.0 : 0.0;
        }
      jacobi_one(w, v, k, max_sweeps, tol);
      for (int64_t j = 0; j < k; ++j) {
        double norm = 0.0;
        for (int64_t i = 0; i < k; ++i) norm += w[j * k + i] * w[j * k + i];
        norm = std::sqrt(norm);
        s[b * k + j] = static_cast<scalar_t>(norm);
        const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
        for (int64_t i = 0; i < k; ++i) {
          u[b * k * k + i * k + j] = static_cast<scalar_t>(w[j * k + i] * inv);
          vv[b * k * k + i * k + j] = static_cast<scalar_t>(v[j * k + i]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> jacobi_svd_cpu(const torch::Tensor& M, int64_t max_sweeps,
                                                                       double tol) {
  TORCH_CHECK(M.device().is_cpu(), "jacobi_svd_cpu: M must be a CPU tensor, got ", M.device());
  TORCH_CHECK(M.dim() == 3 && M.size(1) == M.size(2), "jacobi_svd_cpu: M must have shape (batch, k, k), got ",
              M.sizes());
  TORCH_CHECK(M.scalar_type() == torch::kFloat32 || M.scalar_type() == torch::kFloat64,
              "jacobi_svd_cpu: M must be float32 or float64, got ", M.scalar_type());
  TORCH_CHECK(max_sweeps > 0, "jacobi_svd_cpu: max_sweeps must be positive, got ", max_sweeps);
  TORCH_CHECK(tol > 0.0, "jacobi_svd_cpu: tol must be positive, got ", tol);
  const auto Mc = M.contiguous();
  auto U = torch::empty_like(Mc);
  auto V = torch::empty_like(Mc);
  auto S = torch::empty({Mc.size(0), Mc.size(1)}, Mc.options());
  if (Mc.numel() == 0) return {U, S, V};
  AT_DISPATCH_FLOATING_TYPES(Mc.scalar_type(), "jacobi_svd_cpu", [&] { run<scalar_t>(Mc, U, S, V, max_sweeps, tol); });
  return {U, S, V};
}
