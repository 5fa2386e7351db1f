// Dtype conversions against references written here from the format definitions in dtype.h, not
// from the implementation: decoders assemble each code's value from its sign/exponent/mantissa
// fields with std::ldexp; one encoder searches every code for the nearest value (exact double
// midpoint comparisons), another rounds in double arithmetic with explicit tie handling. The
// small formats are covered exhaustively (every code, every midpoint and one fp32 ulp either
// side), fp16/bf16 at every code and midpoint, and all formats with ~1M random fp32 patterns.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/core/tensor.h"

using namespace calq;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

uint32_t bits_of(float x) { return std::bit_cast<uint32_t>(x); }
float float_of(uint32_t u) { return std::bit_cast<float>(u); }
float up(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float down(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }

// ---- format descriptions, taken from the comment in dtype.h ----

enum class Specials {
  Ieee,  // top exponent field: mantissa 0 = Inf, else NaN (fp16, bf16, e5m2)
  Fn,    // no Inf; only S.1111.111 is NaN (e4m3fn)
  None,  // every code is finite (e2m1)
};

struct Format {
  const char* name;
  int ebits, mbits, bias;
  Specials specials;
  // What the documented rules produce, as magnitude codes (the sign bit is added separately):
  uint32_t nan_mag;      // for a NaN input
  bool nan_signed;       // whether a NaN input keeps its sign
  uint32_t over_mag;     // for a finite |x| whose RNE result exceeds the largest finite value
  uint32_t inf_mag;      // for ±Inf

  int nbits() const { return 1 + ebits + mbits; }
  uint32_t sign_bit() const { return 1u << (ebits + mbits); }
  uint32_t ncodes() const { return 1u << nbits(); }
};

constexpr Format kBF16{"bf16", 8, 7, 127, Specials::Ieee, 0x7FC0, true, 0x7F80, 0x7F80};
constexpr Format kF16{"f16", 5, 10, 15, Specials::Ieee, 0x7E00, true, 0x7C00, 0x7C00};
constexpr Format kE4M3Sat{"e4m3 sat", 4, 3, 7, Specials::Fn, 0x7F, true, 0x7E, 0x7E};
constexpr Format kE4M3{"e4m3", 4, 3, 7, Specials::Fn, 0x7F, true, 0x7F, 0x7F};
constexpr Format kE5M2Sat{"e5m2 sat", 5, 2, 15, Specials::Ieee, 0x7F, true, 0x7B, 0x7B};
constexpr Format kE5M2{"e5m2", 5, 2, 15, Specials::Ieee, 0x7F, true, 0x7C, 0x7C};
constexpr Format kE2M1{"e2m1", 2, 1, 1, Specials::None, 0x0, false, 0x7, 0x7};

double ref_decode(const Format& f, uint32_t code) {
  const bool negative = (code & f.sign_bit()) != 0;
  const uint32_t e = (code >> f.mbits) & ((1u << f.ebits) - 1);
  const uint32_t m = code & ((1u << f.mbits) - 1);
  const uint32_t e_top = (1u << f.ebits) - 1, m_top = (1u << f.mbits) - 1;
  double v;
  if (f.specials == Specials::Ieee && e == e_top) {
    v = m == 0 ? kInf : std::numeric_limits<double>::quiet_NaN();
  } else if (f.specials == Specials::Fn && e == e_top && m == m_top) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m), 1 - f.bias - f.mbits);
  } else {
    v = std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -f.mbits),
                   static_cast<int>(e) - f.bias);
  }
  return negative ? -v : v;
}

struct Entry {
  uint32_t code;
  double value;
};

// The positive finite codes of f in code order (which is value order: checked by a test).
std::vector<Entry> positive_finite(const Format& f) {
  std::vector<Entry> out;
  for (uint32_t c = 0; c < f.sign_bit(); ++c) {
    const double v = ref_decode(f, c);
    if (std::isfinite(v)) out.push_back({c, v});
  }
  return out;
}

constexpr uint32_t kOverflow = ~0u;

// The value just past the largest finite one if the exponent range were unbounded, which RNE
// may round to (then the overflow rule applies). Its code parity is that of max_code + 1.
Entry virtual_next(const std::vector<Entry>& vals, const Format& f) {
  const Entry& max = vals.back();
  return {max.code + 1, max.value + std::ldexp(1.0, std::ilogb(max.value) - f.mbits)};
}

// The positive finite entries of f followed by the virtual next value: the candidates of the
// brute-force search.
std::vector<Entry> candidates(const Format& f) {
  std::vector<Entry> c = positive_finite(f);
  c.push_back(virtual_next(c, f));
  return c;
}

// Reference encoder 1 (small formats): the nearest candidate, by brute force. (a + b) / 2 is
// exact in double for these formats (values span at most 2^-17 .. 2^16 with 4 significant bits),
// so x is compared with midpoints exactly. Ties go to the code with an even mantissa LSB
// (adjacent codes differ in parity). Returns kOverflow for the virtual value.
uint32_t brute_nearest(const std::vector<Entry>& cands, double ax) {
  Entry best = cands[0];
  for (const Entry& c : cands) {
    if (c.value == best.value) continue;
    const double mid = (c.value + best.value) / 2;
    const bool c_above = c.value > best.value;
    const bool better = ax == mid ? (c.code & 1) == 0 : (c_above ? ax > mid : ax < mid);
    if (better) best = c;
  }
  return best.code == cands.back().code ? kOverflow : best.code;
}

