// Element formats against a reference quantizer and a byte-level decoder written from
// docs/format.md (quant_reference.h): scales and codes bit for bit for every format, symmetric and
// asymmetric, several group sizes and per-channel, on random and adversarial weights; the packed
// tensors byte by byte; the spec's worked examples; parse/check_shape/unpack errors.
#include "calq/quant/format.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <functional>
#include <random>

#include "calq/core/error.h"
#include "calq/quant/layout.h"
#include "calq/quant/rtn.h"
#include "quant_reference.h"

using namespace calq;
using namespace calq::quant;

namespace {

uint32_t bits(float v) {
  return std::bit_cast<uint32_t>(v);
}

std::string hex(const std::vector<std::byte>& b) {
  std::string s;
  for (auto x : b) s += fmt::format("{:02X} ", static_cast<unsigned>(x));
  if (!s.empty()) s.pop_back();
  return s;
}

// Expects fn() to throw calq::Error whose message contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
  }
}

struct Weights {
  std::string name;
  int64_t R, C;
  std::vector<float> w;
};

std::vector<Weights> weight_cases() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 0.02f);
  const int64_t R = 4, C = 256;
  std::vector<Weights> out;
  auto add = [&](std::string name, auto&& gen) {
    Weights c{std::move(name), R, C, std::vector<float>(static_cast<size_t>(R * C))};
    for (int64_t i = 0; i < R * C; ++i) c.w[i] = gen(i / C, i % C);
    out.push_back(std::move(c));
  };
  add("normal", [&](int64_t, int64_t) { return nd(rng); });
  add("outliers", [&](int64_t r, int64_t c) {
    float v = nd(rng);
    return (c * 7 + r * 13) % 97 == 5 ? v * 1e4f : v;
  });
  // Row 0 all zero; row 1 its first half zero; row 2 one nonzero in every 16; row 3 one nonzero.
  add("zero-groups", [&](int64_t r, int64_t c) {
    if (r == 0 || (r == 1 && c < C / 2)) return 0.f;
    if (r == 2) return c % 16 == (c / 16) % 16 ? (c % 2 ? -1.f : 1.f) * (0.1f + c / 100.f) : 0.f;
    if (r == 3) return c == 77 ? -0.3f : 0.f;
    return nd(rng);
  });
  // fp32 subnormals (~1e-40), alone and next to normal values.
  add("denormal", [&](int64_t r, int64_t c) {
    float d = std::ldexp(static_cast<float>(rng() % 4096) - 2048.f, -149 + 4);
    if (r == 0) return d;
    if (r == 1) return c % 2 ? 1e-40f : -1e-40f;
    if (r == 2) return c == 3 ? 1.f : d;
    return d * 1e30f;
  });
  add("negative-zero", [&](int64_t r, int64_t c) {
    if (r == 0) return -0.f;
    if (r == 1) return c % 3 ? -0.f : -1e-30f;
    if (r == 2) return c % 5 ? -0.f : 0.5f;
    return -std::fabs(nd(rng));
  });
  // Beyond the fp16 scale range: the scale clamps to 65504 and the largest values clip.
  add("huge", [&](int64_t r, int64_t c) {
    if (r == 0) return nd(rng) * 5e7f;
    if (r == 1) return c == 9 ? 1e6f : nd(rng);
    if (r == 2) return c % 2 ? 1e38f : -1e38f;  // (mxfp4: 3e38 would decode to 4 * 2^126 = Inf)
    return (c % 2 ? 1.f : -1.f) * 65504.f * 8;
  });
  return out;
}

struct FormatCase {
  const char* name;
  int group;
  bool sym;
};

std::vector<FormatCase> format_cases() {
  std::vector<FormatCase> v;
  for (const char* n : {"int2", "int3", "int4", "int8"})
    for (int g : {16, 64, -1})
      for (bool sym : {true, false}) v.push_back({n, g, sym});
  v.push_back({"int4", 128, true});
  v.push_back({"int4", 128, false});
  v.push_back({"int8", 256, true});
  for (int g : {16, 128, -1}) v.push_back({"fp4", g, true});
  for (int g : {32, 256, -1}) v.push_back({"nf4", g, true});
  v.push_back({"nvfp4", 16, true});
  v.push_back({"mxfp4", 32, true});
  for (int g : {-1, 16, 128}) v.push_back({"fp8", g, true});
  return v;
}

