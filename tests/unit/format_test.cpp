// Element formats and RTN against a straightforward reference quantizer written here from
// docs/format.md: scales by the documented formulas, codes by brute force over every code
// (nearest decoded value, the documented tie rule), on random and adversarial groups.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>

#include "calq/core/error.h"
#include "calq/quant/format.h"
#include "calq/quant/layout.h"
#include "calq/quant/rtn.h"

using namespace calq;
using namespace calq::quant;

namespace {

const double kE2M1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};
const double kNF4[16] = {-1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                         0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                         0.7229568362236023, 1};

float fp16r(double v) { return f16_to_f32(f32_to_f16(static_cast<float>(std::min(v, 65504.0)))); }

struct RefGroup {
  float scale = 0, zero = 0;
  std::vector<uint8_t> codes;
};

// Reference scale and zero point (docs/format.md section 2).
RefGroup ref_params(const Format& f, const std::vector<float>& x, double shrink, float global) {
  RefGroup g;
  double amax = 0, lo = 0, hi = 0;
  for (float v : x) {
    amax = std::max(amax, std::fabs(static_cast<double>(v)));
    lo = std::min(lo, static_cast<double>(v));
    hi = std::max(hi, static_cast<double>(v));
  }
  amax = static_cast<float>(amax) * shrink;
  int b = f.bits;
  switch (f.family) {
    case Family::Int:
      if (f.symmetric) {
        g.scale = fp16r(amax / ((1 << (b - 1)) - 1));
        g.zero = static_cast<float>(1 << (b - 1));
      } else {
        double l = static_cast<float>(lo) * shrink, h = static_cast<float>(hi) * shrink;
        g.scale = fp16r((h - l) / ((1 << b) - 1));
        double z = 0;
        if (g.scale > 0) z = std::clamp(-std::ldexp(1.0, b - 1) - std::nearbyint(l / g.scale), -std::ldexp(1.0, b - 1), std::ldexp(1.0, b - 1) - 1);
        g.zero = static_cast<float>(z + std::ldexp(1.0, b - 1));
      }
      break;
    case Family::FP4: g.scale = fp16r(amax / 6); break;
    case Family::NF4: g.scale = fp16r(amax); break;
    case Family::NVFP4: g.scale = e4m3_to_f32(f32_to_e4m3(static_cast<float>(amax * global / 6), true)); break;
    case Family::MXFP4: {
      int e = amax > 0 ? static_cast<int>(std::floor(std::log2(static_cast<float>(amax)))) - 2 : -127;
      g.scale = static_cast<float>(std::ldexp(1.0, std::clamp(e, -127, 127)));
      break;
    }
    case Family::FP8: g.scale = static_cast<float>(amax / 448); break;
  }
  return g;
}

double ref_value(const Format& f, unsigned c, const RefGroup& g, float global) {
  switch (f.family) {
    case Family::Int: return (static_cast<double>(c) - g.zero) * g.scale;
    case Family::FP4: case Family::MXFP4: return kE2M1[c] * g.scale;
    case Family::NVFP4: return kE2M1[c] * static_cast<double>(g.scale / global);
    case Family::NF4: return kNF4[c] * g.scale;
    case Family::FP8: return static_cast<double>(e4m3_to_f32(static_cast<uint8_t>(c))) * g.scale;
  }
  return 0;
}

// Brute force: the code whose value is nearest; ties per format.
uint8_t ref_code(const Format& f, float x, const RefGroup& g, float global) {
  if (g.scale == 0) return f.family == Family::Int ? static_cast<uint8_t>(g.zero) : f.family == Family::NF4 ? 7 : 0;
  if (f.family == Family::FP8) {
    // fp8: y = fp32(x / s), then nearest E4M3 (ties: even code), saturating.
    float y = x / g.scale;
    int best = -1;
    double bd = INFINITY;
    for (int c = 0; c < 256; ++c) {
      double v = e4m3_to_f32(static_cast<uint8_t>(c));
      if (std::isnan(v) || std::signbit(v) != std::signbit(y)) continue;
      double d = std::fabs(v - y);
      if (d < bd || (d == bd && (c & 1) == 0)) { bd = d; best = c; }
    }
    return static_cast<uint8_t>(best);
  }
  int n = 1 << f.bits;
  int best = -1;
  double bd = INFINITY;
  for (int c = 0; c < n; ++c) {
    if ((f.family == Family::FP4 || f.family == Family::NVFP4 || f.family == Family::MXFP4) && c == 8) continue;  // -0 never used
    double v = ref_value(f, static_cast<unsigned>(c), g, global);
    double d = std::fabs(v - static_cast<double>(x));
    bool tie_pref = false;
    if (d == bd) {
      if (f.family == Family::Int) tie_pref = ((c - static_cast<int>(g.zero)) % 2) == 0;
      else if (f.family == Family::NF4) tie_pref = std::fabs(kNF4[c]) < std::fabs(kNF4[best]);
      else tie_pref = (c & 1) == 0;
    }
    if (d < bd || tie_pref) { bd = d; best = c; }
  }
  return static_cast<uint8_t>(best);
}

