// Torch binding of the CUDA one-sided Jacobi SVD (built only with a CUDA torch and nvcc).
// c10's stream and guard headers need only the CUDA runtime's; ATen/cuda/CUDAContext.h would also pull in the
// cuBLAS / cuSPARSE / cuSOLVER headers, which a toolkit with nvcc and cudart alone does not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../jacobi_svd.h"
#include "jacobi_svd_kernel.h"

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> jacobi_svd_cuda(const torch::Tensor& M, int64_t max_sweeps,
                                                                        double tol) {
  TORCH_CHECK(M.is_cuda(), "jacobi_svd_cuda: M must be a CUDA tensor, got ", M.device());
  TORCH_CHECK(M.dim() == 3 && M.size(1) == M.size(2), "jacobi_svd_cuda: M must have shape (batch, k, k), got ",
              M.sizes());
  TORCH_CHECK(M.scalar_type() == torch::kFloat32 || M.scalar_type() == torch::kFloat64,
              "jacobi_svd_cuda: M must be float32 or float64, got ", M.scalar_type());
  TORCH_CHECK(max_sweeps > 0, "jacobi_svd_cuda: max_sweeps must be positive, got ", max_sweeps);
  TORCH_CHECK(tol > 0.0, "jacobi_svd_cuda: tol must be positive, got ", tol);
  TORCH_CHECK(M.size(0) <= 2147483647 && M.size(1) <= 46340, "jacobi_svd_cuda: batch or k too large: ", M.sizes());
  const c10::cuda::CUDAGuard guard(M.device());
  const auto Mc = M.contiguous();
  const int batch = static_cast<int>(Mc.size(0)), k = static_cast<int>(Mc.size(1));
  auto U = torch::empty_like(Mc);
  auto V = torch::empty_like(Mc);
  auto S = torch::empty({Mc.size(0), Mc.size(1)}, Mc.options());
  auto work = torch::empty({2, Mc.size(0), Mc.size(1), Mc.size(2)}, Mc.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (Mc.scalar_type() == torch::kFloat32) {
    err = launch_jacobi_svd<float>(Mc.data_ptr<float>(), work.data_ptr<float>(), U.data_ptr<float>(),
                                   S.data_ptr<float>(), V.data_ptr<float>(), batch, k, static_cast<int>(max_sweeps),
                                   static_cast<float>(tol), stream);
  } else {
    err = launch_jacobi_svd<double>(Mc.data_ptr<double>(), work.data_ptr<double>(), U.data_ptr<double>(),
                                    S.data_ptr<double>(), V.data_ptr<double>(), batch, k,
                                    static_cast<int>(max_sweeps), tol, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "jacobi_svd_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {U, S, V};
}