// rtn_quantize == reference (codes, scales, zero points, global scale), the packed bytes decode
// (independently) to the same codes, parameters and dequantize() values, and unpack(pack(q)) == q.
void check_against_reference(const Format& f, const std::vector<float>& w, int64_t R, int64_t C,
                             const std::string& label, const RtnOptions& opt = {}) {
  SCOPED_TRACE(label + " " + f.describe());
  const QuantizedWeight q = rtn_quantize(w.data(), R, C, f, opt);
  const qref::Quantized r = qref::quantize(f, w, R, C, opt.clip_search, opt.clip_grid, opt.clip_min,
                                           opt.clip_norm, opt.global_scale);
  ASSERT_EQ(q.params.size(), r.params.size());
  EXPECT_EQ(bits(q.global_scale), bits(r.G));
  const int64_t G = f.groups_per_row(C), len = f.group_len(C);
  for (size_t i = 0; i < r.params.size(); ++i) {
    ASSERT_EQ(bits(q.params[i].scale), bits(r.params[i].scale))
        << "group " << i << ": scale " << q.params[i].scale << " vs reference "
        << r.params[i].scale;
    ASSERT_EQ(q.params[i].zero, r.params[i].zero) << "group " << i;
  }
  for (int64_t i = 0; i < R * C; ++i)
    ASSERT_EQ(q.codes[i], r.codes[i])
        << "element [" << i / C << ", " << i % C << "] = " << w[i] << " (scale "
        << q.params[(i / C) * G + (i % C) / len].scale << ")";

  const auto packed = pack(q);
  const auto layout = packed_layout(f, R, C);
  ASSERT_EQ(packed.size(), layout.size());
  for (const auto& d : layout) {
    ASSERT_TRUE(packed.count(d.suffix)) << d.suffix;
    EXPECT_EQ(packed.at(d.suffix).dtype, d.dtype) << d.suffix;
    EXPECT_EQ(packed.at(d.suffix).shape, d.shape) << d.suffix;
  }
  const qref::Decoded d = qref::decode(f, packed);
  ASSERT_EQ(d.R, R);
  ASSERT_EQ(d.C, C);
  EXPECT_EQ(d.codes, q.codes);
  for (size_t i = 0; i < d.params.size(); ++i) {
    ASSERT_EQ(bits(d.params[i].scale), bits(q.params[i].scale)) << "group " << i;
    ASSERT_EQ(d.params[i].zero, q.params[i].zero) << "group " << i;
  }
  EXPECT_EQ(bits(d.G), bits(q.global_scale));
  const std::vector<float> deq = q.dequantize();
  for (int64_t i = 0; i < R * C; ++i) {
    ASSERT_TRUE(std::isfinite(deq[i])) << i;
    ASSERT_EQ(bits(deq[i]), bits(d.values[i]))
        << "element " << i << ": " << deq[i] << " vs " << d.values[i];
  }

  std::map<std::string, TensorView> views;
  for (const auto& [k, t] : packed) views[k] = t.view();
  const QuantizedWeight u = unpack(f, views, "m");
  EXPECT_EQ(u.codes, q.codes);
  for (size_t i = 0; i < q.params.size(); ++i) {
    ASSERT_EQ(bits(u.params[i].scale), bits(q.params[i].scale));
    ASSERT_EQ(u.params[i].zero, q.params[i].zero);
  }
  EXPECT_EQ(bits(u.global_scale), bits(q.global_scale));
  EXPECT_EQ(u.dequantize(), deq);
}

}  // namespace

TEST(Format, RtnMatchesReferenceBitForBit) {
  const auto cases = weight_cases();
  for (const auto& fc : format_cases()) {
    const Format f = Format::parse(fc.name, fc.group, fc.sym);
    for (const auto& c : cases) check_against_reference(f, c.w, c.R, c.C, c.name);
  }
}

// Shapes that exercise padding: int3 rows of 40 codes (120 bits: 4 words, 8 spare bits), zero
// points of 5 or 11 rows, per-channel nibble rows of 6 codes, odd row counts.
TEST(Format, OddShapesMatchReference) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const auto& [name, g, sym, R, C] :
       std::vector<std::tuple<const char*, int, bool, int64_t, int64_t>>{
           {"int3", -1, true, 5, 40},
           {"int3", -1, false, 11, 40},
           {"int3", 16, false, 33, 48},
           {"int2", -1, false, 17, 24},
           {"int4", -1, false, 9, 12},
           {"int8", -1, false, 5, 3},
           {"int4", 32, false, 1, 32},
           {"fp4", -1, true, 3, 6},
           {"nf4", -1, true, 3, 2},
           {"fp8", -1, true, 3, 5},
           {"nvfp4", 16, true, 3, 48},
           {"mxfp4", 32, true, 1, 96}}) {
    std::vector<float> w(static_cast<size_t>(R * C));
    for (auto& v : w) v = nd(rng);
    check_against_reference(Format::parse(name, g, sym), w, R, C, "odd shape");
  }
}

