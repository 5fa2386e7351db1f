// GPTQ against a slow, unblocked reference written from the paper (long double, immediate
// updates of every later column, explicit inverse), plus properties: identity Hessian = RTN,
// lower Hessian error than RTN on correlated inputs, dead inputs, act-order groups; and the
// Hessian accumulator against a plain fp64 sum.
#include "support.h"
#include "calq/quant/gptq.h"

#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <numeric>
#include <random>

#include "calq/core/error.h"
#include "calq/engine/gemm.h"
#include "calq/quant/hessian.h"
#include "calq/quant/rtn.h"

namespace {

using namespace calq::quant;
using LD = long double;

std::vector<float> correlated_inputs(int n, int cols, unsigned seed) { return calq_test::correlated_inputs(n, cols, seed); }

std::vector<double> hessian_of(const std::vector<float>& X, int cols) {
  HessianAccumulator acc(cols);
  acc.add(X.data(), static_cast<int64_t>(X.size() / cols));
  return acc.hessian();
}

using calq_test::random_weights;

// Gauss-Jordan inverse and Cholesky in long double.
std::vector<LD> ref_inverse(std::vector<LD> a, int n) {
  std::vector<LD> inv(n * n, 0);
  for (int i = 0; i < n; ++i) inv[i * n + i] = 1;
  for (int c = 0; c < n; ++c) {
    int p = c;
    for (int r = c + 1; r < n; ++r)
      if (std::fabs(a[r * n + c]) > std::fabs(a[p * n + c])) p = r;
    for (int k = 0; k < n; ++k) {
      std::swap(a[c * n + k], a[p * n + k]);
      std::swap(inv[c * n + k], inv[p * n + k]);
    }
    const LD d = a[c * n + c];
    for (int k = 0; k < n; ++k) {
      a[c * n + k] /= d;
      inv[c * n + k] /= d;
    }
    for (int r = 0; r < n; ++r) {
      if (r == c) continue;
      const LD f = a[r * n + c];
      for (int k = 0; k < n; ++k) {
        a[r * n + k] -= f * a[c * n + k];
        inv[r * n + k] -= f * inv[c * n + k];
      }
    }
  }
  return inv;
}
std::vector<LD> ref_cholesky_upper(const std::vector<LD>& a, int n) {  // a = UᵀU
  std::vector<LD> U(n * n, 0);
  for (int i = 0; i < n; ++i) {
    LD s = a[i * n + i];
    for (int k = 0; k < i; ++k) s -= U[k * n + i] * U[k * n + i];
    U[i * n + i] = std::sqrt(s);
    for (int j = i + 1; j < n; ++j) {
      LD t = a[i * n + j];
      for (int k = 0; k < i; ++k) t -= U[k * n + i] * U[k * n + j];
      U[i * n + j] = t / U[i * n + i];
    }
  }
  return U;
}

struct RefResult {
  std::vector<uint8_t> codes;
  LD loss = 0;
};

// The algorithm as the paper states it, one column at a time, no blocking; groups chosen when
// they start (absmax), without act-order.
RefResult ref_gptq(std::vector<float> W, int rows, int cols, const std::vector<double>& H0, const Format& f,
                   double damp) {
  std::vector<LD> H(H0.begin(), H0.end());
  std::vector<LD> w(W.begin(), W.end());
  for (int j = 0; j < cols; ++j)
    if (H[j * cols + j] == 0) {
      H[j * cols + j] = 1;
      for (int r = 0; r < rows; ++r) w[r * cols + j] = 0;
    }
  LD mean = 0;
  for (int j = 0; j < cols; ++j) mean += H[j * cols + j];
  mean /= cols;
  for (int j = 0; j < cols; ++j) H[j * cols + j] += damp * mean;
  auto U = ref_cholesky_upper(ref_inverse(H, cols), cols);
  RefResult out;
  out.codes.assign(static_cast<size_t>(rows) * cols, 0);
  const int gs = static_cast<int>(f.group_len(cols));
  std::vector<GroupParams> params(rows);
  float global = 1.f;
  if (f.family == Family::NVFP4) {
    float amax = 0;
    for (auto v : w) amax = std::max(amax, static_cast<float>(std::fabs(v)));
    global = nvfp4_global_scale(amax);
  }
  for (int j = 0; j < cols; ++j) {
    if (j % gs == 0)
      for (int r = 0; r < rows; ++r) {
        std::vector<float> g(gs);
        for (int k = 0; k < gs; ++k) g[k] = static_cast<float>(w[r * cols + j + k]);
        params[r] = group_params(f, g.data(), gs, 1.f, global);
      }
    for (int r = 0; r < rows; ++r) {
      const float x = static_cast<float>(w[r * cols + j]);
      const uint8_t c = quantize_element(f, x, params[r], global);
      out.codes[r * cols + j] = c;
      const LD e = (w[r * cols + j] - dequantize_element(f, c, params[r], global)) / U[j * cols + j];
      out.loss += e * e / 2;
      for (int k = j + 1; k < cols; ++k) w[r * cols + k] -= e * U[j * cols + k];
    }
  }
  return out;
}

struct RefProblem {
  const char* label;
  std::vector<double> H;
};

// Well-conditioned, ill-conditioned (feature scales 1e-3..1e3) and rank-deficient (fewer tokens
// than features) Hessians.
std::vector<RefProblem> problems(int cols) {
  std::vector<RefProblem> out;
  out.push_back({"correlated", hessian_of(correlated_inputs(2000, cols, 1), cols)});
  auto X = correlated_inputs(2000, cols, 11);
  for (int t = 0; t < 2000; ++t)
    for (int j = 0; j < cols; ++j) X[t * cols + j] *= std::pow(10.f, -3.f + 6.f * j / (cols - 1));
  out.push_back({"ill-conditioned", hessian_of(X, cols)});
  out.push_back({"rank-deficient", hessian_of(correlated_inputs(cols / 4, cols, 12), cols)});
  return out;
}

TEST(Gptq, MatchesUnblockedReference) {
  const int rows = 24, cols = 64;
  auto W = random_weights(rows, cols, 2);
  for (auto& pr : problems(cols)) {
    for (const char* name : {"int4", "int3", "fp4", "nvfp4", "mxfp4", "nf4", "int8"}) {
      SCOPED_TRACE(std::string(pr.label) + " " + name);
      Format f = Format::parse(name, std::string(name) == "mxfp4" ? 32 : 16);
      GptqOptions o;
      o.block_size = 24;  // blocks that do not align with groups
      auto got = gptq_quantize(W.data(), rows, cols, pr.H, f, o);
      auto ref = ref_gptq(W, rows, cols, pr.H, f, 0.01);
      size_t same = 0;
      for (size_t i = 0; i < ref.codes.size(); ++i) same += got.q.codes[i] == ref.codes[i];
      EXPECT_EQ(same, ref.codes.size());
      EXPECT_NEAR(got.proxy_loss, static_cast<double>(ref.loss), 1e-6 * static_cast<double>(ref.loss) + 1e-12);
    }
  }
}

TEST(Gptq, IdentityHessianIsRtn) {
  const int rows = 16, cols = 128;
  auto W = random_weights(rows, cols, 3);
  std::vector<double> H(cols * cols, 0.0);
  for (int j = 0; j < cols; ++j) H[j * cols + j] = 2.5;
  for (const char* name : {"int4", "nvfp4", "mxfp4", "fp4"}) {
    SCOPED_TRACE(name);
    Format f = Format::parse(name);
    auto g = gptq_quantize(W.data(), rows, cols, H, f, {});
    auto r = rtn_quantize(W.data(), rows, cols, f, {});
    EXPECT_EQ(g.q.codes, r.codes);
  }
}

TEST(Gptq, BeatsRtnOnCorrelatedInputs) {
  const int rows = 32, cols = 128;
  auto X = correlated_inputs(3000, cols, 4);
  auto H = hessian_of(X, cols);
  auto W = random_weights(rows, cols, 5);
  for (const char* name : {"int4", "int3", "fp4", "nvfp4", "mxfp4", "nf4"}) {
    for (bool act : {false, true}) {
      SCOPED_TRACE(std::string(name) + (act ? " act-order" : ""));
      Format f = Format::parse(name);
      GptqOptions o;
      o.act_order = act;
      auto g = gptq_quantize(W.data(), rows, cols, H, f, o);
      auto r = rtn_quantize(W.data(), rows, cols, f, {});
      const double eg = hessian_error(W.data(), g.q.dequantize().data(), rows, cols, H);
      const double er = hessian_error(W.data(), r.dequantize().data(), rows, cols, H);
      EXPECT_LT(eg, 0.8 * er) << "gptq " << eg << " rtn " << er;
    }
  }
}

TEST(Gptq, DeadInputsAndActOrderGroups) {
  const int rows = 8, cols = 64;
  auto X = correlated_inputs(500, cols, 6);
  for (int t = 0; t < 500; ++t) X[t * cols + 5] = X[t * cols + 40] = 0.f;  // two dead features
  auto H = hessian_of(X, cols);
  auto W = random_weights(rows, cols, 7);
  Format f = Format::parse("int4", 16, false);
  GptqOptions o;
  o.act_order = true;
  auto s = gptq_quantize(W.data(), rows, cols, H, f, o);
  EXPECT_EQ(s.dead_inputs, 2);
  EXPECT_TRUE(s.q.g_idx.empty());  // static groups: the original grouping
  auto deq = s.q.dequantize();
  for (int r = 0; r < rows; ++r) {
    EXPECT_EQ(deq[r * cols + 5], 0.f);
    EXPECT_EQ(deq[r * cols + 40], 0.f);
  }
  o.static_groups = false;
  auto d = gptq_quantize(W.data(), rows, cols, H, f, o);
  ASSERT_EQ(d.q.g_idx.size(), static_cast<size_t>(cols));
  std::vector<int> per_group(4, 0);
  for (auto g : d.q.g_idx) ++per_group.at(g);
  EXPECT_EQ(per_group, (std::vector<int>{16, 16, 16, 16}));
  // Columns in a g_idx group are the 16 with the next-largest Hessian diagonals.
  std::vector<int> order(cols);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return H[a * cols + a] > H[b * cols + b]; });
  for (int k = 0; k < cols; ++k) EXPECT_EQ(d.q.g_idx[order[k]], k / 16);
  // Both give a lower Hessian error than RTN.
  auto r = rtn_quantize(W.data(), rows, cols, f, {});
  const double er = hessian_error(W.data(), r.dequantize().data(), rows, cols, H);
  EXPECT_LT(hessian_error(W.data(), deq.data(), rows, cols, H), er);
  EXPECT_LT(hessian_error(W.data(), d.q.dequantize().data(), rows, cols, H), er);
}

