// Scalar dtype conversions against references written here from the format definitions:
// decoders from sign/exponent/mantissa fields, encoders by searching the nearest representable
// value (ties to the even code), exhaustively over every code of the small formats.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "calq/core/dtype.h"
#include "calq/core/error.h"

using namespace calq;

namespace {

struct Fmt {
  int ebits, mbits, bias;
  bool ieee_specials;  // top exponent = Inf/NaN (fp16, e5m2); e4m3fn: only S.1111.111 is NaN
  bool fn_nan;         // e4m3fn
};
constexpr Fmt kF16{5, 10, 15, true, false};
constexpr Fmt kBF16{8, 7, 127, true, false};
constexpr Fmt kE5M2{5, 2, 15, true, false};
constexpr Fmt kE4M3{4, 3, 7, false, true};
constexpr Fmt kE2M1{2, 1, 1, false, false};

// Reference decoder from the fields.
double ref_decode(uint32_t code, const Fmt& f) {
  int nbits = 1 + f.ebits + f.mbits;
  uint32_t s = (code >> (nbits - 1)) & 1;
  uint32_t e = (code >> f.mbits) & ((1u << f.ebits) - 1);
  uint32_t m = code & ((1u << f.mbits) - 1);
  uint32_t emax = (1u << f.ebits) - 1;
  double v;
  if (f.ieee_specials && e == emax) v = m ? NAN : INFINITY;
  else if (f.fn_nan && e == emax && m == (1u << f.mbits) - 1) v = NAN;
  else if (e == 0) v = std::ldexp(static_cast<double>(m), 1 - f.bias - f.mbits);
  else v = std::ldexp(static_cast<double>((1u << f.mbits) + m), static_cast<int>(e) - f.bias - f.mbits);
  return s ? -v : v;
}

// All finite non-negative (code, value) pairs of a format, ascending by value.
std::vector<std::pair<uint32_t, double>> positive_values(const Fmt& f) {
  std::vector<std::pair<uint32_t, double>> v;
  uint32_t half = 1u << (f.ebits + f.mbits);
  for (uint32_t c = 0; c < half; ++c) {
    double d = ref_decode(c, f);
    if (std::isfinite(d)) v.push_back({c, d});
  }
  std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second < b.second; });
  return v;
}

// Reference encoder: nearest finite value (ties: even code); beyond max by at least half an ulp
// of the next binade (RNE overflow), `overflow` decides. Returns the magnitude code or ~0u for
// "overflows".
uint32_t ref_encode_mag(double ax, const std::vector<std::pair<uint32_t, double>>& vals, const Fmt& f) {
  double maxv = vals.back().second;
  // The value RNE would round to just past max: max + one ulp at max's binade.
  double ulp = std::ldexp(1.0, std::ilogb(maxv) - f.mbits);
  if (ax > maxv) {
    double mid = maxv + ulp / 2;
    uint32_t max_code = vals.back().first;
    bool max_even = (max_code & 1) == 0;
    if (ax > mid || (ax == mid && !max_even)) return ~0u;
    return max_code;
  }
  auto it = std::lower_bound(vals.begin(), vals.end(), ax, [](auto& p, double x) { return p.second < x; });
  if (it->second == ax) return it->first;
  auto lo = it - 1;
  double dl = ax - lo->second, dh = it->second - ax;
  if (dl < dh) return lo->first;
  if (dh < dl) return it->first;
  return (lo->first & 1) == 0 ? lo->first : it->first;
}

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2, DType::F8_E8M0,
                  DType::F4_E2M1, DType::I64, DType::I32, DType::I16, DType::I8, DType::U64, DType::U32, DType::U16,
                  DType::U8, DType::BOOL}) {
    auto back = dtype_from_name(dtype_name(t));
    ASSERT_TRUE(back.has_value()) << dtype_name(t);
    EXPECT_EQ(*back, t);
  }
  EXPECT_FALSE(dtype_from_name("F7").has_value());
  EXPECT_FALSE(dtype_from_name("").has_value());
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::F8_E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
}

