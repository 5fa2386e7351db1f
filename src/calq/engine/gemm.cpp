#include "calq/engine/gemm.h"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "calq/core/error.h"

namespace calq::engine {

namespace {

// ---------------------------------------------------------------------------------------------
// Blocking (the GotoBLAS / BLIS scheme). For each block of kKc terms of K:
//   - A's rows [M, kc] are packed into slivers of MR rows, k-major (MR values per k): the panel the
//     micro-kernel broadcasts from, shared by all threads (it stays in L2/L3);
//   - each thread takes column blocks of B ([kc, nb], nb <= kNbMax) and packs them into slivers of
//     NR columns, k-major (NR values per k; bf16 widened here), a block that stays in its L2;
//   - the micro-kernel multiplies one A sliver (MR × kc, in L1 while it sweeps the block's B
//     slivers) by one B sliver into an MR × NR tile of C held in registers, then adds it to C.
constexpr int64_t kKc = 512;
constexpr int64_t kNbMax = 384;

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

// A grow-only, 64-byte aligned scratch buffer per thread: the products of one forward pass reuse
// it instead of allocating (and page-faulting) tens of MB per call.
float* scratch(std::unique_ptr<float[], AlignedFree>& buf, size_t& cap, size_t n) {
  if (n > cap) {
    const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    buf.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    CALQ_CHECK(buf != nullptr, "gemm: cannot allocate {} bytes of packing buffer", bytes);
    cap = n;
  }
  return buf.get();
}

struct Scratch {
  std::unique_ptr<float[], AlignedFree> a, b;
  size_t a_cap = 0, b_cap = 0;
};
thread_local Scratch tls;

inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A[m0 .. m0+MR, k0 .. k0+kc] -> dst[k * MR + r]; rows past M are zero.
template <int MR>
void pack_a(const float* A, int64_t lda, int64_t M, int64_t m0, int64_t k0, int64_t kc, float* dst) {
  const int64_t rows = std::min<int64_t>(MR, M - m0);
  const float* src = A + m0 * lda + k0;
  if (rows == MR) {
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < MR; ++r) dst[k * MR + r] = src[r * lda + k];
    return;
  }
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t r = 0; r < MR; ++r) dst[k * MR + r] = r < rows ? src[r * lda + k] : 0.0f;
}

// Columns [n0, n0 + ncols) of op(B), terms [k0, k0 + kc), into slivers of NR columns:
// dst[j * NR * kc + k * NR + c]; columns past ncols are zero.
template <int NR, typename T>
void pack_b(const T* B, int64_t ldb, GemmB layout, int64_t n0, int64_t ncols, int64_t k0, int64_t kc, float* dst) {
  auto cvt = [](T v) {
    if constexpr (std::is_same_v<T, float>)
      return v;
    else
      return bf16_bits_to_f32(v);
  };
  for (int64_t j0 = 0; j0 < ncols; j0 += NR) {
    const int64_t cols = std::min<int64_t>(NR, ncols - j0);
    float* d = dst + (j0 / NR) * NR * kc;
    if (layout == GemmB::Trans) {
      // B row n holds column n of op(B): contiguous in k. Four rows at a time, so that each pass
      // writes whole 16-byte pieces of the k-major sliver.
      int64_t c = 0;
      for (; c + 4 <= cols; c += 4) {
        const T* s0 = B + (n0 + j0 + c) * ldb + k0;
        const T* s1 = s0 + ldb;
        const T* s2 = s1 + ldb;
        const T* s3 = s2 + ldb;
        for (int64_t k = 0; k < kc; ++k) {
          float* o = d + k * NR + c;
          o[0] = cvt(s0[k]);
          o[1] = cvt(s1[k]);
          o[2] = cvt(s2[k]);
          o[3] = cvt(s3[k]);
        }
      }
      for (; c < cols; ++c) {
        const T* s = B + (n0 + j0 + c) * ldb + k0;
        for (int64_t k = 0; k < kc; ++k) d[k * NR + c] = cvt(s[k]);
      }
      if (cols < NR)
        for (int64_t k = 0; k < kc; ++k) std::fill(d + k * NR + cols, d + (k + 1) * NR, 0.0f);
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const T* s = B + (k0 + k) * ldb + n0 + j0;
        float* o = d + k * NR;
        for (int64_t c = 0; c < cols; ++c) o[c] = cvt(s[c]);
        for (int64_t c = cols; c < NR; ++c) o[c] = 0.0f;
      }
    }
  }
}