struct RefResult {
  std::vector<uint8_t> codes;
  std::vector<RefGroup> groups;
  float global = 1;
};

RefResult ref_quantize(const std::vector<float>& w, int64_t R, int64_t C, const Format& f, const RtnOptions& o) {
  RefResult res;
  if (f.family == Family::NVFP4) {
    double amax = 0;
    for (float v : w) amax = std::max(amax, std::fabs(static_cast<double>(v)));
    res.global = amax > 0 ? static_cast<float>(448.0 * 6.0 / amax) : 1.f;
  }
  int64_t g = f.group_size < 0 ? C : f.group_size;
  res.codes.resize(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < C / g; ++k) {
      std::vector<float> x(w.begin() + r * C + k * g, w.begin() + r * C + k * g + g);
      auto quant = [&](double shrink, double* err) {
        RefGroup p = ref_params(f, x, shrink, res.global);
        p.codes.resize(x.size());
        double e = 0;
        for (size_t i = 0; i < x.size(); ++i) {
          p.codes[i] = ref_code(f, x[i], p, res.global);
          double d = static_cast<double>(x[i]) - static_cast<float>(ref_value(f, p.codes[i], p, res.global));
          e += std::pow(std::fabs(d), o.clip_norm);
        }
        *err = e;
        return p;
      };
      double best_err;
      RefGroup best = quant(1.0, &best_err);
      if (o.clip_search)
        for (int i = 1; i < o.clip_grid; ++i) {
          double e;
          float s = 1.f - static_cast<float>(i) * (1.f - o.clip_min) / static_cast<float>(o.clip_grid - 1);
          RefGroup cand = quant(s, &e);
          if (e < best_err) { best_err = e; best = cand; }
        }
      for (int64_t i = 0; i < g; ++i) res.codes[r * C + k * g + i] = best.codes[i];
      res.groups.push_back(best);
    }
  return res;
}

std::vector<Format> formats_under_test() {
  std::vector<Format> v;
  for (const char* n : {"int2", "int3", "int4", "int8"})
    for (bool sym : {true, false})
      for (int g : {16, 64, -1}) v.push_back(Format::parse(n, g, sym));
  for (int g : {32, 128}) {
    v.push_back(Format::parse("fp4", g));
    v.push_back(Format::parse("nf4", g));
    v.push_back(Format::parse("fp8", g));
  }
  v.push_back(Format::parse("fp8", -1));
  v.push_back(Format::parse("nvfp4"));
  v.push_back(Format::parse("mxfp4"));
  return v;
}

// Matrices with the adversarial cases in separate rows.
std::vector<float> test_matrix(int64_t R, int64_t C, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> w(static_cast<size_t>(R * C));
  for (auto& v : w) v = n(rng) * 0.02f;
  for (int64_t c = 0; c < C; ++c) {
    w[1 * C + c] = 0.f;                                     // all zero
    w[2 * C + c] = c == 5 ? -0.7f : 0.f;                    // one nonzero
    w[3 * C + c] = static_cast<float>((c % 7) - 3) * 1e-40f;  // denormals
    w[4 * C + c] = (c % 2 ? -0.f : 0.f) + (c % 3 == 0 ? 0.5f * static_cast<float>(c % 5) : 0.f);
    // ties: multiples of a quarter (midpoints of many grids at scale 0.5, 1, ...)
    w[5 * C + c] = 0.25f * static_cast<float>(static_cast<int>(c % 29) - 14);
    w[6 * C + c] = c == 3 ? 1e6f : n(rng);                  // huge outlier (fp16 scale clamp)
    w[7 * C + c] = n(rng) * (c % 16 == 0 ? 1e4f : 1e-3f);   // outliers every 16
  }
  return w;
}