// Ties constructed on purpose, with the expected codes worked out by hand (so that an error shared
// by calq and the reference would still show).
TEST(Format, ExactTiesByHand) {
  auto codes_of = [](const Format& f, std::vector<float> x) {
    const auto q = rtn_quantize(x.data(), 1, static_cast<int64_t>(x.size()), f, {});
    return std::make_pair(q.codes, q.params[0]);
  };
  {  // int4 symmetric: amax 7.5 -> s = 7.5/7.5 = 1; RNE to the even integer; 7.5 -> 8 clamps to 7
    auto [c, p] =
        codes_of(Format::parse("int4", 16), {7.5f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, -7.5f,
                                             6.5f, -6.5f, 3.49f, 0.f, -0.f, 0.49f, 5.5f, -5.5f});
    EXPECT_EQ(p.scale, 1.f);
    EXPECT_EQ(c, (std::vector<uint8_t>{15, 8, 10, 10, 8, 6, 6, 0, 14, 2, 11, 8, 8, 8, 14, 2}));
  }
  {  // int4 asymmetric: lo -7, hi 8 -> s = 15/15 = 1, zu = 7; ties go to the even *stored* code
    std::vector<float> x = {-7.f, 8.f, 0.5f, -0.5f, 1.5f, 2.5f, 0.f, -0.f, 7.5f, -6.5f};
    x.resize(16, 0.f);
    auto [c, p] = codes_of(Format::parse("int4", 16, false), x);
    EXPECT_EQ(p.scale, 1.f);
    EXPECT_EQ(p.zero, 7.f);
    EXPECT_EQ(c, (std::vector<uint8_t>{0, 15, 8, 6, 8, 10, 7, 7, 14, 0, 7, 7, 7, 7, 7, 7}));
  }
  const std::vector<float> e2m1_row = {6.f,    0.25f,  0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.f,
                                       -0.25f, -0.75f, -5.f,  -6.f,  5.01f, 0.2f, -0.f, 4.99f};
  const std::vector<uint8_t> e2m1_codes = {7, 0, 2, 2, 4, 4, 6, 6, 0, 10, 14, 15, 7, 0, 0, 6};
  {  // fp4: amax 6 -> s = 1
    auto [c, p] = codes_of(Format::parse("fp4", 16), e2m1_row);
    EXPECT_EQ(p.scale, 1.f);
    EXPECT_EQ(c, e2m1_codes);
  }
  {  // nvfp4: A = 6 -> G = 448, s = E4M3(1 * 448) = 448, effective 1
    const auto q = rtn_quantize(e2m1_row.data(), 1, 16, Format::parse("nvfp4"), {});
    EXPECT_EQ(q.global_scale, 448.f);
    EXPECT_EQ(q.params[0].scale, 448.f);
    EXPECT_EQ(q.codes, e2m1_codes);
  }
  {  // mxfp4: amax 6 -> k = 2, 6 < 1.75*4 -> E = 0
    std::vector<float> x = e2m1_row;
    x.resize(32, 0.f);
    auto [c, p] = codes_of(Format::parse("mxfp4"), x);
    EXPECT_EQ(p.scale, 1.f);
    EXPECT_EQ(std::vector<uint8_t>(c.begin(), c.begin() + 16), e2m1_codes);
    // amax 7 = 1.75 * 4 rounds the exponent up: E = 1, s = 2 (byte 128); 6.99 does not: s = 1
    // and 6.99 saturates to 6.
    x.assign(32, 0.f);
    x[5] = 7.f;
    x[6] = 3.f;  // 3/2 = 1.5
    auto [c7, p7] = codes_of(Format::parse("mxfp4"), x);
    EXPECT_EQ(p7.scale, 2.f);
    EXPECT_EQ(c7[5], 6);  // 7/2 = 3.5: a tie, to the even mantissa: 4
    EXPECT_EQ(c7[6], 3);  // 3/2 = 1.5
    x[5] = 6.99f;
    auto [c6, p6] = codes_of(Format::parse("mxfp4"), x);
    EXPECT_EQ(p6.scale, 1.f);
    EXPECT_EQ(c6[5], 7);
    EXPECT_EQ(c6[6], 5);
  }
  {  // nf4: amax 1 -> s = 1; exact midpoints go to the smaller magnitude
    std::vector<float> x(16, 0.f);
    x[0] = 1.f;
    x[1] = qref::kNF4[6] / 2;  // between -0.091 (6) and 0 (7)
    x[2] = qref::kNF4[8] / 2;  // between 0 (7) and 0.0796 (8)
    x[3] = -1.f;
    auto [c, p] = codes_of(Format::parse("nf4", 16), x);
    EXPECT_EQ(p.scale, 1.f);
    EXPECT_EQ(c[0], 15);
    EXPECT_EQ(c[1], 7);
    EXPECT_EQ(c[2], 7);
    EXPECT_EQ(c[3], 0);
    int checked = 0;
    for (int i = 0; i < 15; ++i) {  // every midpoint that is an fp32 value
      const double mid = (static_cast<double>(qref::kNF4[i]) + qref::kNF4[i + 1]) / 2;
      if (static_cast<double>(static_cast<float>(mid)) != mid) continue;
      x[4] = static_cast<float>(mid);
      auto [ci, pi] = codes_of(Format::parse("nf4", 16), x);
      EXPECT_EQ(ci[4], std::fabs(qref::kNF4[i]) < std::fabs(qref::kNF4[i + 1]) ? i : i + 1) << i;
      ++checked;
    }
    EXPECT_GE(checked, 2);
  }
  {  // fp8: amax 448 -> s = 1; ties to the even code; zero never 0x80
    std::vector<float> x = {448.f,
                            1.0625f,
                            1.1875f,
                            std::ldexp(1.f, -10),
                            3 * std::ldexp(1.f, -10),
                            -1.0625f,
                            432.f,
                            0.f,
                            -0.f,
                            -std::ldexp(1.f, -11),
                            -448.f,
                            240.f};
    auto [c, p] = codes_of(Format::parse("fp8", -1), x);
    EXPECT_EQ(p.scale, 1.f);
    EXPECT_EQ(c, (std::vector<uint8_t>{0x7E, 0x38, 0x3A, 0x00, 0x02, 0xB8, 0x7E, 0x00, 0x00, 0x00,
                                       0xFE, 0x77}));
  }
}

