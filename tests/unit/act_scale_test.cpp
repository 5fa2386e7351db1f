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

namespace {

using namespace calq::quant;

// The moment form of the error equals ‖X Dᵀ‖² computed from the raw inputs (H = XᵀX), so both
// searches choose the same α; the diagonal form equals it when the channels are uncorrelated
// by construction (X with orthogonal columns).
TEST(ActScale, MomentErrorMatchesRawInputs) {
  std::mt19937 rng(3);
  std::normal_distribution<float> d;
  const int cols = 64, tokens = 300, rows = 24;
  std::vector<float> x(tokens * cols), w(rows * cols);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < cols; ++j) x[t * cols + j] = d(rng) * (j % 16 == 3 ? 20.f : 1.f);
  for (auto& v : w) v = d(rng) * 0.05f;
  std::vector<double> mean_abs(cols, 0);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < cols; ++j) mean_abs[j] += std::fabs(x[t * cols + j]) / tokens;
  InputMoment h;
  h.h.assign(cols * cols, 0.f);
  for (int a = 0; a < cols; ++a)
    for (int b = 0; b < cols; ++b) {
      double s = 0;
      for (int t = 0; t < tokens; ++t) s += static_cast<double>(x[t * cols + a]) * x[t * cols + b];
      h.h[a * cols + b] = static_cast<float>(s);
    }
  auto f = Format::parse("int4", 32);
  ActScaleOptions o;
  auto rx = act_scale_search({{w.data(), rows}}, cols, x.data(), tokens, mean_abs, f, o);
  auto rh = act_scale_search({{w.data(), rows}}, cols, h, mean_abs, f, o);
  EXPECT_EQ(rx.alpha, rh.alpha);
  EXPECT_NEAR(rh.error, rx.error, 1e-4 * rx.error);
  EXPECT_NEAR(rh.error_plain, rx.error_plain, 1e-4 * rx.error_plain);
  EXPECT_EQ(rx.q[0].codes, rh.q[0].codes);

  // Diagonal form against a direct double-precision sum over a diagonal H.
  InputMoment diag;
  diag.diagonal = true;
  for (int j = 0; j < cols; ++j) diag.h.push_back(h.h[j * cols + j]);
  std::vector<float> w_hat(w.size());
  for (size_t i = 0; i < w.size(); ++i) w_hat[i] = w[i] + 0.01f * d(rng);
  double ref = 0;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) {
      const double e = static_cast<double>(w[r * cols + j]) - w_hat[r * cols + j];
      ref += e * e * diag.h[j];
    }
  EXPECT_NEAR(moment_error(w.data(), w_hat, rows, cols, diag), ref, 1e-6 * ref);
}

}  // namespace
