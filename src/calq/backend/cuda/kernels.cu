#include "calq/backend/cuda/kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace calq::backend::cuda {

namespace {

constexpr int kTile = 32;

__global__ void add_upper_f32_to_f64(const float* tmp, double* sum, int64_t n) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (i < n && j < n && j >= i) sum[i * n + j] += static_cast<double>(tmp[i * n + j]);
}

__global__ void reverse(const double* a, double* b, int64_t n) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (i < n && j < n) b[i * n + j] = a[(n - 1 - i) * n + (n - 1 - j)];
}

__global__ void add_diagonal(double* a, int64_t n, double lambda) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) a[i * n + i] += lambda;
}

__global__ void reversed_lower_to_upper(const double* b, double* u, int64_t n) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (i < n && j < n) u[i * n + j] = j >= i ? b[(n - 1 - i) + (n - 1 - j) * n] : 0.0;
}

__global__ void gather_rows_f32(const float* x, const int64_t* idx, const float* w, float* dst, int64_t n) {
  const int64_t i = blockIdx.x;
  const float* src = x + idx[i] * n;
  float* d = dst + i * n;
  if (w) {
    const float wi = w[i];
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) d[j] = src[j] * wi;
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) d[j] = src[j];
  }
}

__global__ void gather_rows_bf16(const float* x, const int64_t* idx, const float* w, __nv_bfloat16* dst, int64_t n) {
  const int64_t i = blockIdx.x;
  const float* src = x + idx[i] * n;
  __nv_bfloat16* d = dst + i * n;
  const float wi = w ? w[i] : 1.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) d[j] = __float2bfloat16_rn(w ? src[j] * wi : src[j]);
}

__global__ void mirror_upper(double* a, int64_t n) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (i < n && j < n && j > i) a[j * n + i] = a[i * n + j];
}

__global__ void scale_count_nonfinite(double* a, int64_t n, double s, unsigned int* nonfinite) {
  unsigned int bad = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = a[i] * s;
    a[i] = v;
    bad += isfinite(v) ? 0u : 1u;
  }
  if (bad) atomicAdd(nonfinite, bad);
}

constexpr int kSumBlocks = 1024, kSumThreads = 256;

__global__ void power_sums(const float* x, const int64_t* idx, int64_t count, int64_t n, double* partial) {
  __shared__ double red[4][kSumThreads];
  double a1 = 0, a2 = 0, a3 = 0, a4 = 0;
  const int64_t total = count * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = x[idx[e / n] * n + e % n], v2 = v * v;
    a1 += v;
    a2 += v2;
    a3 += v2 * v;
    a4 += v2 * v2;
  }
  red[0][threadIdx.x] = a1;
  red[1][threadIdx.x] = a2;
  red[2][threadIdx.x] = a3;
  red[3][threadIdx.x] = a4;
  __syncthreads();
  for (int s = kSumThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s)
      for (int p = 0; p < 4; ++p) red[p][threadIdx.x] += red[p][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x < 4) partial[blockIdx.x * 4 + threadIdx.x] = red[threadIdx.x][0];
}

dim3 grid2d(int64_t n) {
  const unsigned t = static_cast<unsigned>((n + kTile - 1) / kTile);
  return dim3(t, t);
}

}  // namespace

void launch_gather_rows_f32(const float* x, const int64_t* idx, const float* w, float* dst, int64_t count, int64_t n,
                            cudaStream_t stream) {
  if (count > 0) gather_rows_f32<<<static_cast<unsigned>(count), 256, 0, stream>>>(x, idx, w, dst, n);
}

void launch_gather_rows_bf16(const float* x, const int64_t* idx, const float* w, uint16_t* dst, int64_t count,
                             int64_t n, cudaStream_t stream) {
  if (count > 0)
    gather_rows_bf16<<<static_cast<unsigned>(count), 256, 0, stream>>>(x, idx, w,
                                                                       reinterpret_cast<__nv_bfloat16*>(dst), n);
}

void launch_mirror_upper(double* a, int64_t n, cudaStream_t stream) {
  mirror_upper<<<grid2d(n), dim3(kTile, kTile), 0, stream>>>(a, n);
}

void launch_scale_count_nonfinite(double* a, int64_t n, double s, unsigned int* nonfinite, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535 * 8);
  scale_count_nonfinite<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a, n, s, nonfinite);
}

int power_sum_blocks() { return kSumBlocks; }

void launch_power_sums(const float* x, const int64_t* idx, int64_t count, int64_t n, double* partial,
                       cudaStream_t stream) {
  power_sums<<<kSumBlocks, kSumThreads, 0, stream>>>(x, idx, count, n, partial);
}

void launch_add_upper_f32_to_f64(const float* tmp, double* sum, int64_t n, cudaStream_t stream) {
  add_upper_f32_to_f64<<<grid2d(n), dim3(kTile, kTile), 0, stream>>>(tmp, sum, n);
}

void launch_reverse(const double* a, double* b, int64_t n, cudaStream_t stream) {
  reverse<<<grid2d(n), dim3(kTile, kTile), 0, stream>>>(a, b, n);
}

void launch_add_diagonal(double* a, int64_t n, double lambda, cudaStream_t stream) {
  add_diagonal<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a, n, lambda);
}

void launch_reversed_lower_to_upper(const double* b, double* u, int64_t n, cudaStream_t stream) {
  reversed_lower_to_upper<<<grid2d(n), dim3(kTile, kTile), 0, stream>>>(b, u, n);
}

namespace {
__global__ void never_runs() {}
}  // namespace

void launch_invalid_for_test(cudaStream_t stream) { never_runs<<<1, 4096, 0, stream>>>(); }

}  // namespace calq::backend::cuda