template <typename Dec>
void check_decode_all(const Fmt& f, int nbits, Dec dec) {
  for (uint32_t c = 0; c < (1u << nbits); ++c) {
    double r = ref_decode(c, f);
    float got = dec(c);
    if (std::isnan(r)) EXPECT_TRUE(std::isnan(got)) << "code " << c;
    else EXPECT_EQ(static_cast<double>(got), r) << "code " << c;
  }
}

TEST(DType, DecodeEveryCode) {
  check_decode_all(kE2M1, 4, [](uint32_t c) { return e2m1_to_f32(static_cast<uint8_t>(c)); });
  check_decode_all(kE4M3, 8, [](uint32_t c) { return e4m3_to_f32(static_cast<uint8_t>(c)); });
  check_decode_all(kE5M2, 8, [](uint32_t c) { return e5m2_to_f32(static_cast<uint8_t>(c)); });
  check_decode_all(kF16, 16, [](uint32_t c) { return f16_to_f32(static_cast<uint16_t>(c)); });
  check_decode_all(kBF16, 16, [](uint32_t c) { return bf16_to_f32(static_cast<uint16_t>(c)); });
  for (uint32_t e = 0; e < 255; ++e) EXPECT_EQ(static_cast<double>(e8m0_to_f32(static_cast<uint8_t>(e))), std::ldexp(1.0, static_cast<int>(e) - 127));
  EXPECT_TRUE(std::isnan(e8m0_to_f32(255)));
}

// Interesting inputs around every representable value of a format: the value, the midpoints to
// its neighbours, and one fp32 ulp either side of those.
std::vector<float> probes(const std::vector<std::pair<uint32_t, double>>& vals) {
  std::vector<float> out;
  auto push = [&](double d) {
    float f = static_cast<float>(d);
    if (static_cast<double>(f) != d) return;  // only exactly representable probes
    out.push_back(f);
    out.push_back(std::nextafter(f, INFINITY));
    out.push_back(std::nextafter(f, -INFINITY));
  };
  for (size_t i = 0; i < vals.size(); ++i) {
    push(vals[i].second);
    if (i + 1 < vals.size()) push((vals[i].second + vals[i + 1].second) / 2);
  }
  double maxv = vals.back().second;
  for (double k : {1.0 + 1e-7, 1.03, 1.0625, 1.07, 1.2, 2.0, 1e3}) push(maxv * k);
  return out;
}

// Checks an encoder against the reference for x and -x; `on_overflow` is the expected code for
// a magnitude past the rounding limit (with the sign bit added by the caller's convention).
template <typename Enc>
void check_encode(const Fmt& f, int nbits, Enc enc, uint32_t overflow_mag, const std::vector<float>& xs) {
  auto vals = positive_values(f);
  uint32_t sign = 1u << (nbits - 1);
  for (float x : xs) {
    for (float v : {x, -x}) {
      uint32_t mag = ref_encode_mag(std::fabs(static_cast<double>(v)), vals, f);
      if (mag == ~0u) mag = overflow_mag;
      uint32_t want = mag | (std::signbit(v) ? sign : 0);
      EXPECT_EQ(enc(v), want) << "x = " << v;
    }
  }
}