TEST(Gptq, SingularHessianRetriesDamping) {
  const int rows = 4, cols = 32;
  auto W = random_weights(rows, cols, 13);
  auto H = hessian_of(correlated_inputs(4, cols, 14), cols);  // rank 4 of 32
  GptqOptions o;
  o.damp = 0;
  auto r = gptq_quantize(W.data(), rows, cols, H, Format::parse("int4", 16), o);
  EXPECT_GT(r.damp_used, 0.0);
  EXPECT_GT(r.damp_value, 0.0);
}

TEST(Gptq, BadInputs) {
  const int rows = 4, cols = 16;
  auto W = random_weights(rows, cols, 8);
  std::vector<double> H(cols * cols, 0.0);
  for (int j = 0; j < cols; ++j) H[j * cols + j] = -1.0;  // negative definite
  GptqOptions o;
  o.damp = 0;
  try {
    gptq_quantize(W.data(), rows, cols, H, Format::parse("int4", 16), o, "layers.0.q_proj");
    ADD_FAILURE();
  } catch (const calq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--damp"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("layers.0.q_proj"), std::string::npos) << e.what();
  }
  H.assign(cols * cols, 0.0);
  H[0] = NAN;
  EXPECT_THROW(gptq_quantize(W.data(), rows, cols, H, Format::parse("int4", 16), {}), calq::Error);
  W[3] = INFINITY;
  H[0] = 1;
  EXPECT_THROW(gptq_quantize(W.data(), rows, cols, H, Format::parse("int4", 16), {}), calq::Error);
  EXPECT_THROW(gptq_quantize(W.data(), rows, cols, std::vector<double>(3), Format::parse("int4", 16), {}),
               calq::Error);
}