// Adds a finished tile (alpha · the products, already in `t`, row-major MR × NR) into C:
// first K block: C = t + beta · C (C not read when beta is 0); later blocks: C = t + C.
template <int MR, int NR>
void merge_tile(const float* t, float* C, int64_t ldc, int mr, int nr, float beta, bool first) {
  for (int r = 0; r < mr; ++r) {
    float* c = C + r * ldc;
    const float* s = t + r * NR;
    if (!first)
      for (int j = 0; j < nr; ++j) c[j] = s[j] + c[j];
    else if (beta == 0.0f)
      for (int j = 0; j < nr; ++j) c[j] = s[j];
    else
      for (int j = 0; j < nr; ++j) c[j] = s[j] + beta * c[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels: acc[MR × NR] = sum_k a[k * MR + r] · b[k * NR + c], one FMA per term in k order,
// then C merged as merge_tile describes (full tiles directly, edge tiles through merge_tile).

__attribute__((target("avx512f"))) void kernel_avx512(int64_t kc, const float* a, const float* b, float* C,
                                                      int64_t ldc, int mr, int nr, float alpha, float beta,
                                                      bool first) {
  constexpr int MR = 12, NR = 32;
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
    a += MR;
    b += NR;
  }
  const __m512 va = _mm512_set1_ps(alpha);
  if (mr == MR && nr == NR) {
    const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc;
      __m512 v0 = _mm512_mul_ps(va, acc0[r]), v1 = _mm512_mul_ps(va, acc1[r]);
      if (!first) {
        v0 = _mm512_add_ps(v0, _mm512_loadu_ps(c));
        v1 = _mm512_add_ps(v1, _mm512_loadu_ps(c + 16));
      } else if (beta != 0.0f) {
        v0 = _mm512_add_ps(v0, _mm512_mul_ps(vb, _mm512_loadu_ps(c)));
        v1 = _mm512_add_ps(v1, _mm512_mul_ps(vb, _mm512_loadu_ps(c + 16)));
      }
      _mm512_storeu_ps(c, v0);
      _mm512_storeu_ps(c + 16, v1);
    }
    return;
  }
  alignas(64) float t[MR * NR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_store_ps(t + r * NR, _mm512_mul_ps(va, acc0[r]));
    _mm512_store_ps(t + r * NR + 16, _mm512_mul_ps(va, acc1[r]));
  }
  merge_tile<MR, NR>(t, C, ldc, mr, nr, beta, first);
}

__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t kc, const float* a, const float* b, float* C,
                                                     int64_t ldc, int mr, int nr, float alpha, float beta,
                                                     bool first) {
  constexpr int MR = 6, NR = 16;
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
    a += MR;
    b += NR;
  }
  const __m256 va = _mm256_set1_ps(alpha);
  if (mr == MR && nr == NR) {
    const __m256 vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc;
      __m256 v0 = _mm256_mul_ps(va, acc0[r]), v1 = _mm256_mul_ps(va, acc1[r]);
      if (!first) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c + 8));
      } else if (beta != 0.0f) {
        v0 = _mm256_add_ps(v0, _mm256_mul_ps(vb, _mm256_loadu_ps(c)));
        v1 = _mm256_add_ps(v1, _mm256_mul_ps(vb, _mm256_loadu_ps(c + 8)));
      }
      _mm256_storeu_ps(c, v0);
      _mm256_storeu_ps(c + 8, v1);
    }
    return;
  }
  alignas(32) float t[MR * NR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(t + r * NR, _mm256_mul_ps(va, acc0[r]));
    _mm256_store_ps(t + r * NR + 8, _mm256_mul_ps(va, acc1[r]));
  }
  merge_tile<MR, NR>(t, C, ldc, mr, nr, beta, first);
}

