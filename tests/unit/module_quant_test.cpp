// The kurtosis of MR-GPTQ's gate (pipeline/module_quant.h): Pearson β₂ of all elements of the
// real rows, against a two-pass long-double reference and known distributions.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "calq/pipeline/module_quant.h"

using calq::pipeline::MomentAccumulator;

namespace {

long double two_pass(const std::vector<float>& x, int64_t rows, int64_t cols, const std::vector<uint8_t>& mask) {
  long double sum = 0, n = 0;
  for (int64_t r = 0; r < rows; ++r)
    if (mask[r])
      for (int64_t c = 0; c < cols; ++c) sum += x[r * cols + c], n += 1;
  const long double mu = sum / n;
  long double m2 = 0, m4 = 0;
  for (int64_t r = 0; r < rows; ++r)
    if (mask[r])
      for (int64_t c = 0; c < cols; ++c) {
        const long double d = x[r * cols + c] - mu;
        m2 += d * d;
        m4 += d * d * d * d;
      }
  m2 /= n;
  m4 /= n;
  return m4 / (m2 * m2);
}

}  // namespace

TEST(MomentAccumulator, MatchesTwoPassReferenceAcrossBatchesAndMask) {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.3f, 1.0f);
  const int64_t cols = 48;
  std::vector<float> all;
  std::vector<uint8_t> mask;
  MomentAccumulator acc;
  for (int batch = 0; batch < 3; ++batch) {
    const int64_t rows = 70 + batch;
    std::vector<float> x(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = nd(rng) * (c == 5 ? 20.f : 1.f);  // one outlier channel
    std::vector<uint8_t> m(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) m[r] = (r % 7) != 3;
    for (int64_t r = 0; r < rows; ++r) x[r * cols + 1] = m[r] ? x[r * cols + 1] : 1e6f;  // masked rows ignored
    acc.add(x.data(), rows, cols, m.data());
    all.insert(all.end(), x.begin(), x.end());
    mask.insert(mask.end(), m.begin(), m.end());
  }
  const double want = static_cast<double>(two_pass(all, static_cast<int64_t>(mask.size()), cols, mask));
  EXPECT_NEAR(acc.kurtosis(), want, 1e-9 * want);
  EXPECT_GT(want, 10.0);  // the outlier channel makes the pooled sample heavy-tailed
}

TEST(MomentAccumulator, KnownDistributions) {
  std::mt19937 rng(9);
  const int64_t rows = 2000, cols = 64;
  std::vector<float> g(static_cast<size_t>(rows * cols)), u(g.size());
  std::normal_distribution<float> nd(2.0f, 3.0f);
  std::uniform_real_distribution<float> ud(-1.f, 5.f);
  for (auto& v : g) v = nd(rng);
  for (auto& v : u) v = ud(rng);
  MomentAccumulator a, b, empty;
  a.add(g.data(), rows, cols, nullptr);
  b.add(u.data(), rows, cols, nullptr);
  EXPECT_NEAR(a.kurtosis(), 3.0, 0.05);  // Gaussian
  EXPECT_NEAR(b.kurtosis(), 1.8, 0.02);  // uniform
  EXPECT_EQ(a.count(), rows * cols);
  EXPECT_EQ(empty.kurtosis(), 0.0);
}
