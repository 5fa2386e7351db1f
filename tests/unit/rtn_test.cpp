// rtn_quantize beyond single elements: the clip search against a brute-force evaluation of the
// documented grid (quant_reference.h), NaN/Inf errors, option errors, thread-count independence,
// the nvfp4 global scale, weight_error.
#include "calq/quant/rtn.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <functional>
#include <random>

#include "calq/core/error.h"
#include "quant_reference.h"

using namespace calq;
using namespace calq::quant;

namespace {

uint32_t bits(float v) {
  return std::bit_cast<uint32_t>(v);
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
  }
}

std::vector<float> sample(int64_t n, int kind, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.02f);
  std::uniform_real_distribution<float> ud(0.05f, 1.f);
  std::vector<float> w(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float v = nd(rng);
    if (kind == 1 && i % 41 == 3) v *= 1e4f;  // heavy outliers
    if (kind == 2) v /= ud(rng);              // heavy tails
    w[i] = v;
  }
  return w;
}

struct Case {
  const char* name;
  int group;
  bool sym;
};

const std::vector<Case> kCases = {
    {"int2", 32, true},  {"int2", -1, false}, {"int3", 32, true},  {"int3", 64, false},
    {"int4", 32, true},  {"int4", -1, true},  {"int4", 16, false}, {"int8", 32, true},
    {"int8", 64, false}, {"fp4", 64, true},   {"nf4", 64, true},   {"nf4", -1, true},
    {"nvfp4", 16, true}, {"mxfp4", 32, true}, {"fp8", 32, true},   {"fp8", -1, true}};

// Runs rtn_quantize with the clip search and compares with the reference's brute force over the
// whole grid (no skipping of repeated candidates); checks that no group got worse than absmax.
// Returns how many groups chose a shrunk range.
int check_clip(const Format& f, const std::vector<float>& w, int64_t R, int64_t C, RtnOptions o) {
  SCOPED_TRACE(f.describe() +
               fmt::format(" grid {} min {} norm {}", o.clip_grid, o.clip_min, o.clip_norm));
  o.clip_search = true;
  const QuantizedWeight q = rtn_quantize(w.data(), R, C, f, o);
  const qref::Quantized r = qref::quantize(f, w, R, C, true, o.clip_grid, o.clip_min, o.clip_norm);
  const qref::Quantized a = qref::quantize(f, w, R, C);  // absmax
  const int64_t G = f.groups_per_row(C), len = f.group_len(C);
  int shrunk = 0;
  for (int64_t i = 0; i < R * G; ++i) {
    EXPECT_EQ(bits(q.params[i].scale), bits(r.params[i].scale)) << "group " << i;
    EXPECT_EQ(q.params[i].zero, r.params[i].zero) << "group " << i;
    const float* x = w.data() + (i / G) * C + (i % G) * len;
    const double e_clip = qref::group_error(f, x, len, r.params[i], r.G, o.clip_norm);
    const double e_abs = qref::group_error(f, x, len, a.params[i], a.G, o.clip_norm);
    EXPECT_LE(e_clip, e_abs) << "group " << i;
    shrunk += !(r.params[i] == a.params[i]);
  }
  EXPECT_EQ(q.codes, r.codes);
  return shrunk;
}

}  // namespace

TEST(Rtn, ClipSearchMatchesBruteForceGrid) {
  const int64_t R = 4, C = 128;
  for (const auto& c : kCases) {
    const Format f = Format::parse(c.name, c.group, c.sym);
    int shrunk = 0;
    for (int kind = 0; kind < 3; ++kind)
      shrunk += check_clip(f, sample(R * C, kind, 10 + kind), R, C, {});
    // With outliers and heavy tails the search must move some groups off absmax (int8's grid is
    // fine enough that it rarely pays).
    if (f.bits <= 4) {
      EXPECT_GT(shrunk, 0) << f.describe();
    }
  }
}