// The worked examples of docs/format.md §3, byte for byte.
TEST(Format, SpecWorkedExamples) {
  {
    const std::vector<float> x = {0.5f,   -1.f,  3.75f, 0.f,  -3.75f, 1.25f, -0.25f, 2.f,
                                  -0.75f, 0.25f, 1.5f,  -2.f, 0.75f,  3.f,   -3.5f,  -0.f};
    const auto q = rtn_quantize(x.data(), 1, 16, Format::parse("int4", 16), {});
    EXPECT_EQ(q.codes,
              (std::vector<uint8_t>{9, 6, 15, 8, 0, 10, 8, 12, 6, 8, 11, 4, 10, 14, 1, 8}));
    const auto p = pack(q);
    EXPECT_EQ(hex(p.at("weight_packed").bytes), "69 8F A0 C8 86 4B EA 81");
    EXPECT_EQ(hex(p.at("weight_scale").bytes), "00 38");
    EXPECT_EQ(hex(p.at("weight_shape").bytes), "01 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00");
    EXPECT_EQ(p.count("weight_zero_point"), 0u);
  }
  {
    const std::vector<float> x = {6.f,   -6.f,  0.5f, 0.25f, 0.75f, 5.f,    -1.25f, 3.f,
                                  -0.2f, 1.75f, 2.5f, -3.5f, 4.f,   -0.75f, 1.f,    0.f};
    const auto q = rtn_quantize(x.data(), 1, 16, Format::parse("nvfp4"), {});
    const auto p = pack(q);
    EXPECT_EQ(hex(p.at("weight_packed").bytes), "F7 01 62 5A 40 E4 A6 02");
    EXPECT_EQ(hex(p.at("weight_scale").bytes), "7E");
    EXPECT_EQ(hex(p.at("weight_global_scale").bytes), "00 00 E0 43");
    EXPECT_EQ(p.count("weight_shape"), 0u);
  }
}

// int3 is a dense bit stream (compressed-tensors >= 0.17): 32 codes in 3 words, codes 10 and 21
// straddling words.
TEST(Format, Int3DenseStream) {
  QuantizedWeight q;
  q.format = Format::parse("int3", -1);
  q.rows = 1;
  q.cols = 32;
  for (int c = 0; c < 32; ++c) q.codes.push_back(static_cast<uint8_t>(c % 8));
  q.params = {{1.f, 4.f}};
  const auto p = pack(q);
  ASSERT_EQ(p.at("weight_packed").shape, (Shape{1, 3}));
  uint32_t w[3];
  std::memcpy(w, p.at("weight_packed").bytes.data(), 12);
  for (int c = 0; c < 32; ++c) {  // stream bit i = bit i % 32 of word i / 32
    unsigned v = 0;
    for (int k = 0; k < 3; ++k) v |= ((w[(3 * c + k) / 32] >> ((3 * c + k) % 32)) & 1u) << k;
    EXPECT_EQ(v, static_cast<unsigned>(c % 8)) << c;
  }
  // Code 10 (value 2 = 0b010): bits 30-31 of word 0 hold 0b10, bit 0 of word 1 holds 0.
  EXPECT_EQ(w[0] >> 30, 2u);
  EXPECT_EQ(w[1] & 1u, 0u);
  EXPECT_EQ(packed_int32_words(3, 32), 3);
  EXPECT_EQ(packed_int32_words(3, 40), 4);
  EXPECT_EQ(packed_int32_words(4, 4096), 512);
  EXPECT_EQ(packed_int32_words(2, 17), 2);
  EXPECT_EQ(values_per_int32(3), 10);
  EXPECT_EQ(values_per_int32(4), 8);
}