// Reference encoder 2 (any format): RNE in double arithmetic. ax (an fp32 value) is scaled so
// that the format's quantum at ax becomes 1; the scaling is by a power of two and exact, as are
// floor() and the fraction. Ties (fraction exactly 0.5) go to the even integer.
uint32_t arith_nearest(const Format& f, double max_finite, double ax) {
  if (ax == 0) return 0;
  const int emin = 1 - f.bias;
  int exp2 = 0;
  std::frexp(ax, &exp2);  // ax in [2^(exp2-1), 2^exp2)
  const int quantum_exp = std::max(exp2 - 1, emin) - f.mbits;
  const double scaled = std::ldexp(ax, -quantum_exp);
  double whole = std::floor(scaled);
  const double frac = scaled - whole;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(whole, 2.0) != 0)) whole += 1;
  const double r = std::ldexp(whole, quantum_exp);
  if (r > max_finite) return kOverflow;
  if (r < std::ldexp(1.0, emin)) return static_cast<uint32_t>(whole);  // subnormal: # of quanta
  const int e = std::ilogb(r);
  const auto mant = static_cast<uint32_t>(std::ldexp(r, f.mbits - e)) - (1u << f.mbits);
  return (static_cast<uint32_t>(e + f.bias) << f.mbits) | mant;
}

// Applies the documented NaN / Inf / sign / overflow rules around a magnitude encoder.
template <typename Nearest>
uint32_t ref_encode(const Format& f, float x, Nearest nearest) {
  const uint32_t sign = std::signbit(x) ? f.sign_bit() : 0;
  if (std::isnan(x)) return (f.nan_signed ? sign : 0) | f.nan_mag;
  const double ax = std::fabs(static_cast<double>(x));
  if (std::isinf(ax)) return sign | f.inf_mag;
  const uint32_t mag = nearest(ax);
  return sign | (mag == kOverflow ? f.over_mag : mag);
}

// The encoders under test, by format.
uint32_t encode(const Format& f, float x) {
  if (&f == &kBF16) return f32_to_bf16(x);
  if (&f == &kF16) return f32_to_f16(x);
  if (&f == &kE4M3Sat) return f32_to_e4m3(x, true);
  if (&f == &kE4M3) return f32_to_e4m3(x, false);
  if (&f == &kE5M2Sat) return f32_to_e5m2(x, true);
  if (&f == &kE5M2) return f32_to_e5m2(x, false);
  return f32_to_e2m1(x);
}

float decode(const Format& f, uint32_t code) {
  if (&f == &kBF16) return bf16_to_f32(static_cast<uint16_t>(code));
  if (&f == &kF16) return f16_to_f32(static_cast<uint16_t>(code));
  if (&f == &kE4M3Sat || &f == &kE4M3) return e4m3_to_f32(static_cast<uint8_t>(code));
  if (&f == &kE5M2Sat || &f == &kE5M2) return e5m2_to_f32(static_cast<uint8_t>(code));
  return e2m1_to_f32(static_cast<uint8_t>(code));
}

const Format* const kAllFormats[] = {&kBF16, &kF16, &kE4M3Sat, &kE4M3, &kE5M2Sat, &kE5M2, &kE2M1};
const Format* const kSmallFormats[] = {&kE4M3Sat, &kE4M3, &kE5M2Sat, &kE5M2, &kE2M1};

// fp32 probes around every positive representable value of f: the value, the midpoint to the
// next value (the virtual one past the max included), one fp32 ulp either side of both, plus
// zero, the smallest fp32 subnormal and values far beyond the range. Each is used with both signs.
std::vector<float> probes(const Format& f) {
  const std::vector<Entry> vals = candidates(f);
  std::vector<float> out = {0.0f, float_of(1), 1e-30f, 1e30f,
                            std::numeric_limits<float>::max(), std::numeric_limits<float>::min()};
  auto add = [&](double v) {
    const auto x = static_cast<float>(v);
    if (!std::isfinite(x)) return;  // bf16's virtual next value (2^128) is beyond fp32
    EXPECT_EQ(static_cast<double>(x), v) << f.name << ": probe not exact in fp32";
    out.insert(out.end(), {x, up(x), down(x)});
  };
  for (size_t i = 0; i < vals.size(); ++i) {
    add(vals[i].value);
    if (i + 1 < vals.size()) add((vals[i].value + vals[i + 1].value) / 2);
  }
  return out;
}

