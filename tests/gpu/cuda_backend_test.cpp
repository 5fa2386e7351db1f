// The CUDA backend against the CPU reference on the same inputs (label "gpu"; skipped when this
// calq has no CUDA backend or no usable GPU is visible): GPTQ codes and proxy loss for every
// element format with and without act-order, with the clip search and with dynamic act-order
// groups; the Hessian against the CPU accumulator; the error paths.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>

#include "gpu_support.h"
#include "support.h"
#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/quant/gptq.h"
#include "calq/quant/hadamard.h"
#include "calq/quant/hessian.h"
#include "calq/quant/mr_gptq.h"

namespace {

using namespace calq;
using namespace calq::quant;

// x = z·M with correlated features and a few large ones; n tokens × cols.
std::vector<float> inputs(int n, int cols, unsigned seed) { return calq_test::correlated_inputs(n, cols, seed, 0.2f, 11, 4.f); }

std::vector<float> weights(int rows, int cols, unsigned seed) { return calq_test::random_weights(rows, cols, seed); }

struct Case {
  std::string format;
  bool act_order;
  bool static_groups;
  bool clip;
};
// gtest prints a parameter in the test's ctest name; without this it would dump its bytes.
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.format << (c.act_order ? " act-order" : "") << (c.static_groups ? " static" : "") << (c.clip ? " clip" : "");
}

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

// Shapes and options that stress the fused in-block kernel: rows not a multiple of its thread
// block (32 rows), columns not a multiple of the GPTQ block, groups crossing blocks, one row,
// per-channel, asymmetric dynamic act-order, the clip search of every scale type (fp16, E4M3 with
// the nvfp4 global scale, E8M0) including a norm that needs pow(), and a block too wide for shared
// memory (the kernel's global-memory staging).
struct ShapeCase {
  std::string name;
  int rows, cols, block;
  std::string format;
  int group;  // 0: the format's default
  bool act_order, static_groups, clip, symmetric;
  float clip_norm;
};
void PrintTo(const ShapeCase& c, std::ostream* os) { *os << c.name; }

class GpuGptqShapes : public ::testing::TestWithParam<ShapeCase> {};

// H of n random tokens with every 13th channel ×4 and one dead input; W random.
struct Problem {
  std::vector<float> W;
  std::vector<double> H;
};
Problem problem(int rows, int cols, int tokens, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> X(static_cast<size_t>(tokens) * cols);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < cols; ++j) X[static_cast<size_t>(t) * cols + j] = d(rng) * (j % 13 == 0 ? 4.f : 1.f);
  HessianAccumulator acc(cols);
  acc.add(X.data(), tokens);
  Problem p{weights(rows, cols, seed + 1), acc.hessian()};
  const int dead = cols / 3;
  for (int j = 0; j < cols; ++j)
    p.H[static_cast<size_t>(j) * cols + dead] = p.H[static_cast<size_t>(dead) * cols + j] = 0;
  return p;
}