// The fast paths (int: approximate quotient corrected at exact boundaries; fp codes: thresholds
// on x) agree with the brute-force reference at and around every rounding boundary, for many
// scales, including scales that are not fp16 values (the int exact fallback).
TEST(Format, BoundariesAgreeWithReference) {
  std::mt19937 rng(99);
  auto ulp_family = [](float x) {
    return std::vector<float>{x, std::nextafter(x, INFINITY), std::nextafter(x, -INFINITY)};
  };
  auto check = [&](const Format& f, const std::vector<float>& xs, const GroupParams& p, float G) {
    std::vector<uint8_t> got(xs.size());
    quantize_group(f, xs.data(), static_cast<int64_t>(xs.size()), p, G, got.data());
    const qref::Params rp{p.scale, p.zero};
    for (size_t i = 0; i < xs.size(); ++i) {
      ASSERT_EQ(got[i], qref::code(f, xs[i], rp, G))
          << f.describe() << " x=" << xs[i] << " scale=" << p.scale << " zero=" << p.zero
          << " G=" << G;
      ASSERT_EQ(quantize_element(f, xs[i], p, G), got[i]);
      ASSERT_EQ(bits(dequantize_element(f, got[i], p, G)), bits(qref::value(f, got[i], rp, G)));
    }
  };
  std::uniform_int_distribution<int> mant(0, 1023), ex(-24, 12), ex16(-14, 12);
  for (int iter = 0; iter < 100; ++iter) {
    float s16 = f16_to_f32(static_cast<uint16_t>((ex16(rng) + 15) << 10 | mant(rng)));  // normal
    if (iter % 10 == 0) s16 = f16_to_f32(static_cast<uint16_t>(1 + mant(rng)));         // subnormal
    const float sf = std::ldexp(0.5f + static_cast<float>(rng() % (1u << 23)) / (1u << 24),
                                ex(rng));  // arbitrary fp32: exact fallback
    for (int b : {2, 3, 4, 8}) {
      if (b == 8 && iter % 10 != 0) continue;  // brute force over 256 codes is slow under ASan
      const int top = (1 << b) - 1;
      for (bool sym : {true, false}) {
        const Format f = Format::parse("int" + std::to_string(b), 16, sym);
        const float zero =
            sym ? static_cast<float>(1 << (b - 1)) : static_cast<float>(rng() % (top + 1));
        for (float s : {s16, sf}) {
          std::vector<float> xs;
          for (int k = -2; k <= top + 2; ++k)
            for (float x : ulp_family((static_cast<float>(k) - zero + 0.5f) * s)) xs.push_back(x);
          xs.push_back(1e30f);
          xs.push_back(-1e30f);
          check(f, xs, {s, zero}, 1.f);
        }
      }
    }
    // E2M1 with arbitrary effective scales (nvfp4: s / G), and fp16 ones (fp4), power-of-two
    // ones (mxfp4): x at t*e and its neighbours for every threshold t.
    const float G = std::ldexp(1.f + static_cast<float>(rng() % 1000) / 1000.f,
                               static_cast<int>(rng() % 60) - 20);
    const float s8 = static_cast<float>(qref::e4m3(1 + rng() % 126));
    for (const auto& [fmt, p, g] : std::vector<std::tuple<const char*, GroupParams, float>>{
             {"nvfp4", {s8, 0}, G},
             {"fp4", {s16, 0}, 1.f},
             {"mxfp4", {std::ldexp(1.f, ex(rng)), 0}, 1.f}}) {
      const Format f = Format::parse(fmt);
      const float e = f.family == Family::NVFP4 ? p.scale / g : p.scale;
      std::vector<float> xs;
      for (double t : {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0})
        for (float x : ulp_family(static_cast<float>(t * e))) {
          xs.push_back(x);
          xs.push_back(-x);
        }
      check(f, xs, p, g);
    }
    {  // NF4 midpoints
      std::vector<float> xs;
      for (int i = 0; i < 15; ++i)
        for (float x : ulp_family(static_cast<float>(
                 (static_cast<double>(qref::kNF4[i]) + qref::kNF4[i + 1]) / 2 * s16)))
          xs.push_back(x);
      check(Format::parse("nf4", 16), xs, {s16, 0}, 1.f);
    }
    {  // E4M3 midpoints, with an arbitrary fp32 scale
      std::vector<float> xs;
      for (int c = 0; c < 126; c += 1 + static_cast<int>(rng() % 7))
        for (float x :
             ulp_family(static_cast<float>((qref::e4m3(c) + qref::e4m3(c + 1)) / 2 * sf))) {
          xs.push_back(x);
          xs.push_back(-x);
        }
      xs.push_back(500.f * sf);
      check(Format::parse("fp8", -1), xs, {sf, 0}, 1.f);
    }
  }
}

TEST(Format, ZeroEncodingAndZeroGroups) {
  for (const auto& fc : format_cases()) {
    const Format f = Format::parse(fc.name, fc.group, fc.sym);
    const int64_t C = 256;
    std::vector<float> w(static_cast<size_t>(2 * C), -0.f);
    for (int64_t c = 0; c < C; ++c) w[C + c] = c % 2 ? -0.f : 0.f;
    const auto q = rtn_quantize(w.data(), 2, C, f, {});
    const uint8_t zc = f.family == Family::Int   ? (f.symmetric ? 1 << (f.bits - 1) : 0)
                       : f.family == Family::NF4 ? 7
                                                 : 0;
    for (auto c : q.codes) ASSERT_EQ(c, zc) << f.describe();
    for (const auto& p : q.params) {
      // E8M0 cannot store 0: an all-zero mxfp4 block stores byte 0 (2^-127).
      EXPECT_EQ(p.scale, f.family == Family::MXFP4 ? std::ldexp(1.f, -127) : 0.f) << f.describe();
      EXPECT_EQ(p.zero, f.family == Family::Int && f.symmetric ? zc : 0.f);
    }
    if (f.family == Family::NVFP4) {
      EXPECT_EQ(q.global_scale, 1.f);
    }
    for (float v : q.dequantize()) EXPECT_EQ(bits(v), 0u) << f.describe();  // +0, never -0
  }
  // Negative values that round to zero encode as +0 too.
  std::vector<float> x(16, 0.f);
  x[0] = 6.f;
  x[1] = -0.2f;
  EXPECT_EQ(rtn_quantize(x.data(), 1, 16, Format::parse("fp4", 16), {}).codes[1], 0);
  EXPECT_EQ(rtn_quantize(x.data(), 1, 16, Format::parse("nvfp4"), {}).codes[1], 0);
  x[0] = 448.f;
  x[1] = -1e-4f;
  EXPECT_EQ(rtn_quantize(x.data(), 1, 16, Format::parse("fp8", 16), {}).codes[1], 0);
}

