// Batched one-sided Jacobi SVD on the GPU: one thread block per matrix, the matrices of a batch in parallel.
//
// cuSOLVER's batched SVD (gesvdjBatched) stops at 32×32 and torch.linalg.svd loops over the batch above that;
// the randomized SVD needs k = rank + oversample up to 256+.  Each block keeps its matrix W and the accumulated
// rotations V column-major in global scratch (at k = 256 they need 512 KiB, more than shared memory; they stay
// in L2).  A sweep is k-1 rounds of the round-robin "tournament" ordering: every round pairs all columns into
// k/2 disjoint pairs, one warp per pair: warp-reduced dot products, then the rotation of both columns of W and V.
// Rounds are separated by __syncthreads(); a sweep without any rotation ends the iteration.
#include "jacobi_svd_kernel.h"

namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ int tournament(int pos, int round, int n) {
  // n players (even); player 0 stays at position 0, the others rotate by one position per round.
  return pos == 0 ? 0 : ((pos - 1 + round) % (n - 1)) + 1;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) jacobi_svd_kernel(const T* __restrict__ M, T* __restrict__ work,
                                                                 T* __restrict__ U, T* __restrict__ S,
                                                                 T* __restrict__ V, int k, int max_sweeps, T tol) {
  const size_t b = blockIdx.x;
  const size_t kk2 = static_cast<size_t>(k) * k;
  const T* Mb = M + b * kk2;
  T* W = work + b * kk2;                                   // column-major
  T* Vc = work + static_cast<size_t>(gridDim.x) * kk2 + b * kk2;  // column-major
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ int rotated;

  for (int idx = threadIdx.x; idx < k * k; idx += blockDim.x) {
    const int i = idx / k, j = idx % k;
    W[j * k + i] = Mb[idx];
    Vc[j * k + i] = (i == j) ? T(1) : T(0);
  }
  __syncthreads();

  const int n = k + (k & 1);  // an odd k gets a dummy column index k that is never touched
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int round = 0; round < n - 1; ++round) {
      for (int pair = warp; pair < n / 2; pair += kWarps) {
        int p = tournament(pair, round, n), q = tournament(n - 1 - pair, round, n);
        if (p >= k || q >= k) continue;
        if (p > q) {
          const int tmp = p;
          p = q;
          q = tmp;
        }
        T* wp = W + static_cast<size_t>(p) * k;
        T* wq = W + static_cast<size_t>(q) * k;
        T alpha = 0, beta = 0, gamma = 0;
        for (int i = lane; i < k; i += 32) {
          const T a = wp[i], c = wq[i];
          alpha += a * a;
          beta += c * c;
          gamma += a * c;
        }
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        if (gamma == T(0) || fabs(gamma) <= tol * sqrt(alpha) * sqrt(beta)) continue;
        const T zeta = (beta - alpha) / (T(2) * gamma);
        const T t = (zeta >= T(0) ? T(1) : T(-1)) / (fabs(zeta) + sqrt(T(1) + zeta * zeta));
        const T c = T(1) / sqrt(T(1) + t * t);
        const T s = c * t;
        T* vp = Vc + static_cast<size_t>(p) * k;
        T* vq = Vc + static_cast<size_t>(q) * k;
        for (int i = lane; i < k; i += 32) {
          const T a = wp[i], d = wq[i];
          wp[i] = c * a - s * d;
          wq[i] = s * a + c * d;
          const T x = vp[i], y = vq[i];
          vp[i] = c * x - s * y;
          vq[i] = s * x + c * y;
        }
        if (lane == 0) rotated = 1;
      }
      __syncthreads();
    }
    const int any = rotated;
    __syncthreads();  // every thread has read the flag before thread 0 clears it
    if (!any) break;
  }

  for (int j = warp; j < k; j += kWarps) {
    const T* wj = W + static_cast<size_t>(j) * k;
    T norm = 0;
    for (int i = lane; i < k; i += 32) norm += wj[i] * wj[i];
    norm = sqrt(warp_sum(norm));
    if (lane == 0) S[b * k + j] = norm;
    const T inv = norm > T(0) ? T(1) / norm : T(0);
    for (int i = lane; i < k; i += 32) {
      U[b * kk2 + static_cast<size_t>(i) * k + j] = wj[i] * inv;
      V[b * kk2 + static_cast<size_t>(i) * k + j] = Vc[static_cast<size_t>(j) * k + i];
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_jacobi_svd(const T* M, T* work, T* U, T* S, T* V, int batch, int k, int max_sweeps, T tol,
                              cudaStream_t stream) {
  if (batch == 0 || k == 0) return cudaSuccess;
  jacobi_svd_kernel<T><<<batch, kWarps * 32, 0, stream>>>(M, work, U, S, V, k, max_sweeps, tol);
  return cudaGetLastError();
}

template cudaError_t launch_jacobi_svd<float>(const float*, float*, float*, float*, float*, int, int, int, float,
                                              cudaStream_t);
template cudaError_t launch_jacobi_svd<double>(const double*, double*, double*, double*, double*, int, int, int,
                                               double, cudaStream_t);