TEST(DType, EncodeSmallFormatsExhaustively) {
  auto e2 = probes(positive_values(kE2M1));
  check_encode(kE2M1, 4, [](float x) { return static_cast<uint32_t>(f32_to_e2m1(x)); }, 7, e2);
  auto e4 = probes(positive_values(kE4M3));
  check_encode(kE4M3, 8, [](float x) { return static_cast<uint32_t>(f32_to_e4m3(x, true)); }, 0x7E, e4);
  check_encode(kE4M3, 8, [](float x) { return static_cast<uint32_t>(f32_to_e4m3(x, false)); }, 0x7F, e4);
  auto e5 = probes(positive_values(kE5M2));
  check_encode(kE5M2, 8, [](float x) { return static_cast<uint32_t>(f32_to_e5m2(x, false)); }, 0x7C, e5);
  check_encode(kE5M2, 8, [](float x) { return static_cast<uint32_t>(f32_to_e5m2(x, true)); }, 0x7B, e5);
  auto h = probes(positive_values(kF16));
  check_encode(kF16, 16, [](float x) { return static_cast<uint32_t>(f32_to_f16(x)); }, 0x7C00, h);
  auto b = probes(positive_values(kBF16));
  check_encode(kBF16, 16, [](float x) { return static_cast<uint32_t>(f32_to_bf16(x)); }, 0x7F80, b);
}

TEST(DType, EncodeRandomBitPatterns) {
  std::mt19937 rng(1234);
  std::vector<float> xs;
  for (int i = 0; i < 200000; ++i) {
    float f = std::bit_cast<float>(static_cast<uint32_t>(rng()));
    if (std::isfinite(f)) xs.push_back(std::fabs(f));
  }
  // Concentrate half the probes on the ranges where the small formats live.
  std::uniform_real_distribution<float> u(-30.f, 20.f);
  for (int i = 0; i < 200000; ++i) xs.push_back(std::ldexp(1.f + std::fabs(u(rng)) / 30.f, static_cast<int>(u(rng))));
  check_encode(kF16, 16, [](float x) { return static_cast<uint32_t>(f32_to_f16(x)); }, 0x7C00, xs);
  check_encode(kBF16, 16, [](float x) { return static_cast<uint32_t>(f32_to_bf16(x)); }, 0x7F80, xs);
  check_encode(kE4M3, 8, [](float x) { return static_cast<uint32_t>(f32_to_e4m3(x, true)); }, 0x7E, xs);
  check_encode(kE5M2, 8, [](float x) { return static_cast<uint32_t>(f32_to_e5m2(x, false)); }, 0x7C, xs);
  check_encode(kE2M1, 4, [](float x) { return static_cast<uint32_t>(f32_to_e2m1(x)); }, 7, xs);
}

TEST(DType, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(f32_to_f16(inf), 0x7C00);
  EXPECT_EQ(f32_to_f16(-inf), 0xFC00);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(nan))));
  EXPECT_EQ(f32_to_bf16(-inf), 0xFF80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(nan))));
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7F800001u)) & 0x7F80, 0x7F80);  // signalling NaN stays NaN
  EXPECT_NE(f32_to_bf16(std::bit_cast<float>(0x7F800001u)) & 0x7F, 0);
  EXPECT_EQ(f32_to_e4m3(inf, true), 0x7E);
  EXPECT_EQ(f32_to_e4m3(-inf, true), 0xFE);
  EXPECT_EQ(f32_to_e4m3(inf, false), 0x7F);
  EXPECT_EQ(f32_to_e4m3(nan, true) & 0x7F, 0x7F);
  EXPECT_EQ(f32_to_e4m3(464.f, false), 0x7E);  // tie between 448 (even) and 480: 448
  EXPECT_EQ(f32_to_e4m3(464.0001f, false), 0x7F);
  EXPECT_EQ(f32_to_e5m2(inf, false), 0x7C);
  EXPECT_EQ(f32_to_e5m2(inf, true), 0x7B);
  EXPECT_EQ(f32_to_e5m2(nan, false) & 0x7F, 0x7F);
  EXPECT_EQ(f32_to_e2m1(inf), 7);
  EXPECT_EQ(f32_to_e2m1(-inf), 15);
  EXPECT_EQ(f32_to_e2m1(nan), 0);
  EXPECT_EQ(f32_to_e2m1(-0.1f), 8);  // magnitude 0 keeps the sign
  EXPECT_EQ(f32_to_e2m1(0.25f), 0);
  EXPECT_EQ(f32_to_e2m1(0.75f), 2);
  EXPECT_EQ(f32_to_e2m1(5.f), 6);
  EXPECT_EQ(f32_to_f16(-0.f), 0x8000);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.f, -25)), 0);         // half the smallest subnormal: tie to 0
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 1);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.f, -10), true), 0);  // tie between 0 and 2^-9: even (0)
  EXPECT_EQ(f32_to_e4m3(std::ldexp(3.f, -10), true), 2);  // tie between 2^-9 and 2^-8: even
}