TEST(Format, ScaleOverflowClampsAndIsCounted) {
  std::vector<float> x(128, 0.f);
  x[3] = 1e6f;
  x[4] = -2e5f;
  for (const char* n : {"int4", "fp4", "nf4", "int2"}) {
    const Format f = Format::parse(n, 128);
    const auto q = rtn_quantize(x.data(), 1, 128, f, {});
    EXPECT_EQ(q.params[0].scale, 65504.f) << n;
    EXPECT_EQ(q.saturated_scales, 1) << n;
    for (float v : q.dequantize()) EXPECT_TRUE(std::isfinite(v)) << n;
    check_against_reference(f, x, 1, 128, "overflow");
  }
  // int8 (D = 127.5) keeps 1e6 in range: 1e6/127.5 < 65504.
  EXPECT_EQ(rtn_quantize(x.data(), 1, 128, Format::parse("int8", 128), {}).saturated_scales, 0);
  // fp8 scales are fp32: no clamp. nvfp4 with a caller's global scale too large for the block:
  // the E4M3 block scale saturates at 448.
  EXPECT_EQ(rtn_quantize(x.data(), 1, 128, Format::parse("fp8"), {}).saturated_scales, 0);
  RtnOptions o;
  o.global_scale = 1.f;
  const auto q = rtn_quantize(x.data(), 1, 128, Format::parse("nvfp4"), o);
  EXPECT_EQ(q.params[0].scale, 448.f);
  EXPECT_EQ(q.saturated_scales, 1);
  check_against_reference(Format::parse("nvfp4"), x, 1, 128, "nvfp4 saturating", o);
  // Small values do not saturate; amax exactly at the fp16 limit does not count either.
  std::vector<float> y(128, 0.5f);
  EXPECT_EQ(rtn_quantize(y.data(), 1, 128, Format::parse("int4"), {}).saturated_scales, 0);
  y[0] = 65504.f;
  EXPECT_EQ(rtn_quantize(y.data(), 1, 128, Format::parse("nf4"), {}).saturated_scales, 0);
}

TEST(Format, GIdxDequantizePackUnpack) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t R = 3, C = 64;
  std::vector<float> w(static_cast<size_t>(R * C));
  for (auto& v : w) v = nd(rng);
  for (const char* n : {"int4", "int3", "nf4", "fp8"}) {
    const Format f =
        Format::parse(n, 16, std::string(n) != "nf4" && std::string(n) != "fp8" ? false : true);
    QuantizedWeight q = rtn_quantize(w.data(), R, C, f, {});
    for (int64_t c = 0; c < C; ++c) q.g_idx.push_back(static_cast<int32_t>((c * 5) % 4));
    const auto packed = pack(q);
    ASSERT_TRUE(packed.count("weight_g_idx"));
    EXPECT_EQ(packed.at("weight_g_idx").dtype, DType::I32);
    EXPECT_EQ(packed.at("weight_g_idx").shape, (Shape{C}));
    const auto d = qref::decode(f, packed);
    const auto deq = q.dequantize();
    for (int64_t i = 0; i < R * C; ++i) ASSERT_EQ(bits(deq[i]), bits(d.values[i])) << n << " " << i;
    std::map<std::string, TensorView> v;
    for (const auto& [k, t] : packed) v[k] = t.view();
    const auto u = unpack(f, v, "m");
    EXPECT_EQ(u.g_idx, q.g_idx);
    EXPECT_EQ(u.dequantize(), deq);
    EXPECT_EQ(u.group_of(5), q.g_idx[5]);
  }
}

TEST(Format, BitsPerWeight) {
  EXPECT_DOUBLE_EQ(Format::parse("int4", 128).bits_per_weight(), 4.125);
  EXPECT_DOUBLE_EQ(Format::parse("int4", 128, false).bits_per_weight(), 4.15625);
  EXPECT_DOUBLE_EQ(Format::parse("int3", 128).bits_per_weight(), 3.125);
  EXPECT_DOUBLE_EQ(Format::parse("int3", 64, false).bits_per_weight(), 3.296875);
  EXPECT_DOUBLE_EQ(Format::parse("int2", 64).bits_per_weight(), 2.25);
  EXPECT_DOUBLE_EQ(Format::parse("int8", 32, false).bits_per_weight(), 8.75);
  EXPECT_DOUBLE_EQ(Format::parse("int8", -1).bits_per_weight(), 8.0);
  EXPECT_DOUBLE_EQ(Format::parse("fp4").bits_per_weight(), 4.125);
  EXPECT_DOUBLE_EQ(Format::parse("nf4", 64).bits_per_weight(), 4.25);
  EXPECT_DOUBLE_EQ(Format::parse("nvfp4").bits_per_weight(), 4.5);
  EXPECT_DOUBLE_EQ(Format::parse("mxfp4").bits_per_weight(), 4.25);
  EXPECT_DOUBLE_EQ(Format::parse("fp8").bits_per_weight(), 8.0);
  EXPECT_DOUBLE_EQ(Format::parse("fp8", 128).bits_per_weight(), 8.25);
}