// Random fp32 patterns: half uniformly random bits (mostly far outside the small formats' range,
// NaNs included), half with an exponent near f's range and, half of those, the bits below f's
// mantissa set to exactly a tie (100...0) or one off it.
std::vector<float> random_inputs(const Format& f, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  const int emin = 1 - f.bias, emax = (1 << f.ebits) - 1 - f.bias;
  std::uniform_int_distribution<int> exp_dist(std::max(-149, emin - f.mbits - 3),
                                              std::min(127, emax + 2));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u = rng();
    if (i % 2 == 1) {
      const int e = exp_dist(rng);
      uint32_t mant = u & 0x7FFFFFu;
      const int drop = 23 - f.mbits;
      if (i % 4 == 3) {
        const int32_t nudge = static_cast<int32_t>(rng() % 3) - 1;
        mant = static_cast<uint32_t>(
            static_cast<int32_t>((mant & ~((1u << drop) - 1)) | (1u << (drop - 1))) + nudge);
        mant &= 0x7FFFFFu;
      }
      // e < -126 gives an fp32 subnormal: ldexp rounds, which only changes which input we test.
      const float mag = static_cast<float>(std::ldexp(1.0 + std::ldexp(mant, -23), e));
      u = bits_of(mag) | (u & 0x80000000u);
    }
    out[i] = float_of(u);
  }
  return out;
}

// Compares an encoder with a reference over inputs (and their negations), reporting the first
// few mismatches. Returns the number of mismatches.
template <typename Ref>
size_t compare_encoder(const Format& f, const std::vector<float>& xs, Ref ref) {
  size_t bad = 0;
  for (float x0 : xs) {
    for (float x : {x0, -x0}) {
      const uint32_t want = ref(x), got = encode(f, x);
      if (want != got && ++bad <= 10) {
        ADD_FAILURE() << f.name << ": x = " << x << " (bits 0x" << std::hex << bits_of(x)
                      << ") encodes to 0x" << got << ", expected 0x" << want;
      }
    }
  }
  return bad;
}

// ---- decoding ----

TEST(DTypeDecode, EveryCodeOfEveryFormat) {
  for (const Format* f : {&kBF16, &kF16, &kE4M3, &kE5M2, &kE2M1}) {
    for (uint32_t c = 0; c < f->ncodes(); ++c) {
      const double want = ref_decode(*f, c);
      const float got = decode(*f, c);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got)) << f->name << " code " << c;
        // Decoded NaNs are quiet (the fp32 quiet bit set) and keep the code's sign.
        EXPECT_NE(bits_of(got) & 0x400000u, 0u) << f->name << " code " << c;
        EXPECT_EQ(std::signbit(got), (c & f->sign_bit()) != 0) << f->name << " code " << c;
      } else {
        ASSERT_EQ(static_cast<double>(got), want) << f->name << " code " << c;
        // ±0 keep their sign.
        EXPECT_EQ(std::signbit(got), (c & f->sign_bit()) != 0) << f->name << " code " << c;
      }
    }
  }
}

TEST(DTypeDecode, CodeOrderIsValueOrder) {
  // The references above rely on positive codes being ordered by value.
  for (const Format* f : kAllFormats) {
    const std::vector<Entry> vals = positive_finite(*f);
    for (size_t i = 1; i < vals.size(); ++i) {
      ASSERT_EQ(vals[i].code, vals[i - 1].code + 1) << f->name;
      ASSERT_GT(vals[i].value, vals[i - 1].value) << f->name;
    }
  }
}

TEST(DTypeDecode, KnownValues) {
  EXPECT_EQ(e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0xFF)));
  EXPECT_EQ(e4m3_to_f32(0x78), 256.0f);  // S.1111.000 is a number in e4m3fn, not Inf
  EXPECT_EQ(e5m2_to_f32(0x7B), 57344.0f);
  EXPECT_EQ(e5m2_to_f32(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(e5m2_to_f32(0x7C), std::numeric_limits<float>::infinity());
  EXPECT_EQ(e5m2_to_f32(0xFC), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0x0001), std::ldexp(1.0f, -133));
  const float e2m1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (uint32_t c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_to_f32(static_cast<uint8_t>(c)), e2m1[c]) << c;
    EXPECT_EQ(e2m1_to_f32(static_cast<uint8_t>(c | 0xF0)), e2m1[c]) << "high bits ignored";
  }
  EXPECT_TRUE(std::signbit(e2m1_to_f32(0x8)));
}

TEST(DTypeDecode, E8M0EveryCode) {
  for (uint32_t e = 0; e < 255; ++e) {
    EXPECT_EQ(static_cast<double>(e8m0_to_f32(static_cast<uint8_t>(e))),
              std::ldexp(1.0, static_cast<int>(e) - 127))
        << e;
  }
  EXPECT_EQ(bits_of(e8m0_to_f32(0)), 0x00400000u);  // 2^-127, an fp32 subnormal
  EXPECT_TRUE(std::isnan(e8m0_to_f32(0xFF)));
}

// ---- encoding ----

TEST(DTypeEncode, EveryCodeRoundTrips) {
  for (const Format* f : kAllFormats) {
    for (uint32_t c = 0; c < f->ncodes(); ++c) {
      const float v = decode(*f, c);
      if (std::isnan(v)) {
        EXPECT_EQ(encode(*f, v), ref_encode(*f, v, [](double) { return 0u; })) << f->name << c;
      } else if (std::isinf(v)) {
        EXPECT_EQ(encode(*f, v), (c & f->sign_bit()) | f->inf_mag) << f->name << " code " << c;
      } else {
        ASSERT_EQ(encode(*f, v), c) << f->name << " code " << c;
      }
    }
  }
}