TEST(DType, E8M0Rounding) {
  EXPECT_EQ(f32_to_e8m0(1.f, E8M0Round::Floor), 127);
  EXPECT_EQ(f32_to_e8m0(1.f, E8M0Round::Ceil), 127);
  EXPECT_EQ(f32_to_e8m0(3.f, E8M0Round::Floor), 128);
  EXPECT_EQ(f32_to_e8m0(3.f, E8M0Round::Ceil), 129);
  EXPECT_EQ(f32_to_e8m0(3.f, E8M0Round::Nearest), 129);   // 3 = 1.5 * 2: ties go up
  EXPECT_EQ(f32_to_e8m0(2.9f, E8M0Round::Nearest), 128);
  EXPECT_EQ(f32_to_e8m0(std::ldexp(1.f, -140), E8M0Round::Floor), 0);  // clamped
  EXPECT_EQ(f32_to_e8m0(std::ldexp(1.f, 127), E8M0Round::Ceil), 254);
  EXPECT_THROW(f32_to_e8m0(0.f, E8M0Round::Floor), Error);
  EXPECT_THROW(f32_to_e8m0(-1.f, E8M0Round::Floor), Error);
  EXPECT_THROW(f32_to_e8m0(NAN, E8M0Round::Floor), Error);
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(-100, 100);
  for (int i = 0; i < 10000; ++i) {
    float x = static_cast<float>(std::exp2(u(rng)));
    double lx = std::log2(static_cast<double>(x));
    EXPECT_EQ(f32_to_e8m0(x, E8M0Round::Floor), static_cast<int>(std::floor(lx)) + 127) << x;
    EXPECT_EQ(f32_to_e8m0(x, E8M0Round::Ceil), static_cast<int>(std::ceil(lx)) + 127) << x;
  }
}

TEST(DType, BulkMatchesScalar) {
  std::mt19937 rng(99);
  std::normal_distribution<float> n(0.f, 3.f);
  std::vector<float> x(4099);
  for (auto& v : x) v = n(rng);
  x[0] = 1e30f;
  x[1] = -0.f;
  x[2] = 1e-30f;
  for (DType t : {DType::BF16, DType::F16, DType::F8_E4M3, DType::F8_E5M2, DType::F32}) {
    std::vector<uint8_t> buf(x.size() * dtype_size(t));
    from_f32(x.data(), t, buf.data(), x.size());
    std::vector<float> back(x.size());
    to_f32(buf.data(), t, back.data(), x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      float want;
      switch (t) {
        case DType::BF16: want = bf16_to_f32(f32_to_bf16(x[i])); break;
        case DType::F16: want = f16_to_f32(f32_to_f16(x[i])); break;
        case DType::F8_E4M3: want = e4m3_to_f32(f32_to_e4m3(x[i], true)); break;
        case DType::F8_E5M2: want = e5m2_to_f32(f32_to_e5m2(x[i], false)); break;
        default: want = x[i];
      }
      ASSERT_EQ(std::bit_cast<uint32_t>(back[i]), std::bit_cast<uint32_t>(want)) << dtype_name(t) << " " << i;
    }
  }
  std::vector<float> out(2);
  uint8_t dummy[8] = {};
  EXPECT_THROW(to_f32(dummy, DType::I32, out.data(), 2), Error);
  EXPECT_THROW(from_f32(out.data(), DType::U8, dummy, 2), Error);
}

}  // namespace
