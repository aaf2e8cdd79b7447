// Launcher of the batched one-sided Jacobi SVD kernel (plain CUDA, no torch headers, so it compiles anywhere
// nvcc exists).
#pragma once
#include <cuda_runtime.h>

// M: (batch, k, k) row-major.  work: 2·batch·k·k scratch.  Outputs row-major U (batch, k, k), S (batch, k),
// V (batch, k, k), unsorted; zero singular values give zero U columns.
template <typename T>
cudaError_t launch_jacobi_svd(const T* M, T* work, T* U, T* S, T* V, int batch, int k, int max_sweeps, T tol,
                              cudaStream_t stream);
