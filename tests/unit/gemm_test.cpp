// calq's gemm (src/calq/engine/gemm.h) against a float64 triple loop, for every kernel this CPU
// can run (the OpenBLAS fallback always): random and adversarial shapes (1×1×1, odd sizes, sizes
// just past the tile and block sizes, k = 1, long k), both B layouts, fp32 and bf16 B, strides
// larger than the rows, alpha/beta, C holding NaN when beta is 0, and calls from inside a
// parallel region.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/engine/gemm.h"

using namespace calq;
using engine::GemmArgs;
using engine::GemmB;
using engine::GemmKernel;

namespace {

struct Shape {
  int64_t M, N, K;
};

// Tiles are 12×32 (AVX-512) and 6×16 (AVX2), K blocks 512, column blocks up to 384.
const Shape kShapes[] = {
    {1, 1, 1},    {1, 1, 7},      {1, 37, 5},     {5, 1, 9},     {2, 3, 1},      {13, 33, 1},   {12, 32, 512},
    {6, 16, 16},  {7, 17, 513},   {11, 31, 511},  {25, 65, 1026}, {24, 64, 1024}, {97, 50, 3},   {3, 700, 384},
    {1, 800, 40}, {130, 390, 77}, {500, 3, 64},   {64, 130, 64}, {2, 2, 2500},   {37, 45, 1153}};

std::vector<GemmKernel> kernels() {
  std::vector<GemmKernel> ks;
  for (GemmKernel k : {GemmKernel::Blas, GemmKernel::Avx2, GemmKernel::Avx512})
    if (engine::gemm_kernel_supported(k)) ks.push_back(k);
  return ks;
}

struct Problem {
  Shape s;
  GemmB layout = GemmB::Trans;
  bool bf16 = false;
  float alpha = 1.0f, beta = 0.0f;
  int64_t pad = 0;  // extra elements at the end of every row of A, B and C
  std::vector<float> A, B, C0;
  std::vector<uint16_t> Bh;
  int64_t lda = 0, ldb = 0, ldc = 0;

  // Values: integers in [-4, 4] (every product and partial sum is exact in fp32, so any kernel
  // must equal the reference bit for bit) or normal floats.
  void fill(std::mt19937& rng, bool integers) {
    lda = s.K + pad;
    const int64_t brows = layout == GemmB::Trans ? s.N : s.K, bcols = layout == GemmB::Trans ? s.K : s.N;
    ldb = bcols + pad;
    ldc = s.N + pad;
    std::uniform_int_distribution<int> di(-4, 4);
    std::normal_distribution<float> dn(0.0f, 1.0f);
    auto draw = [&] { return integers ? static_cast<float>(di(rng)) : dn(rng); };
    A.resize(static_cast<size_t>(s.M * lda));
    B.resize(static_cast<size_t>(brows * ldb));
    C0.resize(static_cast<size_t>(s.M * ldc));
    for (auto& x : A) x = draw();
    for (auto& x : B) x = draw();
    if (bf16) {  // B as bf16; the reference uses the same (exactly representable) values
      Bh.resize(B.size());
      for (size_t i = 0; i < B.size(); ++i) {
        Bh[i] = f32_to_bf16(B[i]);
        B[i] = bf16_to_f32(Bh[i]);
      }
    }
    for (auto& x : C0) x = beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : draw();
  }
  double b(int64_t k, int64_t n) const {
    return layout == GemmB::Trans ? B[static_cast<size_t>(n * ldb + k)] : B[static_cast<size_t>(k * ldb + n)];
  }
  std::vector<float> run(GemmKernel k) const {
    std::vector<float> C = C0;
    GemmArgs g;
    g.M = s.M;
    g.N = s.N;
    g.K = s.K;
    g.alpha = alpha;
    g.beta = beta;
    g.A = A.data();
    g.lda = lda;
    g.B = bf16 ? static_cast<const void*>(Bh.data()) : B.data();
    g.b_bf16 = bf16;
    g.b_layout = layout;
    g.ldb = ldb;
    g.C = C.data();
    g.ldc = ldc;
    engine::gemm(g, k);
    return C;
  }
  // Checks C against the float64 reference: exactly for integer data, else within the fp32
  // summation bound (K + 2) · 2^-24 · (alpha · sum |a b| + |beta c|). Padding must be untouched.
  void check(const std::vector<float>& C, bool exact, const std::string& what) const {
    const double u = std::ldexp(1.0, -24);
    int bad = 0;
    for (int64_t i = 0; i < s.M; ++i)
      for (int64_t j = 0; j < s.N; ++j) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < s.K; ++k) {
          const double p = static_cast<double>(A[static_cast<size_t>(i * lda + k)]) * b(k, j);
          ref += p;
          mag += std::fabs(p);
        }
        ref *= alpha;
        mag *= std::fabs(alpha);
        if (beta != 0.0f) {
          const double c0 = C0[static_cast<size_t>(i * ldc + j)];
          ref += beta * c0;
          mag += std::fabs(beta * c0);
        }
        const double got = C[static_cast<size_t>(i * ldc + j)];
        const double tol = exact ? 0.0 : (static_cast<double>(s.K) + 2) * u * mag + 1e-30;
        if (!(std::fabs(got - ref) <= tol) && bad++ < 5)
          ADD_FAILURE() << what << ": C[" << i << "," << j << "] = " << got << ", reference " << ref << " (tol " << tol
                        << ")";
        for (int64_t p = s.N; p < ldc && j == 0; ++p) {
          const float c = C[static_cast<size_t>(i * ldc + p)], c0 = C0[static_cast<size_t>(i * ldc + p)];
          if (!(c == c0 || (std::isnan(c) && std::isnan(c0))) && bad++ < 5)
            ADD_FAILURE() << what << ": padding C[" << i << "," << p << "] was written";
        }
      }
  }
};