void compare_gpu_cpu(const std::string& name, const std::vector<float>& W, int rows, int cols,
                     const std::vector<double>& H, const Format& f, GptqOptions o) {
  o.cuda = false;
  const auto cpu = gptq_quantize(W.data(), rows, cols, H, f, o, "cpu");
  o.cuda = true;
  const auto gpu = gptq_quantize(W.data(), rows, cols, H, f, o, "gpu");
  ASSERT_EQ(cpu.q.codes.size(), gpu.q.codes.size());
  ASSERT_EQ(cpu.q.params.size(), gpu.q.params.size());
  size_t same = 0;
  for (size_t i = 0; i < cpu.q.codes.size(); ++i) same += cpu.q.codes[i] == gpu.q.codes[i];
  size_t same_params = 0;
  for (size_t i = 0; i < cpu.q.params.size(); ++i)
    same_params += cpu.q.params[i].scale == gpu.q.params[i].scale && cpu.q.params[i].zero == gpu.q.params[i].zero;
  const double frac = static_cast<double>(same) / static_cast<double>(cpu.q.codes.size());
  const double pfrac = static_cast<double>(same_params) / static_cast<double>(cpu.q.params.size());
  EXPECT_GE(frac, 0.999) << name;
  EXPECT_GE(pfrac, 0.999) << name;
  EXPECT_NEAR(gpu.proxy_loss, cpu.proxy_loss, 0.01 * cpu.proxy_loss) << name;
  EXPECT_EQ(gpu.q.g_idx, cpu.q.g_idx) << name;
  EXPECT_EQ(gpu.q.global_scale, cpu.q.global_scale) << name;
  EXPECT_EQ(gpu.dead_inputs, cpu.dead_inputs) << name;
  // Every code must be a valid code of the format, and the dequantized weights finite.
  for (uint8_t c : gpu.q.codes) ASSERT_LT(c, 1 << f.bits) << name;
  std::printf("%-28s %5d×%-5d %-14s act=%d static=%d clip=%d: identical codes %.5f%%, params %.5f%%, proxy loss "
              "cpu %.8g gpu %.8g; cpu %.3f s, gpu %.3f s (kernel %.4f s, gemm %.4f s)\n",
              name.c_str(), rows, cols, f.describe().c_str(), o.act_order, o.static_groups, o.clip_search, 100 * frac,
              100 * pfrac, cpu.proxy_loss, gpu.proxy_loss, cpu.seconds, gpu.seconds, gpu.stages.block_loop,
              gpu.stages.lazy_gemm);
}

TEST_P(GpuGptqShapes, SameCodesAsCpu) {
  REQUIRE_GPU();
  const ShapeCase c = GetParam();
  const auto p = problem(c.rows, c.cols, 2 * c.cols, static_cast<unsigned>(c.rows * 31 + c.cols));
  const Format f = c.group ? Format::parse(c.format, c.group, c.symmetric) : Format::parse(c.format, std::nullopt, c.symmetric);
  GptqOptions o;
  o.block_size = c.block;
  o.act_order = c.act_order;
  o.static_groups = c.static_groups;
  o.clip_search = c.clip;
  o.clip_norm = c.clip_norm;
  compare_gpu_cpu(c.name, p.W, c.rows, c.cols, p.H, f, o);
}

std::vector<ShapeCase> shape_cases() {
  return {
      {"rows77_cols320_block96", 77, 320, 96, "int4", 64, false, true, false, true, 2.f},
      {"rows77_act_static", 77, 320, 96, "int3", 32, true, true, false, true, 2.f},
      {"one_row_clip", 1, 256, 128, "int4", 128, false, true, true, true, 2.f},
      {"one_row_act_dynamic", 1, 256, 48, "nf4", 64, true, false, false, true, 2.f},
      {"asym_dynamic_act", 100, 384, 64, "int4", 32, true, false, false, false, 2.f},
      {"asym_clip", 45, 256, 100, "int2", 16, false, true, true, false, 2.f},
      {"per_channel_int8", 70, 200, 64, "int8", -1, false, true, false, true, 2.f},
      {"per_channel_fp8_act", 33, 192, 50, "fp8", 0, true, true, false, true, 2.f},
      {"nvfp4_clip_dynamic", 64, 512, 128, "nvfp4", 0, false, true, true, true, 2.f},
      {"mxfp4_clip_act_dynamic", 65, 512, 80, "mxfp4", 0, true, false, true, true, 2.f},
      {"nf4_clip_norm2.4", 40, 256, 96, "nf4", 128, false, true, true, true, 2.4f},
      {"fp4_clip_norm1", 40, 256, 96, "fp4", 256, false, true, true, true, 1.f},
      {"wide_block_global_stage", 50, 1280, 1024, "int4", 128, false, true, false, true, 2.f},
      {"wide_block_act_dynamic", 33, 1280, 1000, "int4", 256, true, false, true, true, 2.f},
      {"block1", 35, 128, 1, "int4", 32, false, true, false, true, 2.f},
  };
}

INSTANTIATE_TEST_SUITE_P(Kernel, GpuGptqShapes, ::testing::ValuesIn(shape_cases()), [](const auto& info) {
  std::string n = info.param.name;
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
});