TEST(Rtn, ClipSearchOptions) {
  const int64_t R = 3, C = 64;
  const auto w = sample(R * C, 2, 77);
  for (const char* n : {"int4", "fp4", "mxfp4", "nvfp4", "nf4"}) {
    const Format f = Format::parse(n, n == std::string("nvfp4") ? 16 : 32);
    RtnOptions o;
    o.clip_norm = 1.f;
    check_clip(f, w, R, C, o);
    o.clip_norm = 3.f;
    check_clip(f, w, R, C, o);
    o = {};
    o.clip_grid = 5;
    o.clip_min = 0.3f;
    check_clip(f, w, R, C, o);
    // A grid of one point is plain absmax.
    o = {};
    o.clip_search = true;
    o.clip_grid = 1;
    const auto q1 = rtn_quantize(w.data(), R, C, f, o);
    const auto q0 = rtn_quantize(w.data(), R, C, f, {});
    EXPECT_EQ(q1.codes, q0.codes);
  }
}

// mxfp4's scale is a power of two: with f_min = 0.5 the search can only pick E0 or E0 - 1.
TEST(Rtn, MxfpClipSearchPicksBetweenTwoExponents) {
  const int64_t R = 8, C = 256;
  const auto w = sample(R * C, 2, 5);
  const Format f = Format::parse("mxfp4");
  RtnOptions o;
  o.clip_search = true;
  const auto q = rtn_quantize(w.data(), R, C, f, o);
  const auto a = rtn_quantize(w.data(), R, C, f, {});
  int lowered = 0;
  for (size_t i = 0; i < q.params.size(); ++i) {
    EXPECT_TRUE(q.params[i].scale == a.params[i].scale ||
                q.params[i].scale == a.params[i].scale / 2)
        << i;
    lowered += q.params[i].scale != a.params[i].scale;
  }
  EXPECT_GT(lowered, 0);
}

TEST(Rtn, NanAndInfNameTheFirstBadElement) {
  std::vector<float> w(4 * 64, 0.5f);
  w[2 * 64 + 5] = NAN;
  w[3 * 64 + 1] = INFINITY;
  expect_error(
      [&] {
        rtn_quantize(w.data(), 4, 64, Format::parse("int4", 32), {}, "layers.3.mlp.down_proj");
      },
      "layers.3.mlp.down_proj: weight [2, 5] is NaN; cannot quantize a tensor holding NaN "
      "or Inf");
  w[2 * 64 + 5] = 1.f;
  expect_error([&] { rtn_quantize(w.data(), 4, 64, Format::parse("nvfp4"), {}, "m"); },
               "m: weight [3, 1] is +Inf");
  w[3 * 64 + 1] = -INFINITY;
  expect_error([&] { rtn_quantize(w.data(), 4, 64, Format::parse("fp8"), {}); },
               "weight: weight [3, 1] is -Inf");
  // Large tensors (the parallel scan) find the first one too.
  std::vector<float> big(512 * 512, 0.1f);
  big[300 * 512 + 7] = NAN;
  big[100 * 512 + 400] = -INFINITY;
  expect_error([&] { rtn_quantize(big.data(), 512, 512, Format::parse("int4"), {}, "big"); },
               "big: weight [100, 400] is -Inf");
}

TEST(Rtn, OptionErrors) {
  std::vector<float> w(128, 1.f);
  RtnOptions o;
  o.clip_search = true;
  o.clip_grid = 0;
  expect_error([&] { rtn_quantize(w.data(), 1, 128, Format::parse("int4"), o); },
               "--clip-grid must be between 1 and 10000, got 0");
  o.clip_grid = 20;
  o.clip_min = 0.f;
  expect_error([&] { rtn_quantize(w.data(), 1, 128, Format::parse("int4"), o); },
               "--clip-min must be in (0, 1], got 0");
  o.clip_min = 1.5f;
  expect_error([&] { rtn_quantize(w.data(), 1, 128, Format::parse("int4"), o); }, "--clip-min");
  o.clip_min = 0.5f;
  o.clip_norm = -1.f;
  expect_error([&] { rtn_quantize(w.data(), 1, 128, Format::parse("int4"), o); },
               "--clip-norm must be a positive number, got -1");
  RtnOptions g;
  g.global_scale = 0.f;
  expect_error([&] { rtn_quantize(w.data(), 1, 128, Format::parse("nvfp4"), g, "q"); },
               "q: nvfp4 global scale 0 must be positive and finite");
  g.global_scale = NAN;
  expect_error([&] { rtn_quantize(w.data(), 1, 128, Format::parse("nvfp4"), g, "q"); },
               "must be positive");
}