TEST(Hessian, BlockedFp32AgainstFp64AtAMillionTokens) {
  const int cols = 8, n = 1000000;
  std::mt19937 rng(9);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> X(static_cast<size_t>(n) * cols);
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < cols; ++j) X[t * cols + j] = d(rng) * (1.f + j) + (j == 3 ? 5.f : 0.f);
  HessianAccumulator acc(cols);
  for (int t0 = 0; t0 < n; t0 += 4096) acc.add(X.data() + static_cast<size_t>(t0) * cols, std::min(4096, n - t0));
  auto H = acc.hessian();
  double max_rel = 0;
  for (int i = 0; i < cols; ++i)
    for (int j = 0; j < cols; ++j) {
      LD s = 0;
      for (int t = 0; t < n; ++t) s += static_cast<LD>(X[t * cols + i]) * X[t * cols + j];
      s /= n;
      max_rel = std::max(max_rel, static_cast<double>(std::fabs((H[i * cols + j] - s) / std::max<LD>(std::fabs(s), 1))));
    }
  EXPECT_LT(max_rel, 1e-6) << "relative error against fp64";
  EXPECT_EQ(acc.tokens(), n);
  RecordProperty("hessian_max_rel_error_1e6_tokens", std::to_string(max_rel));
}

// The block products are calq's own GEMM: every element is the fp32 FMA chain over the block's
// rows in order, added into fp64 block by block, exactly (compared bit for bit with that chain
// written out), whatever the kernel's vector width and the thread count; so the Hessians do not
// depend on the machine (OpenBLAS's ssyrk, used before, did: bench/code_agreement.sh). Widths
// around the strips (96) and tiles (12 x 32, 6 x 16), partial last blocks, adversarial values
// (huge and tiny magnitudes, cancellation, exact zeros).
TEST(Hessian, BlockProductsAreTheOrderedFmaChain) {
  const calq::engine::GemmKernel before = calq::engine::gemm_kernel();
  const int before_threads = omp_get_max_threads();
  std::mt19937 rng(21);
  std::normal_distribution<float> d(0, 1);
  for (const int cols : {1, 7, 95, 96, 97, 200, 385}) {
    const int rows = 1300;  // blocks of 512, 512, 276
    std::vector<float> X(static_cast<size_t>(rows) * cols);
    for (int t = 0; t < rows; ++t)
      for (int j = 0; j < cols; ++j) {
        float v = d(rng);
        if (j % 5 == 1) v *= 1e6f;                     // large
        if (j % 7 == 2) v *= 1e-6f;                    // small
        if (j % 11 == 3 && t % 2) v = -X[(t - 1) * cols + j];  // cancellation along the rows
        if ((t + j) % 13 == 0) v = 0.0f;
        X[static_cast<size_t>(t) * cols + j] = v;
      }
    // The reference: per block, acc = fma(x_ri, x_rj, acc) in float over its rows, then into double.
    std::vector<double> ref(static_cast<size_t>(cols) * cols, 0.0);
    for (int b0 = 0; b0 < rows; b0 += 512)
      for (int i = 0; i < cols; ++i)
        for (int j = i; j < cols; ++j) {
          float acc = 0.0f;
          for (int t = b0; t < std::min(rows, b0 + 512); ++t)
            acc = std::fma(X[static_cast<size_t>(t) * cols + i], X[static_cast<size_t>(t) * cols + j], acc);
          ref[static_cast<size_t>(i) * cols + j] += static_cast<double>(acc);
        }
    for (auto k : {calq::engine::GemmKernel::Avx2, calq::engine::GemmKernel::Avx512})
      for (int threads : {1, 2}) {
        if (!calq::engine::gemm_kernel_supported(k)) continue;
        calq::engine::set_gemm_kernel(k);
        calq::engine::set_num_threads(threads);
        HessianAccumulator acc(cols);
        for (int t0 = 0; t0 < rows; t0 += 333) acc.add(X.data() + static_cast<size_t>(t0) * cols, std::min(333, rows - t0));
        const auto H = acc.hessian();
        for (int i = 0; i < cols; ++i)
          for (int j = i; j < cols; ++j) {
            ASSERT_EQ(acc.sum()[static_cast<size_t>(i) * cols + j], ref[static_cast<size_t>(i) * cols + j])
                << cols << " columns, kernel " << calq::engine::gemm_kernel_name(k) << ", " << threads << " threads, ("
                << i << ", " << j << ")";
            ASSERT_EQ(H[static_cast<size_t>(j) * cols + i], H[static_cast<size_t>(i) * cols + j]);
          }
      }
  }
  calq::engine::set_gemm_kernel(before);
  calq::engine::set_num_threads(before_threads);
}

TEST(Hessian, MaskSkipsPadding) {
  const int cols = 4;
  std::vector<float> X = {1, 2, 3, 4, 100, 100, 100, 100, 0, 1, 0, 1};
  std::vector<uint8_t> mask = {1, 0, 1};
  HessianAccumulator a(cols);
  a.add(X.data(), 3, mask.data());
  EXPECT_EQ(a.tokens(), 2);
  auto H = a.hessian();
  EXPECT_DOUBLE_EQ(H[0 * cols + 0], (1.0 + 0.0) / 2);
  EXPECT_DOUBLE_EQ(H[1 * cols + 3], (2.0 * 4 + 1.0 * 1) / 2);
  EXPECT_DOUBLE_EQ(H[3 * cols + 1], H[1 * cols + 3]);
  HessianAccumulator b(cols);
  b.add(X.data(), 1);
  b.merge(a);
  EXPECT_EQ(b.tokens(), 3);
}

}  // namespace