TEST(DTypeEncode, BruteForceAndArithmeticReferencesAgree) {
  // The arithmetic reference is used alone for fp16/bf16 and the random inputs; check it against
  // the brute-force search wherever that is affordable.
  for (const Format* f : kSmallFormats) {
    const std::vector<Entry> cands = candidates(*f);
    const double max = positive_finite(*f).back().value;
    for (float x : probes(*f)) {
      const double ax = std::fabs(static_cast<double>(x));
      ASSERT_EQ(brute_nearest(cands, ax), arith_nearest(*f, max, ax)) << f->name << " " << x;
    }
  }
}

TEST(DTypeEncode, SmallFormatsExhaustiveProbesBruteForce) {
  for (const Format* f : kSmallFormats) {
    const std::vector<Entry> cands = candidates(*f);
    const std::vector<float> xs = probes(*f);
    EXPECT_GT(xs.size(), 3u * cands.size());
    EXPECT_EQ(compare_encoder(*f, xs, [&](float x) {
      return ref_encode(*f, x, [&](double ax) { return brute_nearest(cands, ax); });
    }), 0u) << f->name;
  }
}

TEST(DTypeEncode, F16AndBF16EveryValueAndMidpoint) {
  for (const Format* f : {&kF16, &kBF16}) {
    const double max = positive_finite(*f).back().value;
    const std::vector<float> xs = probes(*f);
    EXPECT_GT(xs.size(), 150000u);
    EXPECT_EQ(compare_encoder(*f, xs, [&](float x) {
      return ref_encode(*f, x, [&](double ax) { return arith_nearest(*f, max, ax); });
    }), 0u) << f->name;
  }
}

TEST(DTypeEncode, RandomPatterns) {
  // x2 with the negations: ~1M per format; the saturating modes and e2m1 share most of their
  // rounding with a format checked in full, so they get fewer.
  uint32_t seed = 1234;
  for (const Format* f : kAllFormats) {
    const double max = positive_finite(*f).back().value;
    const bool main_format = f == &kBF16 || f == &kF16 || f == &kE4M3 || f == &kE5M2;
    const size_t n = main_format ? size_t{1} << 19 : size_t{1} << 16;
    EXPECT_EQ(compare_encoder(*f, random_inputs(*f, n, seed++), [&](float x) {
      return ref_encode(*f, x, [&](double ax) { return arith_nearest(*f, max, ax); });
    }), 0u) << f->name;
  }
}

TEST(DTypeEncode, SmallFormatsRandomBruteForce) {
  // The brute-force search is ~100 comparisons a value: fewer inputs, all in the format's range.
  uint32_t seed = 99;
  for (const Format* f : {&kE4M3Sat, &kE5M2, &kE2M1}) {
    const std::vector<Entry> cands = candidates(*f);
    std::vector<float> xs = random_inputs(*f, 1 << 15, seed++);
    std::erase_if(xs, [](float x) { return !std::isfinite(x); });
    EXPECT_EQ(compare_encoder(*f, xs, [&](float x) {
      return ref_encode(*f, x, [&](double ax) { return brute_nearest(cands, ax); });
    }), 0u) << f->name;
  }
}

const float kNaNs[] = {float_of(0x7FC00000), float_of(0xFFC00000), float_of(0x7F800001),
                       float_of(0xFF800001), float_of(0x7FFFFFFF), float_of(0xFFFFFFFF),
                       float_of(0x7F80FFFF),  // payload only in the bits bf16 drops
                       float_of(0x7FA00000)};

TEST(DTypeEncode, NaN) {
  for (float x : kNaNs) {
    const bool neg = std::signbit(x);
    EXPECT_EQ(f32_to_bf16(x), neg ? 0xFFC0 : 0x7FC0) << bits_of(x);
    EXPECT_EQ(f32_to_f16(x), neg ? 0xFE00 : 0x7E00) << bits_of(x);
    for (bool sat : {false, true}) {
      EXPECT_EQ(f32_to_e4m3(x, sat), neg ? 0xFF : 0x7F) << bits_of(x);
      EXPECT_EQ(f32_to_e5m2(x, sat), neg ? 0xFF : 0x7F) << bits_of(x);
    }
    EXPECT_EQ(f32_to_e2m1(x), 0x0) << bits_of(x);  // NaN -> +0, whatever its sign
  }
}

TEST(DTypeEncode, Infinity) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_bf16(inf), 0x7F80);
  EXPECT_EQ(f32_to_bf16(-inf), 0xFF80);
  EXPECT_EQ(f32_to_f16(inf), 0x7C00);
  EXPECT_EQ(f32_to_f16(-inf), 0xFC00);
  EXPECT_EQ(f32_to_e4m3(inf, true), 0x7E);
  EXPECT_EQ(f32_to_e4m3(-inf, true), 0xFE);
  EXPECT_EQ(f32_to_e4m3(inf, false), 0x7F);
  EXPECT_EQ(f32_to_e4m3(-inf, false), 0xFF);
  EXPECT_EQ(f32_to_e5m2(inf, false), 0x7C);
  EXPECT_EQ(f32_to_e5m2(-inf, false), 0xFC);
  EXPECT_EQ(f32_to_e5m2(inf, true), 0x7B);
  EXPECT_EQ(f32_to_e5m2(-inf, true), 0xFB);
  EXPECT_EQ(f32_to_e2m1(inf), 0x7);
  EXPECT_EQ(f32_to_e2m1(-inf), 0xF);
  // Defaults: e4m3 saturates, e5m2 does not.
  EXPECT_EQ(f32_to_e4m3(inf), 0x7E);
  EXPECT_EQ(f32_to_e5m2(inf), 0x7C);
}

