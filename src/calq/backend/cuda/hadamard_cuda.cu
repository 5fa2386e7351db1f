// Block Hadamard rotations on the GPU (backend::cuda_hadamard_rows): the device twin of
// quant::Rotation::apply_rows for power-of-two blocks (src/calq/quant/hadamard.cpp, fwht_t).
//
// One thread block per (row, Hadamard block): the block's values in shared memory, multiplied by
// the signs (before the transform, or after it for the inverse), then log2(b) butterfly stages
// (x[j], x[j+h]) ← (x[j] + x[j+h], x[j] − x[j+h]) with a barrier between stages, then the scale
// fp32(1/√b). Each stage computes the same fp32 sums of the same operands as the CPU loop (the
// order inside a stage does not matter), so the result is bit-identical.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "calq/backend/cuda/memory.h"
#include "calq/backend/device.h"
#include "calq/core/error.h"

namespace calq::backend {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in {}: {} ({})", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

__global__ void fwht_blocks(float* x, const float* signs, int64_t dim, int64_t block, float scale, bool inverse) {
  extern __shared__ float buf[];
  const int64_t row = blockIdx.y, b0 = static_cast<int64_t>(blockIdx.x) * block;
  float* xr = x + row * dim + b0;
  const float* sr = signs + b0;
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) buf[i] = inverse ? xr[i] : xr[i] * sr[i];
  __syncthreads();
  for (int64_t h = 1; h < block; h *= 2) {
    for (int64_t p = threadIdx.x; p < block / 2; p += blockDim.x) {
      const int64_t j = (p / h) * 2 * h + p % h;
      const float a = buf[j], b = buf[j + h];
      buf[j] = a + b;
      buf[j + h] = a - b;
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) {
    const float v = buf[i] * scale;
    xr[i] = inverse ? v * sr[i] : v;
  }
}

class Buf {
 public:
  explicit Buf(size_t bytes) : bytes_(bytes) { check(cuda::tracked_malloc(&p_, bytes), "cudaMalloc(Hadamard)"); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { cuda::tracked_free(p_, bytes_); }
  float* get() const { return static_cast<float*>(p_); }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace

void cuda_hadamard_rows(const quant::Rotation& r, float* x, int64_t rows, bool inverse) {
  cuda_require();
  CALQ_CHECK(r.full.empty(), "Hadamard rotation of order {} (not a power of two) is not implemented on the GPU; use "
             "--device cpu or a power-of-two --hadamard-block", r.dim);
  const int64_t b = r.block;
  CALQ_CHECK(b >= 2 && (b & (b - 1)) == 0 && b <= 8192 && r.dim % b == 0 &&
                 static_cast<int64_t>(r.signs.size()) == r.dim,
             "Hadamard block {} of width {}: the GPU transform takes power-of-two blocks of 2..8192", b, r.dim);
  CALQ_CHECK(rows >= 0 && rows <= 65535, "Hadamard rotation of {} rows on the GPU: at most 65535 rows per call", rows);
  if (rows == 0) return;
  const size_t n = static_cast<size_t>(rows * r.dim);
  Buf dx(n * sizeof(float)), ds(static_cast<size_t>(r.dim) * sizeof(float));
  check(cudaMemcpy(dx.get(), x, n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy(Hadamard rows)");
  check(cudaMemcpy(ds.get(), r.signs.data(), static_cast<size_t>(r.dim) * sizeof(float), cudaMemcpyHostToDevice),
        "cudaMemcpy(Hadamard signs)");
  // The CPU's scale: T(1/√b) with the quotient and the root in double.
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(b)));
  const dim3 grid(static_cast<unsigned>(r.dim / b), static_cast<unsigned>(rows));
  const int threads = static_cast<int>(std::min<int64_t>(b / 2, 256));
  fwht_blocks<<<grid, threads, static_cast<size_t>(b) * sizeof(float)>>>(dx.get(), ds.get(), r.dim, b, scale,
                                                                         inverse);
  check(cudaGetLastError(), "Hadamard kernel");
  check(cudaMemcpy(x, dx.get(), n * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy(Hadamard rows back)");
}

}  // namespace calq::backend
