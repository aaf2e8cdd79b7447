// Batched one-sided (Hestenes) Jacobi SVD of small square matrices: the k×k core of the randomized SVD.
#pragma once
#include <torch/extension.h>

#include <tuple>

// M: (batch, k, k) float32/float64.  Returns (U, S, V), unsorted, with M = U diag(S) Vᵀ; columns of U whose
// singular value is 0 are 0 (the Python wrapper sorts and completes them to an orthonormal basis).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> jacobi_svd_cpu(const torch::Tensor& M, int64_t max_sweeps,
                                                                       double tol);
#ifdef WITH_CUDA
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> jacobi_svd_cuda(const torch::Tensor& M, int64_t max_sweeps,
                                                                        double tol);
#endif