using KernelFn = void (*)(int64_t, const float*, const float*, float*, int64_t, int, int, float, float, bool);

// prepacked: B already in the sliver layout of the whole matrix (PackedB), else packed here.
template <int MR, int NR>
void run_blocked(const GemmArgs& g, KernelFn kernel, const float* prepacked) {
  const int64_t M = g.M, N = g.N, K = g.K;
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const int64_t mslivers = (M + MR - 1) / MR;
  const int64_t npad = (N + NR - 1) / NR * NR;
  // Column blocks of at most kNbMax, and at least two per thread where N allows (a thread that
  // is descheduled for a while then costs less); rows are split too when N has too few columns.
  int64_t nb = std::min<int64_t>(kNbMax, ((N + 2 * threads - 1) / (2 * threads) + NR - 1) / NR * NR);
  nb = std::max<int64_t>(nb, NR);
  const int64_t nblocks = (N + nb - 1) / nb;
  int64_t mparts = 1;
  if (nblocks < 2 * threads) mparts = std::min<int64_t>(mslivers, (2 * threads + nblocks - 1) / nblocks);
  const int64_t slivers_per_part = (mslivers + mparts - 1) / mparts;
  const int64_t tasks = nblocks * mparts;
  const int64_t kc_max = std::min(K, kKc);
  float* ap = scratch(tls.a, tls.a_cap, static_cast<size_t>(mslivers * MR * kc_max));
  const bool bf16 = g.b_bf16;

#pragma omp parallel num_threads(threads)
  {
    float* bp = prepacked ? nullptr : scratch(tls.b, tls.b_cap, static_cast<size_t>(nb * kc_max));
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
#pragma omp for schedule(static)
      for (int64_t s = 0; s < mslivers; ++s) pack_a<MR>(g.A, g.lda, M, s * MR, k0, kc, ap + s * MR * kc);
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t jb = t / mparts, part = t % mparts;
        const int64_t n0 = jb * nb, ncols = std::min(nb, N - n0);
        const int64_t s0 = part * slivers_per_part, s1 = std::min(mslivers, s0 + slivers_per_part);
        if (s0 >= s1) continue;
        const float* bl = bp;
        if (prepacked)
          bl = prepacked + k0 * npad + n0 * kc;
        else if (bf16)
          pack_b<NR>(static_cast<const uint16_t*>(g.B), g.ldb, g.b_layout, n0, ncols, k0, kc, bp);
        else
          pack_b<NR>(static_cast<const float*>(g.B), g.ldb, g.b_layout, n0, ncols, k0, kc, bp);
        for (int64_t s = s0; s < s1; ++s) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, M - s * MR));
          for (int64_t j0 = 0; j0 < ncols; j0 += NR) {
            const int nr = static_cast<int>(std::min<int64_t>(NR, ncols - j0));
            kernel(kc, ap + s * MR * kc, bl + (j0 / NR) * NR * kc, g.C + s * MR * g.ldc + n0 + j0, g.ldc, mr, nr,
                   g.alpha, g.beta, k0 == 0);
          }
        }
      }
    }
  }
}