TEST(Format, ParseDefaultsAndNames) {
  EXPECT_EQ(Format::parse("int4").group_size, 128);
  EXPECT_EQ(Format::parse("fp4").group_size, 128);
  EXPECT_EQ(Format::parse("nvfp4").group_size, 16);
  EXPECT_EQ(Format::parse("mxfp4").group_size, 32);
  EXPECT_EQ(Format::parse("fp8").group_size, -1);
  EXPECT_EQ(Format::parse("int3").bits, 3);
  EXPECT_EQ(Format::parse("nf4").bits, 4);
  EXPECT_EQ(Format::parse("fp8").bits, 8);
  EXPECT_EQ(Format::parse("int4", 32, false).describe(), "int4 asym g32");
  EXPECT_EQ(Format::parse("int4", 128).describe(), "int4 g128");
  EXPECT_EQ(Format::parse("nvfp4").describe(), "nvfp4 g16");
  EXPECT_EQ(Format::parse("fp8").describe(), "fp8 per-channel");
  EXPECT_EQ(Format::parse("int8", -1, false).name(), "int8");
  EXPECT_EQ(Format::parse("int4").scale_dtype(), DType::F16);
  EXPECT_EQ(Format::parse("nf4").scale_dtype(), DType::F16);
  EXPECT_EQ(Format::parse("nvfp4").scale_dtype(), DType::F8_E4M3);
  EXPECT_EQ(Format::parse("mxfp4").scale_dtype(), DType::U8);
  EXPECT_EQ(Format::parse("fp8").scale_dtype(), DType::F32);
  for (const char* n : {"int2", "int3", "int4", "int8", "fp4", "nvfp4", "mxfp4", "nf4", "fp8"})
    EXPECT_EQ(Format::parse(n).name(), n);
  EXPECT_EQ(nf4_value(7), 0.f);
  EXPECT_EQ(nf4_value(15), 1.f);
  EXPECT_EQ(nvfp4_global_scale(6.f), 448.f);
  EXPECT_EQ(nvfp4_global_scale(0.f), 1.f);
  EXPECT_EQ(nvfp4_global_scale(1e-40f), 1.f);  // 2688 / FLT_MIN overflows: compressed-tensors' 1
  EXPECT_EQ(nvfp4_global_scale(1.f), 2688.f);
  EXPECT_EQ(nvfp4_global_scale(3.f), 2688.f / 3.f);
}

TEST(Format, ParseErrors) {
  expect_error([] { Format::parse("int5"); },
               "unknown format 'int5'; expected one of int2, int3, int4, int8, fp4, nvfp4, mxfp4, "
               "nf4, fp8");
  expect_error([] { Format::parse("INT4"); }, "unknown format 'INT4'");
  expect_error([] { Format::parse(""); }, "unknown format ''");
  for (int g : {0, 8, 100, 512, -2, 48})
    expect_error([g] { Format::parse("int4", g); },
                 fmt::format("group size {} is not supported: use 16, 32, 64, 128, 256, or -1", g));
  expect_error([] { Format::parse("nvfp4", 32); }, "nvfp4 uses fixed blocks of 16 elements");
  expect_error([] { Format::parse("nvfp4", -1); }, "group size -1 is not possible");
  expect_error([] { Format::parse("mxfp4", 16); }, "mxfp4 uses fixed blocks of 32 elements");
  for (const char* n : {"fp4", "nvfp4", "mxfp4", "nf4", "fp8"})
    expect_error([n] { Format::parse(n, std::nullopt, false); },
                 fmt::format("format {} has no asymmetric variant", n));
  EXPECT_NO_THROW(Format::parse("int2", 16, false));
  EXPECT_NO_THROW(Format::parse("fp8", 256));
}

TEST(Format, CheckShapeErrors) {
  expect_error([] { Format::parse("int4", 128).check_shape(64, 172, "module.q_proj"); },
               "module.q_proj: in-features 172 not divisible by group size 128; use --group-size, "
               "--override or --keep");
  expect_error([] { Format::parse("nvfp4").check_shape(64, 24, "m.o_proj"); },
               "m.o_proj: in-features 24 not divisible by the nvfp4 block size 16");
  expect_error([] { Format::parse("mxfp4").check_shape(64, 48, "m"); },
               "in-features 48 not divisible by the mxfp4 block size 32");
  expect_error([] { Format::parse("nf4", -1).check_shape(4, 7, "m.down"); },
               "m.down: nf4 packs two 4-bit codes per byte and needs an even number of "
               "in-features, got 7");
  expect_error([] { Format::parse("fp4", -1).check_shape(4, 9, "m"); }, "even number");
  expect_error([] { Format::parse("int4").check_shape(0, 128, "m.empty"); },
               "m.empty: cannot quantize an empty weight [0, 128]");
  Format bad = Format::parse("nvfp4");
  bad.group_size = 32;
  expect_error([&] { bad.check_shape(4, 64, "m"); }, "m: nvfp4 uses fixed blocks of 16");
  Format b5 = Format::parse("int4");
  b5.bits = 5;
  expect_error([&] { b5.check_shape(4, 128, "m"); }, "int5 is not a format");
  // Per-channel int and fp8 take any width (int rows are zero-padded bit streams).
  EXPECT_NO_THROW(Format::parse("int3", -1).check_shape(3, 7, "m"));
  EXPECT_NO_THROW(Format::parse("fp8", -1).check_shape(3, 7, "m"));
  EXPECT_NO_THROW(Format::parse("nf4", -1).check_shape(3, 8, "m"));
  // rtn_quantize checks the shape too.
  std::vector<float> w(172, 1.f);
  expect_error([&] { rtn_quantize(w.data(), 1, 172, Format::parse("int4"), {}, "layers.0.q"); },
               "layers.0.q: in-features 172 not divisible by group size 128");
}