void compare(const QuantizedWeight& q, const RefResult& ref, const Format& f, const std::string& label) {
  ASSERT_EQ(q.codes.size(), ref.codes.size());
  ASSERT_EQ(q.params.size(), ref.groups.size());
  if (f.family == Family::NVFP4) EXPECT_EQ(std::bit_cast<uint32_t>(q.global_scale), std::bit_cast<uint32_t>(ref.global)) << label;
  for (size_t i = 0; i < q.params.size(); ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(q.params[i].scale), std::bit_cast<uint32_t>(ref.groups[i].scale))
        << label << " group " << i << ": " << q.params[i].scale << " vs " << ref.groups[i].scale;
    ASSERT_EQ(q.params[i].zero, ref.groups[i].zero) << label << " group " << i;
  }
  for (size_t i = 0; i < q.codes.size(); ++i)
    ASSERT_EQ(q.codes[i], ref.codes[i]) << label << " element " << i << " (row " << i / q.cols << ")";
}

TEST(Format, RtnMatchesReferenceBitForBit) {
  const int64_t R = 9, C = 256;
  auto w = test_matrix(R, C, 1);
  for (const auto& f : formats_under_test()) {
    RtnOptions o;
    auto q = rtn_quantize(w.data(), R, C, f, o);
    compare(q, ref_quantize(w, R, C, f, o), f, f.describe());
  }
}

TEST(Format, ClipSearchMatchesReference) {
  const int64_t R = 9, C = 128;
  auto w = test_matrix(R, C, 2);
  for (const auto& f : formats_under_test()) {
    RtnOptions o;
    o.clip_search = true;
    o.clip_grid = 7;
    o.clip_min = 0.4f;
    auto q = rtn_quantize(w.data(), R, C, f, o);
    compare(q, ref_quantize(w, R, C, f, o), f, f.describe() + " clip");
    // The search never does worse than absmax.
    RtnOptions plain;
    auto q0 = rtn_quantize(w.data(), R, C, f, plain);
    auto d = q.dequantize(), d0 = q0.dequantize();
    const int64_t g = f.group_len(C);
    for (int64_t grp = 0; grp < R * C / g; ++grp) {
      double e = 0, e0 = 0;
      for (int64_t i = grp * g; i < grp * g + g; ++i) {
        e += std::pow(w[i] - d[i], 2);
        e0 += std::pow(w[i] - d0[i], 2);
      }
      EXPECT_LE(e, e0 * (1 + 1e-12) + 1e-300) << f.describe() << " group " << grp;
    }
  }
}

TEST(Format, ExactTies) {
  // int4 sym: amax 3.5 gives scale fp16(0.5); values at odd multiples of 0.25 are ties.
  Format f = Format::parse("int4", 16);
  std::vector<float> x = {3.5f, 0.25f, 0.75f, -0.25f, -0.75f, 1.25f, -1.25f, 2.75f, 0, 0, 0, 0, 0, 0, 0, 0};
  auto q = rtn_quantize(x.data(), 1, 16, f, {});
  EXPECT_EQ(q.params[0].scale, 0.5f);
  // x/s = 7, 0.5, 1.5, -0.5, -1.5, 2.5, -2.5, 5.5 -> RNE 7, 0, 2, -0, -2, 2, -2, 6 (+8 offset)
  std::vector<uint8_t> want = {15, 8, 10, 8, 6, 10, 6, 14};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(q.codes[i], want[i]) << i;
  // fp4: amax 6 gives scale 1; the E2M1 midpoints.
  Format g = Format::parse("fp4", 16);
  std::vector<float> y = {6, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5, -0.25f, -5, -0.1f, 0, 0, 0, 0, 0};
  auto p = rtn_quantize(y.data(), 1, 16, g, {});
  std::vector<uint8_t> wy = {7, 0, 2, 2, 4, 4, 6, 6, 0, 14, 0};
  for (size_t i = 0; i < wy.size(); ++i) EXPECT_EQ(p.codes[i], wy[i]) << i;
}