TEST(DTypeEncode, SignedZero) {
  EXPECT_EQ(f32_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_e5m2(-0.0f), 0x80);
  EXPECT_EQ(f32_to_e2m1(0.0f), 0x0);
  EXPECT_EQ(f32_to_e2m1(-0.0f), 0x8);
  // Underflow to zero keeps the sign too.
  EXPECT_EQ(f32_to_f16(-1e-30f), 0x8000);
  EXPECT_EQ(f32_to_e4m3(-1e-30f), 0x80);
}

TEST(DTypeEncode, E4M3Boundaries) {
  const float p = std::ldexp(1.0f, -9);  // smallest subnormal
  EXPECT_EQ(f32_to_e4m3(p), 0x01);
  EXPECT_EQ(f32_to_e4m3(p / 2), 0x00);           // tie between 0 and 2^-9: even code 0
  EXPECT_EQ(f32_to_e4m3(up(p / 2)), 0x01);
  EXPECT_EQ(f32_to_e4m3(3 * p / 2), 0x02);       // tie between codes 1 and 2
  EXPECT_EQ(f32_to_e4m3(7.5f * p), 0x08);        // tie between the largest subnormal and 2^-6
  EXPECT_EQ(f32_to_e4m3(down(7.5f * p)), 0x07);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -6)), 0x08);
  for (bool sat : {true, false}) {
    EXPECT_EQ(f32_to_e4m3(448.0f, sat), 0x7E);
    EXPECT_EQ(f32_to_e4m3(down(448.0f), sat), 0x7E);
    EXPECT_EQ(f32_to_e4m3(up(448.0f), sat), 0x7E);
    EXPECT_EQ(f32_to_e4m3(400.0f, sat), 0x7C);   // tie between 384 (0x7C) and 416 (0x7D)
    EXPECT_EQ(f32_to_e4m3(432.0f, sat), 0x7E);   // tie between 416 (0x7D) and 448 (0x7E)
    EXPECT_EQ(f32_to_e4m3(464.0f, sat), 0x7E);   // tie with the missing 480 (odd): down to 448
    EXPECT_EQ(f32_to_e4m3(-464.0f, sat), 0xFE);
  }
  EXPECT_EQ(f32_to_e4m3(up(464.0f), true), 0x7E);
  EXPECT_EQ(f32_to_e4m3(up(464.0f), false), 0x7F);
  EXPECT_EQ(f32_to_e4m3(-up(464.0f), false), 0xFF);
  EXPECT_EQ(f32_to_e4m3(480.0f, false), 0x7F);
  EXPECT_EQ(f32_to_e4m3(1e30f, true), 0x7E);
  EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::max(), false), 0x7F);
}

TEST(DTypeEncode, E5M2Boundaries) {
  const float p = std::ldexp(1.0f, -16);
  EXPECT_EQ(f32_to_e5m2(p), 0x01);
  EXPECT_EQ(f32_to_e5m2(p / 2), 0x00);
  EXPECT_EQ(f32_to_e5m2(up(p / 2)), 0x01);
  EXPECT_EQ(f32_to_e5m2(3.5f * p), 0x04);        // tie between 3·2^-16 and 2^-14: even code 4
  EXPECT_EQ(f32_to_e5m2(57344.0f), 0x7B);
  EXPECT_EQ(f32_to_e5m2(61440.0f, false), 0x7C);  // tie between 57344 (odd) and 2^16 (Inf, even)
  EXPECT_EQ(f32_to_e5m2(down(61440.0f), false), 0x7B);
  EXPECT_EQ(f32_to_e5m2(61440.0f, true), 0x7B);
  EXPECT_EQ(f32_to_e5m2(-1e30f, true), 0xFB);
  EXPECT_EQ(f32_to_e5m2(-1e30f, false), 0xFC);
}

TEST(DTypeEncode, F16AndBF16Boundaries) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(down(65520.0f)), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // tie with 2^16: even -> Inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(f32_to_f16(up(std::ldexp(1.0f, -25))), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);  // largest subnormal/min normal tie
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  // Double rounding through bf16 or a coarser intermediate would lose the final ulp here.
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -23)), 0x3C01);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_EQ(f32_to_bf16(up(1.0f + std::ldexp(1.0f, -8))), 0x3F81);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(f32_to_bf16(float_of(0x7F7F7FFF)), 0x7F7F);  // just below the overflow tie
  EXPECT_EQ(f32_to_bf16(float_of(0x7F7F8000)), 0x7F80);  // the tie: odd max -> Inf
  EXPECT_EQ(f32_to_bf16(float_of(1)), 0x0000);            // fp32 subnormals
  EXPECT_EQ(f32_to_bf16(float_of(0x8000)), 0x0000);       // tie: even 0
  EXPECT_EQ(f32_to_bf16(float_of(0x8001)), 0x0001);
  EXPECT_EQ(f32_to_bf16(float_of(0x18000)), 0x0002);
}