TEST(Format, UnpackErrors) {
  std::vector<float> w(4 * 64);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(static_cast<float>(i));
  const Format f = Format::parse("int4", 32, false);
  const auto packed = pack(rtn_quantize(w.data(), 4, 64, f, {}));
  auto views = [&] {
    std::map<std::string, TensorView> v;
    for (const auto& [k, t] : packed) v[k] = t.view();
    return v;
  };
  EXPECT_NO_THROW(unpack(f, views(), "m"));
  {
    auto v = views();
    v.erase("weight_zero_point");
    expect_error([&] { unpack(f, v, "layers.1.mlp.up_proj"); },
                 "layers.1.mlp.up_proj: missing tensor layers.1.mlp.up_proj.weight_zero_point");
  }
  {
    auto v = views();
    v.erase("weight_shape");
    expect_error([&] { unpack(f, v, "m"); }, "missing tensor m.weight_shape");
  }
  {  // wrong dtype
    Tensor s(DType::F32, {4, 2});
    auto v = views();
    v["weight_scale"] = s.view();
    expect_error([&] { unpack(f, v, "m"); },
                 "m: m.weight_scale is F32 [4, 2], expected F16 [4, 2] for int4 asym g32 [4, 64]");
  }
  {  // wrong shape
    Tensor p(DType::I32, {4, 9});
    auto v = views();
    v["weight_packed"] = p.view();
    expect_error([&] { unpack(f, v, "m"); }, "m.weight_packed is I32 [4, 9], expected I32 [4, 8]");
  }
  {  // the symmetric reading of an asymmetric module: the zero point is unexpected
    expect_error([&] { unpack(Format::parse("int4", 32), views(), "m"); },
                 "m: unexpected tensor m.weight_zero_point for format int4 g32");
  }
  {  // weight_shape that does not fit the group size
    Tensor s(DType::I64, {2});
    s.as<int64_t>()[0] = 4;
    s.as<int64_t>()[1] = 60;
    auto v = views();
    v["weight_shape"] = s.view();
    expect_error([&] { unpack(f, v, "m"); }, "m: in-features 60 not divisible by group size 32");
    s.as<int64_t>()[1] = -5;
    expect_error([&] { unpack(f, v, "m"); }, "m.weight_shape holds [4, -5]");
    Tensor s3(DType::I32, {2});
    v["weight_shape"] = s3.view();
    expect_error([&] { unpack(f, v, "m"); }, "m.weight_shape must be I64 [2], got I32 [2]");
  }
  {  // a truncated view
    auto v = views();
    v["weight_scale"].nbytes -= 2;
    expect_error([&] { unpack(f, v, "m"); }, "m.weight_scale holds 14 bytes, expected 16");
  }
  {  // non-finite scale
    Tensor s = packed.at("weight_scale");
    s.as<uint16_t>()[3] = 0x7C00;  // +Inf
    auto v = views();
    v["weight_scale"] = s.view();
    expect_error([&] { unpack(f, v, "m"); }, "m: m.weight_scale [1, 1] is not finite");
  }
  {  // g_idx out of range
    Tensor g(DType::I32, {64});
    g.as<int32_t>()[7] = 2;
    auto v = views();
    v["weight_g_idx"] = g.view();
    expect_error([&] { unpack(f, v, "m"); }, "m: m.weight_g_idx[7] = 2 is outside [0, 2)");
  }
  {  // nvfp4 global scale and mxfp4 NaN scale byte, fp8 NaN code
    std::vector<float> x(32, 1.f);
    const Format nv = Format::parse("nvfp4");
    auto p = pack(rtn_quantize(x.data(), 1, 32, nv, {}));
    p.at("weight_global_scale").as<float>()[0] = 0.f;
    std::map<std::string, TensorView> v;
    for (const auto& [k, t] : p) v[k] = t.view();
    expect_error([&] { unpack(nv, v, "n"); }, "n: n.weight_global_scale is 0");
    v.erase("weight_global_scale");
    expect_error([&] { unpack(nv, v, "n"); }, "missing tensor n.weight_global_scale");
    const Format mx = Format::parse("mxfp4");
    auto pm = pack(rtn_quantize(x.data(), 1, 32, mx, {}));
    pm.at("weight_scale").as<uint8_t>()[0] = 0xFF;
    std::map<std::string, TensorView> vm;
    for (const auto& [k, t] : pm) vm[k] = t.view();
    expect_error([&] { unpack(mx, vm, "x"); }, "x: x.weight_scale [0, 0] is not finite");
    const Format f8 = Format::parse("fp8");
    auto p8 = pack(rtn_quantize(x.data(), 1, 32, f8, {}));
    p8.at("weight").as<uint8_t>()[5] = 0xFF;
    std::map<std::string, TensorView> v8;
    for (const auto& [k, t] : p8) v8[k] = t.view();
    expect_error([&] { unpack(f8, v8, "e"); }, "e: e.weight [0, 5] is an fp8 NaN");
    v8.erase("weight");
    expect_error([&] { unpack(f8, v8, "e"); }, "missing tensor e.weight");
  }
}

TEST(Format, PackRejectsInconsistentInput) {
  QuantizedWeight q;
  q.format = Format::parse("int4", 16);
  q.rows = 1;
  q.cols = 16;
  q.codes.assign(16, 8);
  expect_error([&] { pack(q); },
               "internal: quantized weight [1, 16] (int4 g16) holds 16 codes, 0 group");
  q.params = {{0.1f, 8.f}};  // not an fp16 value: codes were not chosen with what would be stored
  expect_error([&] { pack(q); }, "is not representable in F16");
}
