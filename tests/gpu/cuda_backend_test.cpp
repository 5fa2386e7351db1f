// The CUDA backend against the CPU reference on the same inputs (label "gpu"; skipped when this
// calq has no CUDA backend or no usable GPU is visible): GPTQ codes and proxy loss for every
// element format with and without act-order, with the clip search and with dynamic act-order
// groups; the Hessian against the CPU accumulator; the error paths.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "support.h"
#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/quant/gptq.h"
#include "calq/quant/hessian.h"

namespace {

using namespace calq;
using namespace calq::quant;

bool gpu_usable(std::string* why) {
  if (!backend::cuda_built()) {
    *why = "built without CUDA";
    return false;
  }
  try {
    backend::cuda_require();
  } catch (const Error& e) {
    *why = e.what();
    return false;
  }
  return true;
}

#define REQUIRE_GPU()                  \
  do {                                 \
    std::string why;                   \
    if (!gpu_usable(&why)) GTEST_SKIP() << why; \
  } while (0)

// x = z·M with correlated features and a few large ones; n tokens × cols.
std::vector<float> inputs(int n, int cols, unsigned seed) { return calq_test::correlated_inputs(n, cols, seed, 0.2f, 11, 4.f); }

std::vector<float> weights(int rows, int cols, unsigned seed) { return calq_test::random_weights(rows, cols, seed); }

struct Case {
  std::string format;
  bool act_order;
  bool static_groups;
  bool clip;
};

class GpuGptq : public ::testing::TestWithParam<Case> {};

TEST_P(GpuGptq, SameCodesAsCpu) {
  REQUIRE_GPU();
  const Case c = GetParam();
  const int rows = 192, cols = 512;
  const auto X = inputs(1024, cols, 7);
  HessianAccumulator acc(cols);
  acc.add(X.data(), 1024);
  auto H = acc.hessian();
  // One dead input, as real layers have.
  for (int j = 0; j < cols; ++j) H[static_cast<size_t>(j) * cols + 5] = H[5 * static_cast<size_t>(cols) + j] = 0;
  const auto W = weights(rows, cols, 11);
  const Format f = Format::parse(c.format);
  GptqOptions o;
  o.act_order = c.act_order;
  o.static_groups = c.static_groups;
  o.clip_search = c.clip;
  o.block_size = 96;  // blocks that do not align with groups
  const auto cpu = gptq_quantize(W.data(), rows, cols, H, f, o, "cpu");
  o.cuda = true;
  const auto gpu = gptq_quantize(W.data(), rows, cols, H, f, o, "gpu");
  ASSERT_EQ(cpu.q.codes.size(), gpu.q.codes.size());
  size_t same = 0;
  for (size_t i = 0; i < cpu.q.codes.size(); ++i) same += cpu.q.codes[i] == gpu.q.codes[i];
  const double frac = static_cast<double>(same) / static_cast<double>(cpu.q.codes.size());
  EXPECT_GE(frac, 0.999) << c.format;
  EXPECT_NEAR(gpu.proxy_loss, cpu.proxy_loss, 0.01 * cpu.proxy_loss) << c.format;
  EXPECT_EQ(gpu.dead_inputs, 1);
  EXPECT_EQ(gpu.damp_used, cpu.damp_used);
  EXPECT_EQ(gpu.q.g_idx, cpu.q.g_idx);
  EXPECT_EQ(gpu.q.global_scale, cpu.q.global_scale);
  size_t same_params = 0;
  for (size_t i = 0; i < cpu.q.params.size(); ++i)
    same_params += cpu.q.params[i].scale == gpu.q.params[i].scale && cpu.q.params[i].zero == gpu.q.params[i].zero;
  EXPECT_GE(static_cast<double>(same_params) / static_cast<double>(cpu.q.params.size()), 0.999);
  std::printf("%-6s act_order=%d static=%d clip=%d: identical codes %.5f%%, proxy loss cpu %.6g gpu %.6g\n",
              c.format.c_str(), c.act_order, c.static_groups, c.clip, 100 * frac, cpu.proxy_loss, gpu.proxy_loss);
}

std::vector<Case> cases() {
  std::vector<Case> v;
  for (const char* f : {"int2", "int3", "int4", "int8", "fp4", "nvfp4", "mxfp4", "nf4", "fp8"})
    for (bool act : {false, true}) v.push_back({f, act, true, false});
  v.push_back({"int4", true, false, false});  // dynamic act-order groups (g_idx)
  v.push_back({"int4", false, true, true});   // clip search inside the loop
  v.push_back({"nvfp4", true, true, true});   // clip search, static groups
  return v;
}

INSTANTIATE_TEST_SUITE_P(AllFormats, GpuGptq, ::testing::ValuesIn(cases()), [](const auto& info) {
  const Case& c = info.param;
  return c.format + (c.act_order ? "_act" : "") + (c.act_order && !c.static_groups ? "_dynamic" : "") +
         (c.clip ? "_clip" : "");
});

TEST(GpuGptq, AsymmetricInt4) {
  REQUIRE_GPU();
  const int rows = 64, cols = 256;
  const auto X = inputs(512, cols, 3);
  HessianAccumulator acc(cols);
  acc.add(X.data(), 512);
  const auto H = acc.hessian();
  const auto W = weights(rows, cols, 4);
  const Format f = Format::parse("int4", 64, false);
  GptqOptions o;
  const auto cpu = gptq_quantize(W.data(), rows, cols, H, f, o);
  o.cuda = true;
  const auto gpu = gptq_quantize(W.data(), rows, cols, H, f, o);
  size_t same = 0;
  for (size_t i = 0; i < cpu.q.codes.size(); ++i) same += cpu.q.codes[i] == gpu.q.codes[i];
  EXPECT_GE(static_cast<double>(same) / static_cast<double>(cpu.q.codes.size()), 0.999);
  EXPECT_NEAR(gpu.proxy_loss, cpu.proxy_loss, 0.01 * cpu.proxy_loss);
}

TEST(GpuGptq, IndefiniteHessianRetriesDampingLikeCpu) {
  REQUIRE_GPU();
  const int rows = 32, cols = 64;
  // Rank-1 H (v vᵀ) with a negative diagonal perturbation: indefinite until the damping grows.
  std::vector<double> H(static_cast<size_t>(cols) * cols);
  for (int i = 0; i < cols; ++i)
    for (int j = 0; j < cols; ++j) H[static_cast<size_t>(i) * cols + j] = 1.0 + 0.01 * ((i + j) % 3);
  H[0] -= 0.5;
  const auto W = weights(rows, cols, 5);
  const Format f = Format::parse("int4", 32);
  GptqOptions o;
  o.damp = 0.001;
  double cpu_damp = -1;
  std::string cpu_err, gpu_err;
  try {
    cpu_damp = gptq_quantize(W.data(), rows, cols, H, f, o).damp_used;
  } catch (const Error& e) {
    cpu_err = e.what();
  }
  o.cuda = true;
  double gpu_damp = -1;
  try {
    gpu_damp = gptq_quantize(W.data(), rows, cols, H, f, o).damp_used;
  } catch (const Error& e) {
    gpu_err = e.what();
  }
  EXPECT_EQ(cpu_damp, gpu_damp);
  EXPECT_EQ(cpu_err.empty(), gpu_err.empty()) << cpu_err << " / " << gpu_err;
}

TEST(GpuHessian, MatchesCpuAccumulator) {
  REQUIRE_GPU();
  const int n = 2000, cols = 384;
  const auto X = inputs(n, cols, 9);
  std::vector<uint8_t> mask(n, 1);
  for (int t = 0; t < n; t += 7) mask[t] = 0;
  HessianAccumulator acc(cols);
  acc.add(X.data(), n, mask.data());
  acc.hessian();  // flushes the accumulator's pending rows into sum()
  const auto& cpu = acc.sum();
  int64_t tokens = 0;
  const auto gpu = backend::cuda_hessian_sum(X.data(), n, cols, mask.data(), 512, &tokens);
  EXPECT_EQ(tokens, acc.tokens());
  double worst = 0;
  for (int i = 0; i < cols; ++i)
    for (int j = i; j < cols; ++j) {
      const double a = cpu[static_cast<size_t>(i) * cols + j], b = gpu[static_cast<size_t>(i) * cols + j];
      const double scale = std::sqrt(cpu[static_cast<size_t>(i) * cols + i] * cpu[static_cast<size_t>(j) * cols + j]);
      worst = std::max(worst, std::fabs(a - b) / scale);
      EXPECT_EQ(gpu[static_cast<size_t>(j) * cols + i], b);
    }
  std::printf("GPU vs CPU Hessian: largest |difference| / sqrt(H_ii H_jj) = %.3g\n", worst);
  EXPECT_LT(worst, 1e-5);
}

TEST(GpuErrors, OutOfMemoryNamesTheBytes) {
  REQUIRE_GPU();
  // A 400000-feature Hessian needs 400000² · 12 + 512 · 400000 · 4 bytes (1.9 TB) on the GPU.
  try {
    backend::cuda_hessian_sum(nullptr, 0, 400000, nullptr, 512, nullptr);
    FAIL() << "expected an out-of-memory error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of GPU memory"), std::string::npos) << m;
    EXPECT_NE(m.find("1920819200000 bytes"), std::string::npos) << m;
    EXPECT_NE(m.find("--device cpu"), std::string::npos) << m;
  }
}

TEST(GpuErrors, BadInputsAreRejectedLikeOnCpu) {
  REQUIRE_GPU();
  std::vector<float> W(16 * 64, 0.01f);
  W[3] = NAN;
  std::vector<double> H(64 * 64, 0.0);
  for (int i = 0; i < 64; ++i) H[i * 64 + i] = 1;
  GptqOptions o;
  o.cuda = true;
  EXPECT_THROW(gptq_quantize(W.data(), 16, 64, H, Format::parse("int4", 32), o, "m"), Error);
  W[3] = 0;
  std::vector<double> small(10, 1.0);
  EXPECT_THROW(gptq_quantize(W.data(), 16, 64, small, Format::parse("int4", 32), o, "m"), Error);
}

TEST(GpuDevice, Describes) {
  REQUIRE_GPU();
  const std::string d = backend::cuda_require();
  std::printf("device: %s\n", d.c_str());
  EXPECT_NE(d.find("sm_"), std::string::npos);
}

}  // namespace