TEST(DTypeEncode, E2M1Rule) {
  struct Case {
    float x;
    uint8_t code;
  };
  const Case cases[] = {
      {0.0f, 0x0}, {-0.0f, 0x8}, {0.25f, 0x0}, {-0.25f, 0x8}, {up(0.25f), 0x1}, {0.5f, 0x1},
      {0.75f, 0x2}, {down(0.75f), 0x1}, {1.25f, 0x2}, {up(1.25f), 0x3}, {1.75f, 0x4},
      {2.5f, 0x4}, {up(2.5f), 0x5}, {3.5f, 0x6}, {down(3.5f), 0x5}, {5.0f, 0x6},
      {up(5.0f), 0x7}, {6.0f, 0x7}, {7.0f, 0x7}, {1e30f, 0x7}, {-1e30f, 0xF}, {-5.0f, 0xE},
      {1e-30f, 0x0}, {-1e-30f, 0x8}, {float_of(0x80000001), 0x8},
  };
  for (const Case& c : cases) EXPECT_EQ(f32_to_e2m1(c.x), c.code) << c.x;
}

// ---- E8M0 ----

// Reference: the codes' values searched directly. Floor: the largest 2^(c-127) <= x (code 0 if
// none); Ceil: the smallest >= x (254 if none); Nearest: the nearest value, ties to the larger.
uint8_t ref_e8m0(double x, E8M0Round mode) {
  int best = -1;
  for (int c = 0; c <= 254; ++c) {
    const double v = std::ldexp(1.0, c - 127);
    switch (mode) {
      case E8M0Round::Floor:
        if (v <= x) best = c;
        break;
      case E8M0Round::Ceil:
        if (v >= x && best < 0) best = c;
        break;
      case E8M0Round::Nearest:
        // Moving from c-1 to c is an improvement when x is at or above their midpoint.
        if (c == 0 || x >= 0.75 * v) best = c;
        break;
    }
  }
  if (best < 0) best = mode == E8M0Round::Floor ? 0 : 254;
  return static_cast<uint8_t>(best);
}

TEST(DTypeE8M0, AgainstReference) {
  std::vector<float> xs = {float_of(1), float_of(0x00400000), float_of(0x00600000),
                           float_of(0x007FFFFF), std::numeric_limits<float>::min(),
                           std::numeric_limits<float>::max(), 1.0f, 1.5f, 3.0f, 0.75f};
  for (int k = -149; k <= 127; ++k) {
    const float p = std::ldexp(1.0f, k);
    xs.insert(xs.end(), {p, up(p), down(p)});
    if (k <= 126 && k >= -148) {
      const float mid = 1.5f * p;
      xs.insert(xs.end(), {mid, up(mid), down(mid)});
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    const float x = float_of(rng() & 0x7FFFFFFFu);
    if (std::isfinite(x) && x > 0) xs.push_back(x);
  }
  for (float x : xs) {
    if (x <= 0) continue;
    for (E8M0Round mode : {E8M0Round::Floor, E8M0Round::Ceil, E8M0Round::Nearest}) {
      ASSERT_EQ(f32_to_e8m0(x, mode), ref_e8m0(x, mode))
          << "x = " << x << " (0x" << std::hex << bits_of(x) << ") mode " << static_cast<int>(mode);
    }
  }
}

TEST(DTypeE8M0, KnownValues) {
  EXPECT_EQ(f32_to_e8m0(1.0f, E8M0Round::Floor), 127);
  EXPECT_EQ(f32_to_e8m0(1.0f, E8M0Round::Ceil), 127);
  EXPECT_EQ(f32_to_e8m0(1.0f, E8M0Round::Nearest), 127);
  EXPECT_EQ(f32_to_e8m0(3.0f, E8M0Round::Floor), 128);
  EXPECT_EQ(f32_to_e8m0(3.0f, E8M0Round::Ceil), 129);
  EXPECT_EQ(f32_to_e8m0(3.0f, E8M0Round::Nearest), 129);  // 1.5·2^1: tie goes up
  EXPECT_EQ(f32_to_e8m0(down(3.0f), E8M0Round::Nearest), 128);
  EXPECT_EQ(f32_to_e8m0(float_of(1), E8M0Round::Ceil), 0);      // clamped below
  EXPECT_EQ(f32_to_e8m0(float_of(0x00400001), E8M0Round::Ceil), 1);
  EXPECT_EQ(f32_to_e8m0(std::numeric_limits<float>::max(), E8M0Round::Ceil), 254);  // clamped
  for (E8M0Round mode : {E8M0Round::Floor, E8M0Round::Ceil, E8M0Round::Nearest}) {
    for (float bad : {0.0f, -0.0f, -1.0f, std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity(), float_of(0x7FC00000)}) {
      EXPECT_THROW(f32_to_e8m0(bad, mode), Error) << bad;
    }
  }
}

// ---- bulk conversions ----

// Inputs for the bulk tests: probes of every format, NaNs, random patterns; more than the
// parallel threshold in dtype.cpp so both code paths run.
std::vector<float> bulk_inputs() {
  std::vector<float> xs;
  for (const Format* f : {&kF16, &kE4M3, &kE5M2}) {
    const std::vector<float> p = probes(*f);
    xs.insert(xs.end(), p.begin(), p.end());
  }
  xs.insert(xs.end(), std::begin(kNaNs), std::end(kNaNs));
  xs.push_back(std::numeric_limits<float>::infinity());
  xs.push_back(-std::numeric_limits<float>::infinity());
  std::mt19937 rng(3);
  while (xs.size() < 400001) xs.push_back(float_of(rng()));
  return xs;
}

template <typename T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && ++bad <= 5)
      ADD_FAILURE() << what << ": element " << i << " differs";
  }
}