// The result does not depend on the thread count (rows are independent; no reductions into
// codes).
TEST(Rtn, ThreadCountIndependent) {
  const int64_t R = 256, C = 512;  // > 2^16 weights: the parallel path
  const auto w = sample(R * C, 1, 3);
  const int saved = omp_get_max_threads();
  for (const char* n : {"int4", "nvfp4", "fp8"}) {
    RtnOptions o;
    o.clip_search = std::string(n) == "int4";
    omp_set_num_threads(1);
    const auto a = rtn_quantize(w.data(), R, C, Format::parse(n), o);
    omp_set_num_threads(4);
    const auto b = rtn_quantize(w.data(), R, C, Format::parse(n), o);
    EXPECT_EQ(a.codes, b.codes) << n;
    EXPECT_EQ(bits(a.global_scale), bits(b.global_scale)) << n;
    for (size_t i = 0; i < a.params.size(); ++i) {
      ASSERT_EQ(bits(a.params[i].scale), bits(b.params[i].scale)) << n;
      ASSERT_EQ(a.params[i].zero, b.params[i].zero) << n;
    }
    EXPECT_EQ(a.dequantize(), b.dequantize()) << n;
  }
  omp_set_num_threads(saved);
}

// Modules that engines fuse share one global scale: quantizing with the joint one reproduces the
// reference with that scale, and the tensor's own amax no longer matters.
TEST(Rtn, Nvfp4SharedGlobalScale) {
  const auto q_w = sample(4 * 64, 0, 1), k_w = sample(4 * 64, 1, 2);
  float amax = 0;
  for (float v : q_w) amax = std::max(amax, std::fabs(v));
  for (float v : k_w) amax = std::max(amax, std::fabs(v));
  const float G = nvfp4_global_scale(amax);
  EXPECT_EQ(bits(G), bits(qref::global_scale(amax)));
  RtnOptions o;
  o.global_scale = G;
  const Format f = Format::parse("nvfp4");
  for (const auto* w : {&q_w, &k_w}) {
    const auto q = rtn_quantize(w->data(), 4, 64, f, o);
    const auto r = qref::quantize(f, *w, 4, 64, false, 20, 0.5f, 2.f, G);
    EXPECT_EQ(q.global_scale, G);
    EXPECT_EQ(q.codes, r.codes);
    for (size_t i = 0; i < q.params.size(); ++i)
      EXPECT_EQ(bits(q.params[i].scale), bits(r.params[i].scale));
  }
  // Without the override each tensor uses its own amax.
  const auto own = rtn_quantize(q_w.data(), 4, 64, f, {});
  float qa = 0;
  for (float v : q_w) qa = std::max(qa, std::fabs(v));
  EXPECT_EQ(own.global_scale, nvfp4_global_scale(qa));
}

