// MR-GPTQ on a problem with outlier input channels (as LLM activations have): rotated + scale
// search + GPTQ beats GPTQ without rotation for the FP4 formats, measured in the original basis;
// a rotation with a lossless format changes nothing.
#include "calq/quant/mr_gptq.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "calq/quant/hessian.h"

namespace {

using namespace calq::quant;

struct Problem {
  int rows, cols;
  std::vector<float> W;
  std::vector<double> H;
};

Problem outlier_problem(int rows, int cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::student_t_distribution<float> heavy(2.5f);
  Problem p{rows, cols, std::vector<float>(rows * cols), {}};
  for (auto& v : p.W) v = heavy(rng) * 0.02f;
  HessianAccumulator acc(cols);
  std::vector<float> x(cols);
  for (int t = 0; t < 4 * cols; ++t) {
    for (int j = 0; j < cols; ++j) x[j] = d(rng) * (j % 16 == 3 ? 20.f : 1.f);
    acc.add(x.data(), 1);
  }
  p.H = acc.hessian();
  return p;
}

double err(const Problem& p, const std::vector<float>& what) { return hessian_error(p.W.data(), what.data(), p.rows, p.cols, p.H); }

TEST(MrGptq, BeatsPlainGptqForFp4Formats) {
  auto p = outlier_problem(64, 256, 1);
  for (const char* name : {"nvfp4", "mxfp4", "fp4"}) {
    SCOPED_TRACE(name);
    Format f = Format::parse(name);
    GptqOptions plain;
    auto g = gptq_quantize(p.W.data(), p.rows, p.cols, p.H, f, plain);
    MrGptqOptions mo;
    mo.seed = 3;
    auto m = mr_gptq_quantize(p.W.data(), p.rows, p.cols, p.H, f, mo);
    ASSERT_TRUE(m.rotation.has_value());
    EXPECT_EQ(m.rotation->block, 128);
    const double eg = err(p, g.q.dequantize()), em = err(p, mr_gptq_dequantize(m));
    EXPECT_LT(em, 0.9 * eg) << "mr-gptq " << em << " gptq " << eg;
    std::printf("%s: mr-gptq %.4g gptq %.4g ratio %.3f\n", name, em, eg, em / eg);
  }
}

TEST(MrGptq, RotationAloneIsLossless) {
  // int8 per-channel on weights of magnitude ~1: the rotated-and-back weight stays within the
  // int8 error, and with the identity Hessian the rotated problem is the same size of error.
  auto p = outlier_problem(8, 96, 2);
  MrGptqOptions mo;
  mo.hadamard_block = 0;  // full width: 96 = 3 · 32, a Paley-based order
  auto m = mr_gptq_quantize(p.W.data(), p.rows, p.cols, p.H, Format::parse("int8", -1), mo);
  auto back = mr_gptq_dequantize(m);
  double worst = 0, amax = 0;
  for (size_t i = 0; i < back.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(back[i] - p.W[i])));
    amax = std::max(amax, static_cast<double>(std::fabs(p.W[i])));
  }
  EXPECT_LT(worst, 0.02 * amax);
  MrGptqOptions none;
  none.rotate = false;
  EXPECT_FALSE(mr_gptq_quantize(p.W.data(), p.rows, p.cols, p.H, Format::parse("int4", 32), none).rotation.has_value());
}

}  // namespace