TEST(DTypeBulk, FromF32MatchesScalar) {
  const std::vector<float> xs = bulk_inputs();
  // Several lengths and misaligned starts, around vector-width and block boundaries.
  for (size_t offset : {size_t{0}, size_t{1}, size_t{3}}) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{33}, size_t{1000}, size_t{4099},
                     offset == 1 ? xs.size() - offset : size_t{0}}) {
      const float* src = xs.data() + offset;
      std::vector<uint16_t> bf(n), h(n), want16(n);
      from_f32(src, DType::BF16, bf.data(), n);
      for (size_t i = 0; i < n; ++i) want16[i] = f32_to_bf16(src[i]);
      expect_same_bits(bf, want16, "bf16");
      from_f32(src, DType::F16, h.data(), n);
      for (size_t i = 0; i < n; ++i) want16[i] = f32_to_f16(src[i]);
      expect_same_bits(h, want16, "f16");
      std::vector<uint8_t> e4(n), e5(n), want8(n);
      from_f32(src, DType::F8_E4M3, e4.data(), n);
      for (size_t i = 0; i < n; ++i) want8[i] = f32_to_e4m3(src[i], true);
      expect_same_bits(e4, want8, "e4m3 (saturating)");
      from_f32(src, DType::F8_E5M2, e5.data(), n);
      for (size_t i = 0; i < n; ++i) want8[i] = f32_to_e5m2(src[i], false);
      expect_same_bits(e5, want8, "e5m2 (non-saturating)");
      std::vector<float> f32(n);
      from_f32(src, DType::F32, f32.data(), n);
      expect_same_bits(f32, std::vector<float>(src, src + n), "f32");
      std::vector<double> f64(n), want64(n);
      from_f32(src, DType::F64, f64.data(), n);
      for (size_t i = 0; i < n; ++i) want64[i] = src[i];
      for (size_t i = 0; i < n; ++i) {
        if (std::isnan(src[i])) ASSERT_TRUE(std::isnan(f64[i]));
        else ASSERT_EQ(f64[i], want64[i]);
      }
    }
  }
}

TEST(DTypeBulk, ToF32MatchesScalar) {
  constexpr size_t kN = 300001;  // above the parallel threshold; every code many times
  std::vector<uint16_t> c16(kN);
  std::vector<uint8_t> c8(kN);
  for (size_t i = 0; i < kN; ++i) {
    c16[i] = static_cast<uint16_t>(i * 40503u);
    c8[i] = static_cast<uint8_t>(i * 7u);
  }
  std::mt19937 rng(5);
  std::vector<double> f64(kN);
  for (double& d : f64) d = std::bit_cast<double>((uint64_t{rng()} << 32) | rng());
  for (size_t n : {size_t{0}, size_t{5}, size_t{64}, kN}) {
    std::vector<float> got(n), want(n);
    to_f32(c16.data(), DType::BF16, got.data(), n);
    for (size_t i = 0; i < n; ++i) want[i] = bf16_to_f32(c16[i]);
    expect_same_bits(got, want, "bf16");
    to_f32(c16.data(), DType::F16, got.data(), n);
    for (size_t i = 0; i < n; ++i) want[i] = f16_to_f32(c16[i]);
    expect_same_bits(got, want, "f16");
    to_f32(c8.data(), DType::F8_E4M3, got.data(), n);
    for (size_t i = 0; i < n; ++i) want[i] = e4m3_to_f32(c8[i]);
    expect_same_bits(got, want, "e4m3");
    to_f32(c8.data(), DType::F8_E5M2, got.data(), n);
    for (size_t i = 0; i < n; ++i) want[i] = e5m2_to_f32(c8[i]);
    expect_same_bits(got, want, "e5m2");
    to_f32(want.data(), DType::F32, got.data(), n);
    expect_same_bits(got, want, "f32");
    to_f32(f64.data(), DType::F64, got.data(), n);
    for (size_t i = 0; i < n; ++i) {
      if (std::isnan(f64[i])) ASSERT_TRUE(std::isnan(got[i]));
      else ASSERT_EQ(got[i], static_cast<float>(f64[i])) << f64[i];
    }
  }
}

TEST(DTypeBulk, UnsupportedDTypesThrow) {
  float f[2] = {1, 2};
  uint8_t b[16] = {};
  for (DType t : {DType::F8_E8M0, DType::F4_E2M1, DType::I8, DType::U8, DType::I32, DType::I64,
                  DType::U16, DType::BOOL}) {
    EXPECT_THROW(to_f32(b, t, f, 2), Error) << dtype_name(t);
    EXPECT_THROW(from_f32(f, t, b, 2), Error) << dtype_name(t);
  }
  try {
    to_f32(b, DType::I8, f, 2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("I8"), std::string::npos) << e.what();
  }
}