std::string describe(GemmKernel k, const Problem& p, bool integers) {
  return std::string(engine::gemm_kernel_name(k)) + " " + std::to_string(p.s.M) + "x" + std::to_string(p.s.N) + "x" +
         std::to_string(p.s.K) + (p.layout == GemmB::Trans ? " NT" : " NN") + (p.bf16 ? " bf16" : " f32") +
         " alpha " + std::to_string(p.alpha) + " beta " + std::to_string(p.beta) + " pad " + std::to_string(p.pad) +
         (integers ? " integers" : " normal");
}

void check_all(GemmKernel k, bool integers) {
  std::mt19937 rng(7);
  int variant = 0;
  for (const Shape& s : kShapes)
    for (GemmB layout : {GemmB::Trans, GemmB::Normal})
      for (bool bf16 : {false, true}) {
        Problem p;
        p.s = s;
        p.layout = layout;
        p.bf16 = bf16;
        // Cycle through alpha/beta/stride variants so every shape sees several.
        switch (variant++ % 4) {
          case 0: break;
          case 1: p.pad = 3; break;
          case 2: p.alpha = 0.5f; p.beta = 1.0f; break;
          case 3: p.alpha = -2.0f; p.beta = 0.25f; p.pad = 17; break;
        }
        p.fill(rng, integers);
        p.check(p.run(k), integers, describe(k, p, integers));
      }
}

}  // namespace

TEST(Gemm, ExactOnIntegerDataEveryKernel) {
  for (GemmKernel k : kernels()) check_all(k, true);
}

TEST(Gemm, WithinTheFp32BoundOnRandomDataEveryKernel) {
  for (GemmKernel k : kernels()) check_all(k, false);
}

TEST(Gemm, RandomShapesEveryKernel) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int64_t> dm(1, 300), dk(1, 900);
  for (GemmKernel k : kernels())
    for (int it = 0; it < 12; ++it) {
      Problem p;
      p.s = {dm(rng), dm(rng), dk(rng)};
      p.layout = it % 2 ? GemmB::Normal : GemmB::Trans;
      p.bf16 = it % 3 == 0;
      p.pad = it % 5;
      p.fill(rng, false);
      p.check(p.run(k), false, describe(k, p, false));
    }
}

TEST(Gemm, InsideAParallelRegionEveryThreadComputesItsOwnProduct) {
  for (GemmKernel k : kernels()) {
    const int n = 4;
    std::vector<Problem> ps(n);
    std::mt19937 rng(3);
    for (int i = 0; i < n; ++i) {
      ps[i].s = {40 + i, 70 + 3 * i, 400 + i};
      ps[i].fill(rng, true);
    }
    std::vector<std::vector<float>> out(n);
#pragma omp parallel for num_threads(2) schedule(static, 1)
    for (int i = 0; i < n; ++i) out[i] = ps[i].run(k);
    for (int i = 0; i < n; ++i) ps[i].check(out[i], true, describe(k, ps[i], true) + " (in a parallel region)");
  }
}

TEST(Gemm, ZeroSizesAndK0) {
  for (GemmKernel k : kernels()) {
    std::vector<float> A(4, 1.0f), B(4, 1.0f), C(6, 3.0f);
    GemmArgs g;
    g.M = 2;
    g.N = 3;
    g.K = 0;
    g.A = A.data();
    g.lda = 1;
    g.B = B.data();
    g.ldb = 1;
    g.C = C.data();
    g.ldc = 3;
    g.beta = 0.5f;
    engine::gemm(g, k);
    for (float c : C) EXPECT_EQ(c, 1.5f);
    g.beta = 0.0f;
    engine::gemm(g, k);
    for (float c : C) EXPECT_EQ(c, 0.0f);
    g.M = 0;
    g.K = 2;
    engine::gemm(g, k);  // nothing to do, nothing read
  }
}

