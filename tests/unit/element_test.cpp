// calq/quant/element.h, the element code shared by format.cpp and the CUDA GPTQ kernel, against
// independent references on adversarial values: the storage-type rounding against core/dtype's
// converters (fp16, E4M3) and the standard library (E8M0 via ilogb/ldexp); group parameters and
// codes against tests/unit/quant_reference.h (brute force from docs/format.md); the element code
// against format.cpp's 4-lane bulk paths; the clip search and its error against the CPU's.
#include "calq/quant/element.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>

#include "calq/core/dtype.h"
#include "calq/quant/format.h"
#include "calq/quant/gptq.h"
#include "quant_reference.h"

using namespace calq;
using namespace calq::quant;

namespace {

uint32_t bits(float v) { return std::bit_cast<uint32_t>(v); }
bool same(float a, float b) { return bits(a) == bits(b) || (std::isnan(a) && std::isnan(b)); }

// Floats around the interesting places of a narrow type: every value from `lo` to `hi` in steps
// of `step` bit patterns, and each pattern's neighbours.
std::vector<float> sweep(uint32_t lo, uint32_t hi, uint32_t step) {
  std::vector<float> v;
  for (uint64_t b = lo; b <= hi; b += step) v.push_back(std::bit_cast<float>(static_cast<uint32_t>(b)));
  return v;
}

TEST(Element, F16RoundMatchesDtypeConverters) {
  std::vector<float> xs = sweep(0, 0x7F800000u, 977);     // every binade, zero to Inf
  auto sub = sweep(0x33000000u, 0x38900000u, 13);         // fp16 subnormal range, densely
  xs.insert(xs.end(), sub.begin(), sub.end());
  // Every fp16 value and the midpoints to its neighbours (the ties), ± one fp32 ulp.
  for (uint32_t h = 0; h < 0x7C00u; ++h) {
    const float v = f16_to_f32(static_cast<uint16_t>(h)), n = f16_to_f32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((static_cast<double>(v) + n) / 2);
    for (float x : {v, mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)}) xs.push_back(x);
  }
  for (float x : {65504.f, 65519.99f, 65520.f, 1e30f, std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), INFINITY, NAN})
    xs.push_back(x);
  size_t n = 0;
  for (float x : xs)
    for (float s : {x, -x}) {
      const float want = f16_to_f32(f32_to_f16(s));
      ASSERT_TRUE(same(elem::f16_round(s), want)) << s << " bits " << std::hex << bits(s);
      ++n;
    }
  EXPECT_GT(n, 4000000u);
  // The fp16 scale rule: clamped at 65504, saturation flagged from 65520 on.
  bool sat = false;
  EXPECT_EQ(elem::fp16_scale(65519.f, &sat), 65504.f);
  EXPECT_FALSE(sat);
  EXPECT_EQ(elem::fp16_scale(1e38f, &sat), 65504.f);
  EXPECT_TRUE(sat);
}

TEST(Element, E4M3MatchesDtypeConverters) {
  for (int c = 0; c < 256; ++c)
    ASSERT_TRUE(same(elem::e4m3_value(static_cast<uint8_t>(c)), e4m3_to_f32(static_cast<uint8_t>(c)))) << c;
  // e4m3_code (the fp8 element code and nvfp4's scale rounding) against the saturating
  // converter, except that a value rounding to zero is always +0 (code 0x00).
  auto xs = sweep(0, 0x44000000u, 331);  // 0 .. 512
  for (int c = 0; c < 126; ++c) {  // 126 = 448, the largest finite magnitude
    const float v = e4m3_to_f32(static_cast<uint8_t>(c)), n = e4m3_to_f32(static_cast<uint8_t>(c + 1));
    const float mid = static_cast<float>((static_cast<double>(v) + n) / 2);
    for (float x : {v, mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)}) xs.push_back(x);
  }
  for (float x : {448.f, 463.99f, 464.f, 1e30f, std::numeric_limits<float>::denorm_min()}) xs.push_back(x);
  for (float x : xs)
    for (float s : {x, -x}) {
      const uint8_t got = elem::e4m3_code(s), want = f32_to_e4m3(s, true);
      if ((want & 0x7F) == 0)
        ASSERT_EQ(got, 0) << s;
      else
        ASSERT_EQ(got, want) << s;
    }
}