void run_blas(const GemmArgs& g) {
  const float* B = static_cast<const float*>(g.B);
  std::vector<float> wide;
  int64_t ldb = g.ldb;
  if (g.b_bf16) {
    // op(B) rows/columns widened into a dense temporary.
    const int64_t rows = g.b_layout == GemmB::Trans ? g.N : g.K, cols = g.b_layout == GemmB::Trans ? g.K : g.N;
    wide.resize(static_cast<size_t>(rows * cols));
    const auto* src = static_cast<const uint16_t*>(g.B);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) wide[r * cols + c] = bf16_bits_to_f32(src[r * g.ldb + c]);
    B = wide.data();
    ldb = cols;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, g.b_layout == GemmB::Trans ? CblasTrans : CblasNoTrans,
              static_cast<int>(g.M), static_cast<int>(g.N), static_cast<int>(g.K), g.alpha, g.A,
              static_cast<int>(g.lda), B, static_cast<int>(ldb), g.beta, g.C, static_cast<int>(g.ldc));
}

GemmKernel best_supported() {
  if (gemm_kernel_supported(GemmKernel::Avx512)) return GemmKernel::Avx512;
  if (gemm_kernel_supported(GemmKernel::Avx2)) return GemmKernel::Avx2;
  return GemmKernel::Blas;
}

GemmKernel parse_kernel(const std::string& s) {
  if (s == "blas") return GemmKernel::Blas;
  if (s == "avx2") return GemmKernel::Avx2;
  if (s == "avx512") return GemmKernel::Avx512;
  if (s == "auto" || s.empty()) return GemmKernel::Auto;
  fail("CALQ_GEMM='{}' is not a gemm kernel (auto, blas, avx2, avx512)", s);
}

GemmKernel initial_kernel() {
  const char* e = std::getenv("CALQ_GEMM");
  const GemmKernel k = e ? parse_kernel(e) : GemmKernel::Auto;
  if (k == GemmKernel::Auto) return best_supported();
  CALQ_CHECK(gemm_kernel_supported(k), "CALQ_GEMM={}: this CPU cannot run the {} kernel", e,
             gemm_kernel_name(k));
  return k;
}

std::atomic<GemmKernel>& active() {
  static std::atomic<GemmKernel> k{initial_kernel()};
  return k;
}

}  // namespace

void set_num_threads(int n) {
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

void PackedB::Free::operator()(float* p) const { std::free(p); }

PackedB PackedB::pack(const void* W, bool bf16, int64_t N, int64_t K, int64_t ldw, GemmKernel k) {
  CALQ_CHECK(N > 0 && K > 0, "gemm: cannot pack an empty weight ({} x {})", N, K);
  if (k == GemmKernel::Auto) k = gemm_kernel();
  CALQ_CHECK(gemm_kernel_supported(k), "gemm: this CPU cannot run the {} kernel", gemm_kernel_name(k));
  PackedB p;
  p.n_ = N;
  p.k_ = K;
  p.kernel_ = k;
  const int NR = k == GemmKernel::Avx512 ? 32 : k == GemmKernel::Avx2 ? 16 : 1;
  const int64_t npad = (N + NR - 1) / NR * NR;
  p.size_ = static_cast<size_t>(npad * K);
  const size_t bytes = ((p.size_ * sizeof(float) + 63) / 64) * 64;
  p.data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
  CALQ_CHECK(p.data_ != nullptr, "gemm: cannot allocate {} bytes for a packed {} x {} weight", bytes, N, K);
  float* d = p.data_.get();
  if (NR == 1) {  // OpenBLAS: the fp32 matrix itself
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      if (bf16)
        for (int64_t c = 0; c < K; ++c) d[n * K + c] = bf16_bits_to_f32(static_cast<const uint16_t*>(W)[n * ldw + c]);
      else
        std::memcpy(d + n * K, static_cast<const float*>(W) + n * ldw, static_cast<size_t>(K) * sizeof(float));
    }
    return p;
  }
  // The layout run_blocked reads: K blocks of kKc, each [npad / NR slivers][kc][NR].
  constexpr int64_t kSliversPerTask = 8;
  const int64_t kblocks = (K + kKc - 1) / kKc, ntasks = (npad / NR + kSliversPerTask - 1) / kSliversPerTask;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t kb = 0; kb < kblocks; ++kb)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t k0 = kb * kKc, kc = std::min(kKc, K - k0);
      const int64_t n0 = t * kSliversPerTask * NR, ncols = std::min(kSliversPerTask * NR, N - n0);
      if (ncols <= 0) continue;
      float* dst = d + k0 * npad + n0 * kc;
      if (NR == 32) {
        if (bf16)
          pack_b<32>(static_cast<const uint16_t*>(W), ldw, GemmB::Trans, n0, ncols, k0, kc, dst);
        else
          pack_b<32>(static_cast<const float*>(W), ldw, GemmB::Trans, n0, ncols, k0, kc, dst);
      } else {
        if (bf16)
          pack_b<16>(static_cast<const uint16_t*>(W), ldw, GemmB::Trans, n0, ncols, k0, kc, dst);
        else
          pack_b<16>(static_cast<const float*>(W), ldw, GemmB::Trans, n0, ncols, k0, kc, dst);
      }
    }
  return p;
}