TEST(Rtn, WeightError) {
  const std::vector<float> w = {1, -2, 3, 0}, h = {1, -1, 2.5f, 0.5f};
  const WeightError e = weight_error(w.data(), h.data(), 4);
  EXPECT_DOUBLE_EQ(e.rmse, std::sqrt((0 + 1 + 0.25 + 0.25) / 4));
  EXPECT_DOUBLE_EQ(e.rel_fro, std::sqrt(1.5 / 14));
  EXPECT_DOUBLE_EQ(e.max_abs, 1.0);
  const std::vector<float> z(3, 0.f), z1 = {0, 0, 1};
  EXPECT_EQ(weight_error(z.data(), z.data(), 3).rel_fro, 0);
  EXPECT_TRUE(std::isinf(weight_error(z.data(), z1.data(), 3).rel_fro));
  EXPECT_EQ(weight_error(z.data(), z.data(), 0).rmse, 0);
  // A large input takes the parallel reduction and agrees with a serial sum.
  const auto a = sample(1 << 19, 0, 4), b = sample(1 << 19, 0, 5);
  double se = 0, mx = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    se += d * d;
    mx = std::max(mx, std::fabs(d));
  }
  const WeightError eb = weight_error(a.data(), b.data(), static_cast<int64_t>(a.size()));
  EXPECT_NEAR(eb.rmse, std::sqrt(se / static_cast<double>(a.size())), 1e-12);
  EXPECT_EQ(eb.max_abs, mx);
}

// RTN error bounds that follow from the rules (a sanity net under the bit-exact tests): symmetric
// int at most half a step plus the fp16 rounding of the scale; fp4 at most one unit of scale.
TEST(Rtn, ErrorBounds) {
  const int64_t R = 16, C = 256;
  const auto w = sample(R * C, 2, 9);
  for (int b : {2, 3, 4, 8}) {
    const Format f = Format::parse("int" + std::to_string(b), 64);
    const auto q = rtn_quantize(w.data(), R, C, f, {});
    const auto d = q.dequantize();
    const double bound = 0.5 + ((1 << (b - 1)) - 0.5) * std::ldexp(1.0, -10);
    for (int64_t i = 0; i < R * C; ++i) {
      const double s = q.params[(i / C) * 4 + (i % C) / 64].scale;
      ASSERT_LE(std::fabs(w[i] - d[i]), bound * s) << f.describe() << " " << i;
    }
  }
  const auto q = rtn_quantize(w.data(), R, C, Format::parse("fp4", 64), {});
  const auto d = q.dequantize();
  for (int64_t i = 0; i < R * C; ++i)
    ASSERT_LE(std::fabs(w[i] - d[i]), q.params[(i / C) * 4 + (i % C) / 64].scale * (1 + 1e-6));
}

namespace {

// Column-weighted clip search: unit weights reproduce the unweighted search exactly; a heavily
// weighted column gets a smaller error than without weights, at the others' expense.
TEST(RtnWeightedClip, UnitWeightsEqualPlainAndHeavyColumnsWin) {
  using namespace calq::quant;
  std::mt19937 rng(11);
  std::normal_distribution<float> d;
  const int rows = 32, cols = 128;
  std::vector<float> w(rows * cols);
  for (auto& v : w) v = d(rng);
  for (int r = 0; r < rows; ++r) w[r * cols + 7] *= 4.f;  // an outlier column
  for (const char* name : {"int4", "int3", "nvfp4", "fp4"}) {
    SCOPED_TRACE(name);
    auto f = Format::parse(name);
    RtnOptions o;
    o.clip_search = true;
    auto plain = rtn_quantize(w.data(), rows, cols, f, o);
    std::vector<float> ones(cols, 1.f);
    o.col_weight = ones.data();
    auto unit = rtn_quantize(w.data(), rows, cols, f, o);
    EXPECT_EQ(unit.codes, plain.codes);
    std::vector<float> heavy(cols, 1.f);
    for (int c = 0; c < cols; c += 3) heavy[c] = 1000.f;
    o.col_weight = heavy.data();
    auto hq = rtn_quantize(w.data(), rows, cols, f, o);
    auto err = [&](const QuantizedWeight& q, bool weighted) {
      auto dq = q.dequantize();
      double e = 0;
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const double x = static_cast<double>(w[r * cols + c]) - dq[r * cols + c];
          e += (weighted ? heavy[c] : 1.0) * x * x;
        }
      return e;
    };
    EXPECT_LE(err(hq, true), err(plain, true));
    EXPECT_LT(err(hq, true), 0.999 * err(plain, true));
  }
}

}  // namespace