// ---- names and sizes ----

TEST(DTypeNames, RoundTripAndSizes) {
  struct Row {
    DType t;
    const char* name;
    size_t size;
    bool is_float;
  };
  const Row rows[] = {
      {DType::F64, "F64", 8, true},         {DType::F32, "F32", 4, true},
      {DType::F16, "F16", 2, true},         {DType::BF16, "BF16", 2, true},
      {DType::F8_E4M3, "F8_E4M3", 1, true}, {DType::F8_E5M2, "F8_E5M2", 1, true},
      {DType::F8_E8M0, "F8_E8M0", 1, false}, {DType::F4_E2M1, "F4", 1, false},
      {DType::I64, "I64", 8, false},        {DType::I32, "I32", 4, false},
      {DType::I16, "I16", 2, false},        {DType::I8, "I8", 1, false},
      {DType::U64, "U64", 8, false},        {DType::U32, "U32", 4, false},
      {DType::U16, "U16", 2, false},        {DType::U8, "U8", 1, false},
      {DType::BOOL, "BOOL", 1, false},
  };
  for (const Row& r : rows) {
    EXPECT_EQ(dtype_name(r.t), r.name);
    EXPECT_EQ(dtype_from_name(r.name), r.t) << r.name;
    EXPECT_EQ(dtype_size(r.t), r.size) << r.name;
    EXPECT_EQ(dtype_is_float(r.t), r.is_float) << r.name;
  }
}

TEST(DTypeNames, Unknown) {
  for (const char* name : {"", "f32", "F8_E4M3FN", "F4_E2M1", "FP4", "E8M0", " F32", "F32 ",
                           "F", "BOOL\n", "INT8", "F8"}) {
    EXPECT_FALSE(dtype_from_name(name).has_value()) << '"' << name << '"';
  }
  EXPECT_FALSE(dtype_from_name(std::string_view("F32\0", 4)).has_value());
  EXPECT_THROW(dtype_name(static_cast<DType>(200)), Error);
  EXPECT_THROW(dtype_size(static_cast<DType>(200)), Error);
}

// ---- tensor.h ----

TEST(Tensor, ShapeNumelAndStr) {
  EXPECT_EQ(shape_numel({}), 1);
  EXPECT_EQ(shape_numel({512, 1536}), 512 * 1536);
  EXPECT_EQ(shape_numel({0, std::numeric_limits<int64_t>::max(), 3}), 0);
  EXPECT_EQ(shape_numel({int64_t{1} << 31, int64_t{1} << 31}), int64_t{1} << 62);
  EXPECT_THROW(shape_numel({int64_t{1} << 32, int64_t{1} << 31}), Error);
  EXPECT_THROW(shape_numel({std::numeric_limits<int64_t>::max(), 2}), Error);
  EXPECT_THROW(shape_numel({4, -1}), Error);
  EXPECT_EQ(shape_str({}), "[]");
  EXPECT_EQ(shape_str({7}), "[7]");
  EXPECT_EQ(shape_str({512, 1536}), "[512, 1536]");
}

TEST(Tensor, ConstructAndConvert) {
  Tensor t(DType::BF16, {2, 3});
  EXPECT_EQ(t.bytes.size(), 12u);
  EXPECT_TRUE(std::all_of(t.bytes.begin(), t.bytes.end(),
                          [](std::byte b) { return b == std::byte{0}; }));
  const uint16_t vals[6] = {0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0x3FC0};
  std::memcpy(t.bytes.data(), vals, sizeof vals);
  const std::vector<float> f = to_f32_vector(t.view());
  ASSERT_EQ(f.size(), 6u);
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], -2.0f);
  EXPECT_EQ(f[5], 1.5f);
  EXPECT_TRUE(std::isinf(f[4]));
  EXPECT_TRUE(to_f32_vector(Tensor(DType::F16, {0, 5}).view()).empty());

  TensorView short_view = t.view();
  short_view.nbytes = 10;  // shape says 12
  EXPECT_THROW(to_f32_vector(short_view), Error);
  EXPECT_THROW(to_f32_vector(Tensor(DType::I32, {2}).view()), Error);
  EXPECT_THROW(Tensor(DType::F32, {-1}), Error);
}

TEST(Tensor, Transpose) {
  const std::vector<float> m = {1, 2, 3, 4, 5, 6};  // [2, 3]
  EXPECT_EQ(transpose(m, 2, 3), (std::vector<float>{1, 4, 2, 5, 3, 6}));
  std::vector<float> big(70 * 45);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i);
  const std::vector<float> t = transpose(big, 70, 45);
  for (int64_t r = 0; r < 70; ++r)
    for (int64_t c = 0; c < 45; ++c) ASSERT_EQ(t[c * 70 + r], big[r * 45 + c]);
  EXPECT_EQ(transpose(t, 45, 70), big);
  EXPECT_THROW(transpose(m, 4, 2), Error);
}

}  // namespace