// A large module (q/o_proj of an 8B model) through the whole path.
TEST(GpuGptqLarge, Int4_4096x4096) {
  REQUIRE_GPU();
  const int rows = 4096, cols = 4096;
  const auto p = problem(rows, cols, 4096, 42);
  for (bool act : {false, true}) {
    GptqOptions o;
    o.act_order = act;
    compare_gpu_cpu(act ? "large_int4_act" : "large_int4", p.W, rows, cols, p.H, Format::parse("int4", 128), o);
  }
}

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

// The block Hadamard rotation of MR-GPTQ on the GPU against quant::Rotation on the CPU: the same
// fp32 bits, forward and inverse, every block size 16..256 and a full-width power-of-two transform.
TEST(GpuHadamard, SameBitsAsCpu) {
  REQUIRE_GPU();
  const int rows = 37;
  struct Shape {
    int64_t dim, block;
  };
  for (const Shape sh : {Shape{256, 16}, Shape{512, 32}, Shape{1024, 64}, Shape{2048, 128}, Shape{4096, 256},
                         Shape{1024, 0}, Shape{64, 2}}) {
    const auto rot = Rotation::make(sh.dim, sh.block, 1234 + static_cast<uint64_t>(sh.dim));
    const auto x = weights(rows, static_cast<int>(sh.dim), 17);
    for (bool inverse : {false, true}) {
      auto cpu = x, gpu = x;
      if (inverse)
        rot.apply_rows_inverse(cpu.data(), rows);
      else
        rot.apply_rows(cpu.data(), rows);
      backend::cuda_hadamard_rows(rot, gpu.data(), rows, inverse);
      size_t same = 0;
      for (size_t i = 0; i < cpu.size(); ++i) same += std::memcmp(&cpu[i], &gpu[i], sizeof(float)) == 0;
      EXPECT_EQ(same, cpu.size()) << rot.describe() << (inverse ? " inverse" : "");
      std::printf("%s%s: %zu of %zu values bit-identical\n", rot.describe().c_str(), inverse ? " inverse" : "", same,
                  cpu.size());
    }
  }
  // A full-width order that is not a power of two stays on the CPU, with a clear error.
  const auto full = Rotation::make(768, 0, 1);
  std::vector<float> y(768, 1.f);
  EXPECT_THROW(backend::cuda_hadamard_rows(full, y.data(), 1, false), Error);
}

