// Activation-aware scaling: α = 0 is plain RTN, the search never does worse than RTN on its own
// inputs, and with outlier input channels it does clearly better.
#include "calq/quant/act_scale.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace {

using namespace calq::quant;

TEST(ActScale, BeatsRtnWithOutlierChannels) {
  std::mt19937 rng(1);
  std::normal_distribution<float> d;
  const int cols = 256, tokens = 512;
  std::vector<float> x(tokens * cols);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < cols; ++j) x[t * cols + j] = d(rng) * (j % 32 == 5 ? 30.f : 1.f);
  std::vector<double> mean_abs(cols, 0);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < cols; ++j) mean_abs[j] += std::fabs(x[t * cols + j]) / tokens;
  std::vector<float> w1(64 * cols), w2(32 * cols);
  for (auto& v : w1) v = d(rng) * 0.02f;
  for (auto& v : w2) v = d(rng) * 0.02f;
  for (const char* name : {"int4", "int3", "nvfp4", "mxfp4"}) {
    SCOPED_TRACE(name);
    auto f = Format::parse(name);
    ActScaleOptions o;
    auto r = act_scale_search({{w1.data(), 64}, {w2.data(), 32}}, cols, x.data(), tokens, mean_abs, f, o);
    EXPECT_GT(r.alpha, 0.0);
    EXPECT_LT(r.error, 0.9 * r.error_plain) << r.error << " vs " << r.error_plain;
    ASSERT_EQ(r.q.size(), 2u);
    // α = 0 reproduces RTN exactly.
    ActScaleOptions one;
    one.grid = 1;
    auto p = act_scale_search({{w1.data(), 64}}, cols, x.data(), tokens, mean_abs, f, one);
    EXPECT_EQ(p.alpha, 0.0);
    EXPECT_EQ(p.q[0].codes, rtn_quantize(w1.data(), 64, cols, f, {}).codes);
  }
}

TEST(ActScale, NeverWorseThanRtnOnItsInputs) {
  std::mt19937 rng(2);
  std::normal_distribution<float> d;
  const int cols = 128, tokens = 64;
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<float> x(tokens * cols), w(16 * cols);
    for (auto& v : x) v = d(rng);
    for (auto& v : w) v = d(rng);
    std::vector<double> mean_abs(cols, 0.8);
    mean_abs[trial] = 0;  // a dead channel
    auto r = act_scale_search({{w.data(), 16}}, cols, x.data(), tokens, mean_abs, Format::parse("int4"), {});
    EXPECT_LE(r.error, r.error_plain);
    for (float s : r.scales) EXPECT_TRUE(std::isfinite(s) && s > 0);
  }
}

}  // namespace