TEST(Format, PackUnpackRoundTripAndLayout) {
  const int64_t R = 19, C = 192;  // R not a multiple of the int pack factor
  auto w = test_matrix(R, C, 3);
  for (const auto& f0 : formats_under_test()) {
    Format f = f0;
    if (f.group_size > 0 && C % f.group_size != 0) continue;
    auto q = rtn_quantize(w.data(), R, C, f, {});
    auto packed = pack(q);
    auto layout = packed_layout(f, R, C);
    ASSERT_EQ(packed.size(), layout.size()) << f.describe();
    std::map<std::string, TensorView> views;
    for (const auto& d : layout) {
      ASSERT_TRUE(packed.count(d.suffix)) << f.describe() << " " << d.suffix;
      EXPECT_EQ(packed[d.suffix].dtype, d.dtype) << f.describe() << " " << d.suffix;
      EXPECT_EQ(packed[d.suffix].shape, d.shape) << f.describe() << " " << d.suffix;
      views[d.suffix] = packed[d.suffix].view();
    }
    auto u = unpack(f, views, "m");
    EXPECT_EQ(u.codes, q.codes) << f.describe();
    ASSERT_EQ(u.params.size(), q.params.size());
    for (size_t i = 0; i < u.params.size(); ++i) {
      EXPECT_EQ(u.params[i].scale, q.params[i].scale) << f.describe();
      EXPECT_EQ(u.params[i].zero, q.params[i].zero) << f.describe();
    }
    EXPECT_EQ(u.dequantize(), q.dequantize()) << f.describe();
    // A wrong shape or dtype, or a missing tensor, is an error naming the module.
    auto bad = views;
    bad.erase("weight_scale");
    EXPECT_THROW(unpack(f, bad, "m"), Error);
    auto t = packed["weight_scale"];
    t.shape[0] += 1;
    bad = views;
    bad["weight_scale"] = t.view();
    EXPECT_THROW(unpack(f, bad, "m"), Error);
  }
}

TEST(Format, BitsPerWeight) {
  EXPECT_DOUBLE_EQ(Format::parse("int4", 128).bits_per_weight(), 4.125);
  EXPECT_DOUBLE_EQ(Format::parse("int4", 128, false).bits_per_weight(), 4.15625);
  EXPECT_DOUBLE_EQ(Format::parse("int3", 128).bits_per_weight(), 3.2 + 0.125);
  EXPECT_DOUBLE_EQ(Format::parse("int8", -1).bits_per_weight(), 8.0);
  EXPECT_DOUBLE_EQ(Format::parse("nvfp4").bits_per_weight(), 4.5);
  EXPECT_DOUBLE_EQ(Format::parse("mxfp4").bits_per_weight(), 4.25);
  EXPECT_DOUBLE_EQ(Format::parse("nf4", 64).bits_per_weight(), 4.25);
  EXPECT_DOUBLE_EQ(Format::parse("fp4").bits_per_weight(), 4.125);
  EXPECT_DOUBLE_EQ(Format::parse("fp8").bits_per_weight(), 8.0);
  EXPECT_DOUBLE_EQ(Format::parse("fp8", 128).bits_per_weight(), 8.25);
}

TEST(Format, ParseAndShapeErrors) {
  EXPECT_THROW(Format::parse("int5"), Error);
  EXPECT_THROW(Format::parse("int4", 100), Error);
  EXPECT_THROW(Format::parse("int4", 512), Error);
  EXPECT_THROW(Format::parse("int4", 8), Error);
  EXPECT_THROW(Format::parse("nvfp4", 32), Error);
  EXPECT_THROW(Format::parse("mxfp4", 16), Error);
  EXPECT_THROW(Format::parse("fp4", 128, false), Error);
  EXPECT_EQ(Format::parse("nvfp4").group_size, 16);
  EXPECT_EQ(Format::parse("fp8").group_size, -1);
  try {
    Format::parse("int4").check_shape(64, 172, "model.layers.0.mlp.down_proj");
    FAIL();
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("model.layers.0.mlp.down_proj"), std::string::npos);
    EXPECT_NE(m.find("172"), std::string::npos);
  }
  EXPECT_THROW(Format::parse("fp4", -1).check_shape(4, 7, "x"), Error);  // odd in-features, nibble packing
  std::vector<float> w(64, 0.1f);
  w[37] = NAN;
  try {
    rtn_quantize(w.data(), 2, 32, Format::parse("int4", 32), {}, "blk.q_proj.weight");
    FAIL();
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("blk.q_proj.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("[1, 5]"), std::string::npos) << m;
    EXPECT_NE(m.find("NaN"), std::string::npos) << m;
  }
  w[37] = INFINITY;
  EXPECT_THROW(rtn_quantize(w.data(), 2, 32, Format::parse("nvfp4"), {}), Error);
}

TEST(Format, WeightError) {
  std::vector<float> a = {1, 2, 3, 4}, b = {1, 2, 3, 2};
  auto e = weight_error(a.data(), b.data(), 4);
  EXPECT_DOUBLE_EQ(e.rmse, 1.0);
  EXPECT_DOUBLE_EQ(e.max_abs, 2.0);
  EXPECT_DOUBLE_EQ(e.rel_fro, 2.0 / std::sqrt(30.0));
}

}  // namespace