// The fp64 row transform and the Hessian rotation RᵀHR on the GPU against the CPU's
// (Rotation::apply_rows on doubles, apply_hessian): the same fp64 bits; more rows than one
// grid's 65535 in fp32; blocks the GPU does not take are reported by cuda_hadamard_supported.
TEST(GpuHadamard, Fp64RowsAndHessianSameBitsAsCpu) {
  REQUIRE_GPU();
  struct Shape {
    int64_t dim, block;
  };
  for (const Shape sh : {Shape{128, 16}, Shape{384, 128}, Shape{1024, 64}, Shape{2048, 256}, Shape{512, 0},
                         Shape{4096, 4096}, Shape{96, 32}}) {
    const auto rot = Rotation::make(sh.dim, sh.block, 77 + static_cast<uint64_t>(sh.dim));
    ASSERT_TRUE(backend::cuda_hadamard_supported(rot)) << rot.describe();
    const int n = static_cast<int>(sh.dim);
    // A Hessian from 96 Gaussian rows with a few strong channels, one huge entry and an exactly
    // zero row/column (cheap to build at n = 4096, unlike inputs()).
    auto X = weights(96, n, 5 + static_cast<unsigned>(n));
    for (int t = 0; t < 96; ++t)
      for (int j = 0; j < n; j += 13) X[static_cast<size_t>(t) * n + j] *= 40.f;
    HessianAccumulator acc(n);
    acc.add(X.data(), 96);
    auto H = acc.hessian();
    for (int j = 0; j < n; ++j) H[static_cast<size_t>(j) * n + 3] = H[3 * static_cast<size_t>(n) + j] = 0;
    H[0] *= 1e12;
    auto cpu = H, gpu = H;
    rot.apply_hessian(cpu);
    backend::cuda_rotate_hessian(rot, gpu);
    size_t same = 0;
    for (size_t i = 0; i < cpu.size(); ++i) same += std::memcmp(&cpu[i], &gpu[i], sizeof(double)) == 0;
    EXPECT_EQ(same, cpu.size()) << rot.describe();
    // fp64 rows, forward and inverse.
    std::vector<double> rows_cpu(static_cast<size_t>(5) * n), rows_gpu;
    for (size_t i = 0; i < rows_cpu.size(); ++i) rows_cpu[i] = X[i % X.size()] * (i % 3 == 0 ? 1e-30 : 1e3);
    rows_gpu = rows_cpu;
    rot.apply_rows(rows_cpu.data(), 5);
    backend::cuda_hadamard_rows(rot, rows_gpu.data(), 5, false);
    EXPECT_EQ(0, std::memcmp(rows_cpu.data(), rows_gpu.data(), rows_cpu.size() * sizeof(double))) << rot.describe();
    std::printf("%s: RᵀHR %zu of %zu values bit-identical\n", rot.describe().c_str(), same, cpu.size());
  }
  // 70000 rows (two launches of at most 65535 rows) in fp32.
  const auto rot = Rotation::make(32, 16, 9);
  auto x = weights(70000, 32, 3), y = x;
  rot.apply_rows(x.data(), 70000);
  backend::cuda_hadamard_rows(rot, y.data(), 70000, false);
  EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float)));
  // Orders the GPU does not take: a full-width 768 (12·2⁶) matrix; fp64 blocks above 4096.
  EXPECT_FALSE(backend::cuda_hadamard_supported(Rotation::make(768, 0, 1)));
  EXPECT_FALSE(backend::cuda_hadamard_supported(Rotation::make(8192, 0, 1)));
  std::vector<double> h(8192 * 8192 / 1024);
  EXPECT_THROW(backend::cuda_hadamard_rows(Rotation::make(8192, 0, 1), h.data(), 8, false), Error);
}

// MR-GPTQ with --device cuda (rotations on the GPU, GPTQ on the GPU) against the CPU: same
// rotation, same codes for (almost) every weight, for a power-of-two block, and for a full-width
// order-768 rotation, which the GPU path computes on the CPU.
TEST(GpuMrGptq, SameCodesAsCpu) {
  REQUIRE_GPU();
  for (const auto& [fmt, cols, block] : {std::tuple{"nvfp4", 512, 128}, std::tuple{"mxfp4", 768, 0},
                                         std::tuple{"int4", 256, 32}}) {
    const int rows = 96;
    const auto X = inputs(1024, cols, 21);
    HessianAccumulator acc(cols);
    acc.add(X.data(), 1024);
    const auto H = acc.hessian();
    const auto W = weights(rows, cols, 23);
    const Format f = std::string(fmt) == "int4" ? Format::parse("int4", 64) : Format::parse(fmt);
    MrGptqOptions o;
    o.hadamard_block = block;
    o.seed = 5;
    const auto cpu = mr_gptq_quantize(W.data(), rows, cols, H, f, o, "cpu");
    o.gptq.cuda = true;
    const auto gpu = mr_gptq_quantize(W.data(), rows, cols, H, f, o, "gpu");
    ASSERT_TRUE(cpu.rotation && gpu.rotation);
    EXPECT_EQ(cpu.rotation->signs, gpu.rotation->signs);
    size_t same = 0;
    for (size_t i = 0; i < cpu.gptq.q.codes.size(); ++i) same += cpu.gptq.q.codes[i] == gpu.gptq.q.codes[i];
    const double frac = static_cast<double>(same) / static_cast<double>(cpu.gptq.q.codes.size());
    EXPECT_GE(frac, 0.999) << fmt;
    EXPECT_NEAR(gpu.gptq.proxy_loss, cpu.gptq.proxy_loss, 0.01 * cpu.gptq.proxy_loss) << fmt;
    std::printf("mr-gptq %s block %d: identical codes %.5f%%\n", fmt, block, 100 * frac);
  }
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