TEST(Gemm, KernelSelection) {
  EXPECT_TRUE(engine::gemm_kernel_supported(GemmKernel::Blas));
  const GemmKernel before = engine::gemm_kernel();
  EXPECT_TRUE(engine::gemm_kernel_supported(before));
  engine::set_gemm_kernel(GemmKernel::Blas);
  EXPECT_EQ(engine::gemm_kernel(), GemmKernel::Blas);
  for (GemmKernel k : {GemmKernel::Avx2, GemmKernel::Avx512})
    if (!engine::gemm_kernel_supported(k)) EXPECT_THROW(engine::set_gemm_kernel(k), Error);
  engine::set_gemm_kernel(GemmKernel::Auto);
  EXPECT_NE(engine::gemm_kernel(), GemmKernel::Auto);
  engine::set_gemm_kernel(before);
}

TEST(Gemm, PackedWeightsEqualGemmEveryKernel) {
  std::mt19937 rng(5);
  const Shape shapes[] = {{1, 1, 1}, {13, 33, 7}, {50, 65, 385}, {7, 800, 1000}, {30, 3, 2}};
  for (GemmKernel k : kernels())
    for (const Shape& s : shapes)
      for (bool bf16 : {false, true})
        for (bool integers : {true, false}) {
          Problem p;
          p.s = s;
          p.bf16 = bf16;
          p.pad = 5;
          p.fill(rng, integers);
          const auto W = engine::PackedB::pack(bf16 ? static_cast<const void*>(p.Bh.data()) : p.B.data(), bf16, s.N,
                                               s.K, p.ldb, k);
          EXPECT_EQ(W.kernel(), k);
          std::vector<float> C = p.C0;
          engine::gemm_packed(p.A.data(), s.M, p.lda, W, C.data(), p.ldc);
          p.check(C, integers, describe(k, p, integers) + " packed");
          const auto direct = p.run(k);
          for (int64_t i = 0; i < s.M; ++i)
            for (int64_t j = 0; j < s.N; ++j)
              ASSERT_EQ(C[static_cast<size_t>(i * p.ldc + j)], direct[static_cast<size_t>(i * p.ldc + j)])
                  << describe(k, p, integers) << " packed vs gemm at " << i << "," << j;
        }
}

// The order of the sums, which the GPU's exact mode reproduces (src/calq/backend/cuda/exact_kernels.h):
// every element of calq's own kernels is an fp32 FMA chain over k from +0, restarted every 512
// terms; each chain is multiplied by alpha and merged as C = v (beta 0) or v + beta·C for the first,
// C = v + C for later ones. Checked bit for bit against that scalar loop on shapes around the
// tile and chain sizes, with large, tiny, cancelling and zero values.
TEST(Gemm, EveryElementIsTheChainOfItsBlocksEveryCalqKernel) {
  std::mt19937 rng(29);
  const Shape shapes[] = {{1, 1, 1}, {13, 33, 511}, {12, 32, 512}, {7, 17, 513}, {25, 40, 1025}, {3, 70, 1536},
                          {30, 5, 1600}, {64, 64, 16}, {65, 63, 17}};
  int variant = 0;
  for (GemmKernel k : {GemmKernel::Avx2, GemmKernel::Avx512}) {
    if (!engine::gemm_kernel_supported(k)) continue;
    for (const Shape& s : shapes)
      for (GemmB layout : {GemmB::Trans, GemmB::Normal})
        for (bool bf16 : {false, true}) {
          Problem p;
          p.s = s;
          p.layout = layout;
          p.bf16 = bf16;
          switch (variant++ % 3) {
            case 0: break;
            case 1: p.alpha = 0.0883883476f; p.pad = 2; break;  // 1/√128, attention's scale
            case 2: p.alpha = -3.0f; p.beta = 0.7f; break;
          }
          p.fill(rng, false);
          for (size_t i = 0; i < p.A.size(); ++i) {  // adversarial magnitudes and exact cancellations
            if (i % 7 == 1) p.A[i] *= 1e7f;
            if (i % 11 == 2) p.A[i] *= 1e-7f;
            if (i % 13 == 3) p.A[i] = 0.0f;
            if (i % 17 == 4 && i > 0) p.A[i] = -p.A[i - 1];
          }
          const auto C = p.run(k);
          int bad = 0;
          for (int64_t i = 0; i < s.M; ++i)
            for (int64_t j = 0; j < s.N; ++j) {
              float c = 0.0f;
              for (int64_t k0 = 0; k0 < s.K; k0 += 512) {
                float acc = 0.0f;
                for (int64_t kk = k0; kk < std::min<int64_t>(s.K, k0 + 512); ++kk)
                  acc = std::fma(p.A[static_cast<size_t>(i * p.lda + kk)], static_cast<float>(p.b(kk, j)), acc);
                const float v = p.alpha * acc;
                if (k0 > 0)
                  c = v + c;
                else if (p.beta != 0.0f)
                  c = v + p.beta * p.C0[static_cast<size_t>(i * p.ldc + j)];
                else
                  c = v;
              }
              const float got = C[static_cast<size_t>(i * p.ldc + j)];
              if (std::memcmp(&got, &c, sizeof c) != 0 && bad++ < 3)
                ADD_FAILURE() << describe(k, p, false) << ": C[" << i << "," << j << "] = " << got << ", chain " << c;
            }
        }
  }
}