void gemm_packed(const float* X, int64_t M, int64_t ldx, const PackedB& W, float* Y, int64_t ldy) {
  if (M == 0) return;
  GemmArgs g;
  g.M = M;
  g.N = W.n_;
  g.K = W.k_;
  g.A = X;
  g.lda = ldx;
  g.B = W.data_.get();
  g.ldb = W.k_;
  g.C = Y;
  g.ldc = ldy;
  switch (W.kernel_) {
    case GemmKernel::Avx512: run_blocked<12, 32>(g, kernel_avx512, W.data_.get()); break;
    case GemmKernel::Avx2: run_blocked<6, 16>(g, kernel_avx2, W.data_.get()); break;
    default: run_blas(g); break;
  }
}

std::string_view gemm_kernel_name(GemmKernel k) {
  switch (k) {
    case GemmKernel::Auto: return "auto";
    case GemmKernel::Blas: return "blas";
    case GemmKernel::Avx2: return "avx2";
    case GemmKernel::Avx512: return "avx512";
  }
  return "?";
}

bool gemm_kernel_supported(GemmKernel k) {
  switch (k) {
    case GemmKernel::Auto:
    case GemmKernel::Blas: return true;
    // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
    case GemmKernel::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case GemmKernel::Avx512: return __builtin_cpu_supports("avx512f");
  }
  return false;
}

GemmKernel gemm_kernel() { return active().load(std::memory_order_relaxed); }

void set_gemm_kernel(GemmKernel k) {
  if (k == GemmKernel::Auto) k = best_supported();
  CALQ_CHECK(gemm_kernel_supported(k), "gemm: this CPU cannot run the {} kernel", gemm_kernel_name(k));
  active().store(k, std::memory_order_relaxed);
}

void gemm(const GemmArgs& g) { gemm(g, gemm_kernel()); }

void gemm(const GemmArgs& g, GemmKernel k) {
  CALQ_CHECK(g.M >= 0 && g.N >= 0 && g.K >= 0, "gemm: negative shape {} x {} x {}", g.M, g.N, g.K);
  if (g.M == 0 || g.N == 0) return;
  if (g.K == 0) {  // C = beta · C
    for (int64_t r = 0; r < g.M; ++r)
      for (int64_t c = 0; c < g.N; ++c) g.C[r * g.ldc + c] = g.beta == 0.0f ? 0.0f : g.beta * g.C[r * g.ldc + c];
    return;
  }
  if (k == GemmKernel::Auto) k = gemm_kernel();
  CALQ_CHECK(gemm_kernel_supported(k), "gemm: this CPU cannot run the {} kernel", gemm_kernel_name(k));
  switch (k) {
    case GemmKernel::Avx512: run_blocked<12, 32>(g, kernel_avx512, nullptr); break;
    case GemmKernel::Avx2: run_blocked<6, 16>(g, kernel_avx2, nullptr); break;
    default: run_blas(g); break;
  }
}

}  // namespace calq::engine