TEST(Element, Mxfp4ScaleMatchesIlogbRule) {
  // The compressed-tensors rule written with the standard library (format.cpp's former code).
  auto want = [](float a) {
    int e = -127;
    if (a > 0) {
      const int k = std::ilogb(a);
      e = std::clamp(k - 2 + (static_cast<double>(a) >= std::ldexp(1.75, k) ? 1 : 0), -127, 127);
    }
    return std::ldexp(1.f, e);
  };
  auto xs = sweep(0, 0x7F800000u, 1231);
  for (int e = -149; e < 128; ++e)
    for (double m : {1.0, 1.5, 1.75, 1.9999999}) {
      const float x = static_cast<float>(std::ldexp(m, e));
      xs.insert(xs.end(), {x, std::nextafter(x, 0.f), std::nextafter(x, INFINITY)});
    }
  for (float a : xs) ASSERT_TRUE(same(elem::mxfp4_scale(a), want(a))) << a << " bits " << std::hex << bits(a);
}

std::vector<Format> all_formats() {
  std::vector<Format> v;
  for (const char* n : {"int2", "int3", "int4", "int8", "fp4", "nvfp4", "mxfp4", "nf4", "fp8"})
    v.push_back(Format::parse(n, std::string(n) == "nvfp4" ? 16 : std::string(n) == "mxfp4" ? 32 : 16));
  for (int b : {2, 3, 4, 8}) v.push_back(Format::parse("int" + std::to_string(b), 16, false));
  return v;
}

// Adversarial values for a group with parameters p: every decision boundary of the format
// (the exact ties and their fp32 neighbours), zeros of both signs, subnormals, saturation.
std::vector<float> adversarial(const Format& f, const GroupParams& p, float G) {
  std::vector<float> xs = {0.f, -0.f, std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::min(),
                           1e-40f, -3e-39f, 1e30f, -1e30f, std::numeric_limits<float>::max(),
                           -std::numeric_limits<float>::max()};
  std::vector<double> ys;  // quotients y = x/s at the boundaries
  const int ncodes = 1 << f.bits;
  for (int c = 0; c + 1 < ncodes; ++c) {
    const double a = elem::value(f.spec(), static_cast<uint8_t>(c), p, G);
    const double b = elem::value(f.spec(), static_cast<uint8_t>(c + 1), p, G);
    ys.push_back((a + b) / 2);
    ys.push_back(a);
  }
  for (double y : ys) {
    const float x = static_cast<float>(y);
    if (std::isfinite(x)) xs.insert(xs.end(), {x, std::nextafter(x, -INFINITY), std::nextafter(x, INFINITY)});
  }
  return xs;
}

