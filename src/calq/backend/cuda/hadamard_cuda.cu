// Block Hadamard rotations on the GPU (backend::cuda_hadamard_rows, cuda_rotate_hessian): the
// device twins of quant::Rotation::apply_rows and apply_hessian for power-of-two blocks
// (src/calq/quant/hadamard.cpp, fwht_t), in fp32 and fp64.
//
// One thread block per (row, Hadamard block): the block's values in shared memory, multiplied by
// the signs (before the transform, or after it for the inverse), then log2(b) butterfly stages
// (x[j], x[j+h]) ← (x[j] + x[j+h], x[j] − x[j+h]) with a barrier between stages, then the scale
// T(1/√b). Each stage computes the same sums of the same operands as the CPU loop (the
// order inside a stage does not matter), so the result is bit-identical.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "calq/backend/cuda/check.h"
#include "calq/backend/cuda/memory.h"
#include "calq/backend/device.h"
#include "calq/core/error.h"

namespace calq::backend {

namespace {

using cuda::check_cuda;

template <typename T>
__global__ void fwht_blocks(T* x, const T* signs, int64_t dim, int64_t block, T scale, bool inverse) {
  extern __shared__ unsigned char smem[];
  T* buf = reinterpret_cast<T*>(smem);
  const int64_t row = blockIdx.y, b0 = static_cast<int64_t>(blockIdx.x) * block;
  T* xr = x + row * dim + b0;
  const T* sr = signs + b0;
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) buf[i] = inverse ? xr[i] : xr[i] * sr[i];
  __syncthreads();
  for (int64_t h = 1; h < block; h *= 2) {
    for (int64_t p = threadIdx.x; p < block / 2; p += blockDim.x) {
      const int64_t j = (p / h) * 2 * h + p % h;
      const T a = buf[j], b = buf[j + h];
      buf[j] = a + b;
      buf[j + h] = a - b;
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) {
    const T v = buf[i] * scale;
    xr[i] = inverse ? v * sr[i] : v;
  }
}

// b = aᵀ (n × n, row-major), through 32 × 32 shared-memory tiles.
__global__ void transpose_square(const double* a, double* b, int64_t n) {
  __shared__ double tile[32][33];
  const int64_t bx = static_cast<int64_t>(blockIdx.x) * 32, by = static_cast<int64_t>(blockIdx.y) * 32;
  for (int64_t k = threadIdx.y; k < 32; k += blockDim.y) {
    const int64_t r = by + k, c = bx + threadIdx.x;
    if (r < n && c < n) tile[k][threadIdx.x] = a[r * n + c];
  }
  __syncthreads();
  for (int64_t k = threadIdx.y; k < 32; k += blockDim.y) {
    const int64_t r = bx + k, c = by + threadIdx.x;
    if (r < n && c < n) b[r * n + c] = tile[threadIdx.x][k];
  }
}

template <typename T>
class Buf {
 public:
  explicit Buf(size_t count) : bytes_(std::max<size_t>(count * sizeof(T), 1)) {
    check_cuda(cuda::tracked_malloc(&p_, bytes_), "cudaMalloc(Hadamard)");
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { cuda::tracked_free(p_, bytes_); }
  T* get() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// One block lives in shared memory: 32 KiB at most (8192 fp32 or 4096 fp64 values).
template <typename T>
constexpr int64_t kMaxBlock = 32768 / sizeof(T);

// Power-of-two blocks that fit kMaxBlock<T>, dividing the width, with one sign per column.
template <typename T>
bool supported(const quant::Rotation& r) {
  const int64_t b = r.block;
  return r.full.empty() && b >= 2 && (b & (b - 1)) == 0 && b <= kMaxBlock<T> && r.dim % b == 0 &&
         static_cast<int64_t>(r.signs.size()) == r.dim;
}

template <typename T>
void check_rotation(const quant::Rotation& r) {
  CALQ_CHECK(r.full.empty(), "Hadamard rotation of order {} (not a power of two) is not implemented on the GPU; use "
             "--device cpu or a power-of-two --hadamard-block", r.dim);
  CALQ_CHECK(supported<T>(r), "Hadamard block {} of width {}: the GPU transform takes power-of-two blocks of 2..{}",
             r.block, r.dim, kMaxBlock<T>);
}

// x·R (or x·Rᵀ) of the rows of the device matrix dx (rows × r.dim), with device signs ds.
template <typename T>
void rotate_device_rows(const quant::Rotation& r, T* dx, const T* ds, int64_t rows, bool inverse) {
  const int64_t b = r.block;
  // The CPU's scale: T(1/√b) with the quotient and the root in double.
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(b)));
  const int threads = static_cast<int>(std::min<int64_t>(b / 2, 256));
  for (int64_t r0 = 0; r0 < rows; r0 += 65535) {  // grid.y is at most 65535
    const int64_t n = std::min<int64_t>(65535, rows - r0);
    const dim3 grid(static_cast<unsigned>(r.dim / b), static_cast<unsigned>(n));
    fwht_blocks<T><<<grid, threads, static_cast<size_t>(b) * sizeof(T)>>>(dx + r0 * r.dim, ds, r.dim, b, scale,
                                                                           inverse);
    check_cuda(cudaGetLastError(), "Hadamard kernel");
  }
}

template <typename T>
void hadamard_rows(const quant::Rotation& r, T* x, int64_t rows, bool inverse) {
  cuda_require();
  check_rotation<T>(r);
  CALQ_CHECK(rows >= 0, "Hadamard rotation of {} rows", rows);
  if (rows == 0) return;
  const size_t n = static_cast<size_t>(rows * r.dim);
  Buf<T> dx(n), ds(static_cast<size_t>(r.dim));
  const std::vector<T> signs(r.signs.begin(), r.signs.end());
  check_cuda(cudaMemcpy(dx.get(), x, n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy(Hadamard rows)");
  check_cuda(cudaMemcpy(ds.get(), signs.data(), signs.size() * sizeof(T), cudaMemcpyHostToDevice),
        "cudaMemcpy(Hadamard signs)");
  rotate_device_rows<T>(r, dx.get(), ds.get(), rows, inverse);
  check_cuda(cudaMemcpy(x, dx.get(), n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy(Hadamard rows back)");
}

}  // namespace

void cuda_hadamard_rows(const quant::Rotation& r, float* x, int64_t rows, bool inverse) {
  hadamard_rows<float>(r, x, rows, inverse);
}

void cuda_hadamard_rows(const quant::Rotation& r, double* x, int64_t rows, bool inverse) {
  hadamard_rows<double>(r, x, rows, inverse);
}

bool cuda_hadamard_supported(const quant::Rotation& r) { return supported<double>(r); }

void cuda_rotate_hessian(const quant::Rotation& r, std::vector<double>& h) {
  cuda_require();
  check_rotation<double>(r);
  const int64_t n = r.dim;
  CALQ_CHECK(static_cast<int64_t>(h.size()) == n * n, "rotation of width {} applied to a Hessian of {} values", n,
             h.size());
  const size_t count = h.size();
  size_t free_b = 0, total_b = 0;
  check_cuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  const size_t need = 2 * count * sizeof(double) + static_cast<size_t>(n) * sizeof(double);
  CALQ_CHECK(need <= free_b,
             "out of GPU memory: rotating a {}×{} Hessian needs {} bytes, {} are free; use --device cpu or a smaller "
             "model part per run",
             n, n, need, free_b);
  Buf<double> a(count), t(count), ds(static_cast<size_t>(n));
  check_cuda(cudaMemcpy(a.get(), h.data(), count * sizeof(double), cudaMemcpyHostToDevice), "cudaMemcpy(Hessian)");
  const std::vector<double> signs(r.signs.begin(), r.signs.end());
  check_cuda(cudaMemcpy(ds.get(), signs.data(), signs.size() * sizeof(double), cudaMemcpyHostToDevice),
        "cudaMemcpy(Hadamard signs)");
  // RᵀHR as on the CPU (Rotation::apply_hessian): A = H·R by rows, then Rᵀ·A = (Aᵀ·R)ᵀ.
  const dim3 tgrid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>((n + 31) / 32)), tblock(32, 8);
  rotate_device_rows<double>(r, a.get(), ds.get(), n, false);
  transpose_square<<<tgrid, tblock>>>(a.get(), t.get(), n);
  check_cuda(cudaGetLastError(), "transpose kernel");
  rotate_device_rows<double>(r, t.get(), ds.get(), n, false);
  transpose_square<<<tgrid, tblock>>>(t.get(), a.get(), n);
  check_cuda(cudaGetLastError(), "transpose kernel");
  check_cuda(cudaMemcpy(h.data(), a.get(), count * sizeof(double), cudaMemcpyDeviceToHost), "cudaMemcpy(Hessian back)");
}

}  // namespace calq::backend
