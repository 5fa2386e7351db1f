// Single-precision matrix product for the CPU engine, with its own register-blocked kernels:
//
//   C[M, N] = alpha · A[M, K] · op(B) + beta · C
//
// A is row-major fp32 (the activations). B is either "transposed" ([N, K] row-major: a linear
// module's weight [out, in], or the keys of attention) or "normal" ([K, N] row-major: the values
// of attention), in fp32 or bf16; a bf16 B is widened to fp32 while it is packed, so the product
// of bf16 weights never needs an fp32 copy of them. Every product and sum is an fp32 FMA, the K
// terms of one element summed in order within blocks of 512 (then block by block), so the
// result is as exact as a BLAS sgemm's (tests/unit/gemm_test.cpp checks every kernel against a
// float64 triple loop).
//
// The kernel is chosen at run time from what the CPU supports (never from compile flags):
// AVX-512F (12×32 tiles), AVX2+FMA (6×16 tiles), else OpenBLAS's cblas_sgemm (fp32 B only; a bf16
// B is then widened into a temporary). CALQ_GEMM=blas|avx2|avx512 in the environment, or
// set_gemm_kernel, forces one (an unsupported choice is an error). docs/engine.md has the design.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

namespace calq::engine {

enum class GemmKernel { Auto, Blas, Avx2, Avx512 };

std::string_view gemm_kernel_name(GemmKernel k);
// Whether this CPU (and OS) can run kernel k (Auto and Blas: always).
bool gemm_kernel_supported(GemmKernel k);
// The kernel gemm() uses now: the forced one, or the best supported.
GemmKernel gemm_kernel();
// Forces a kernel for every later call (Auto: back to the best supported, ignoring CALQ_GEMM).
// Throws calq::Error when the CPU cannot run it.
void set_gemm_kernel(GemmKernel k);

// Sets the calling thread's OpenMP team size and OpenBLAS's thread count together (`--threads`):
// OpenBLAS keeps its own count, taken from the environment when it loads, which
// omp_set_num_threads alone does not change.
void set_num_threads(int n);

enum class GemmB : uint8_t { Trans, Normal };  // B is [N, K] (Trans) or [K, N] (Normal), row-major

struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.0f, beta = 0.0f;  // beta 0: C is only written (it may hold NaN before)
  const float* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  bool b_bf16 = false;  // B holds bf16 (uint16) values instead of fp32
  GemmB b_layout = GemmB::Trans;
  int64_t ldb = 0;
  float* C = nullptr;
  int64_t ldc = 0;
};

// Runs on the calling thread's OpenMP team size (omp_get_max_threads()) when called outside a
// parallel region, on one thread inside one.
void gemm(const GemmArgs& g);
// The same with an explicit kernel (tests, benchmarks).
void gemm(const GemmArgs& g, GemmKernel k);

// A weight W[N, K] (row-major, leading dimension ldw, fp32 or bf16) packed once into the layout
// of one kernel (for the OpenBLAS kernel: a plain fp32 copy), for the products Y = X · Wᵀ that
// reuse it: the engine's cached weights. Same values and sums as gemm() with the same kernel.
class PackedB {
 public:
  static PackedB pack(const void* W, bool bf16, int64_t N, int64_t K, int64_t ldw, GemmKernel k = GemmKernel::Auto);
  int64_t rows() const { return n_; }
  int64_t cols() const { return k_; }
  GemmKernel kernel() const { return kernel_; }
  size_t bytes() const { return size_ * sizeof(float); }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  friend void gemm_packed(const float* X, int64_t M, int64_t ldx, const PackedB& W, float* Y, int64_t ldy);
  int64_t n_ = 0, k_ = 0;
  GemmKernel kernel_ = GemmKernel::Blas;
  std::unique_ptr<float[], Free> data_;
  size_t size_ = 0;
};

// Y[M, N] = X[M, K] · Wᵀ (ldx, ldy: leading dimensions of X and Y), with W's kernel.
void gemm_packed(const float* X, int64_t M, int64_t ldx, const PackedB& W, float* Y, int64_t ldy);

// Y[N, out] = X[N, in] · W[out, in]^T, W fp32 or bf16.
inline void gemm_nt(const float* X, int64_t rows, int64_t in, const void* W, bool w_bf16, int64_t out,
                    float* Y) {
  GemmArgs g;
  g.M = rows;
  g.N = out;
  g.K = in;
  g.A = X;
  g.lda = in;
  g.B = W;
  g.b_bf16 = w_bf16;
  g.ldb = in;
  g.C = Y;
  g.ldc = out;
  gemm(g);
}

}  // namespace calq::engine