TEST(Element, CodesMatchReferenceAndBulkPaths) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  size_t checked = 0;
  for (const Format& f : all_formats()) {
    for (int iter = 0; iter < 40; ++iter) {
      // A group's range from random values, some tiny (subnormal scales), some huge (saturated).
      const float mag = iter % 8 == 0 ? 1e-41f : iter % 8 == 1 ? 1e6f : iter % 8 == 2 ? 0.f : 0.05f;
      float mn = std::min(0.f, nd(rng) * mag), mx = std::max(0.f, nd(rng) * mag);
      const float G = f.family == Family::NVFP4 ? nvfp4_global_scale(std::max(-mn, mx) * (iter % 3 + 1)) : 1.f;
      const GroupParams p = elem::params_from_range(f.spec(), mn, mx, 1.f, G, nullptr);
      // The parameters against the reference from a group holding mn and mx.
      const float ends[2] = {mn, mx};
      const qref::Params rp = qref::params(f, ends, 2, 1.f, G);
      ASSERT_TRUE(same(p.scale, rp.scale)) << f.describe() << " range " << mn << ".." << mx;
      ASSERT_EQ(p.zero, rp.zero) << f.describe();
      auto xs = adversarial(f, p, G);
      for (int i = 0; i < 64; ++i) xs.push_back(nd(rng) * (mag == 0 ? 1.f : mag));
      std::vector<uint8_t> bulk(xs.size());
      quantize_group(f, xs.data(), static_cast<int64_t>(xs.size()), p, G, bulk.data());
      const elem::Coder coder(f.spec(), p, G);
      for (size_t i = 0; i < xs.size(); ++i) {
        const uint8_t c = coder.code(xs[i]);
        ASSERT_EQ(c, bulk[i]) << f.describe() << " x=" << xs[i] << " scale=" << p.scale;
        ASSERT_EQ(c, qref::code(f, xs[i], {p.scale, p.zero}, G)) << f.describe() << " x=" << xs[i];
        ASSERT_EQ(c, quantize_element(f, xs[i], p, G));
        ASSERT_TRUE(same(elem::value(f.spec(), c, p, G), qref::value(f, c, {p.scale, p.zero}, G)));
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 50000u);
}

TEST(Element, NanElementsGetTheCpuCodes) {
  // NaN weights are rejected before GPTQ and RTN, but the element code is total: the fp formats'
  // threshold comparisons are all false for NaN, so NaN gets code 0 (pinned here, scalar and bulk).
  for (const char* n : {"fp4", "nvfp4", "mxfp4", "nf4"}) {
    const Format f = Format::parse(n);
    const GroupParams p{0.5f, 0.f};
    const elem::Coder coder(f.spec(), p, 1.f);
    float x[16];
    for (float& v : x) v = NAN;
    uint8_t bulk[16];
    quantize_group(f, x, 16, p, 1.f, bulk);
    EXPECT_EQ(coder.code(NAN), 0) << n;
    EXPECT_EQ(bulk[0], 0) << n;
  }
}

TEST(Element, ClipSearchAndErrorMatchCpu) {
  std::mt19937 rng(8);
  std::normal_distribution<float> nd(0.f, 0.02f);
  for (const Format& f : all_formats()) {
    for (float norm : {2.f, 1.f, 2.4f}) {
      for (int iter = 0; iter < 10; ++iter) {
        const int n = f.group_size;
        std::vector<float> x(static_cast<size_t>(n));
        for (auto& v : x) v = nd(rng) * (iter == 0 ? 100.f : 1.f);
        if (iter == 1) x[3] = 0.5f;  // one outlier: the search clips
        const float G = f.family == Family::NVFP4 ? 300.f : 1.f;
        const GroupParams p = group_params(f, x.data(), n, 0.8f, G);
        // The element-by-element error (device) and the CPU's bulk error: the same double.
        const double dev = elem::group_error(f.spec(), x.data(), n, p, G, norm);
        const double cpu = group_error(f, x.data(), n, p, G, norm);
        ASSERT_EQ(dev, cpu) << f.describe() << " norm " << norm;
        EXPECT_NEAR(dev, qref::group_error(f, x.data(), n, {p.scale, p.zero}, G, norm), 1e-12 * (1 + dev));
        // The clip search with the device error and with the CPU's (gptq_choose_params).
        GptqOptions o;
        o.clip_search = true;
        o.clip_norm = norm;
        float mn, mx;
        elem::min_max(x.data(), n, 1, &mn, &mx);
        const GroupParams d = elem::choose_params(f.spec(), mn, mx, true, o.clip_grid, o.clip_min, G,
                                                  [&](const GroupParams& q) {
                                                    return elem::group_error(f.spec(), x.data(), n, q, G, norm);
                                                  });
        std::vector<float> scratch;
        const GroupParams c = detail::gptq_choose_params(f, x.data(), n, 1, o, G, scratch);
        ASSERT_EQ(bits(d.scale), bits(c.scale)) << f.describe();
        ASSERT_EQ(d.zero, c.zero) << f.describe();
      }
    }
  }
}

}  // namespace
