#include "calq/core/dtype.h"

#include <algorithm>
#include <array>
#include <limits>
#include <bit>
#include <cmath>
#include <cstring>

#include "calq/core/error.h"

namespace calq {

namespace {

struct MiniFloat {
  int mbits;      // mantissa bits
  int emin;       // exponent of the smallest normal
  int bias;
  double max;     // largest finite magnitude
};

// Rounds |x| (finite, fp32) to the nearest value of a small float format, ties to even, on the
// exact value: |x| / quantum is exact in double (fp32 has 24 significant bits), and rint() rounds
// it to the nearest even integer. Returns the rounded magnitude (may exceed fmt.max).
double round_to_format(double ax, const MiniFloat& f) {
  if (ax == 0) return 0;
  int e = std::ilogb(ax);
  if (e < f.emin) e = f.emin;  // subnormal range: fixed quantum
  double q = std::ldexp(1.0, e - f.mbits);
  return std::rint(ax / q) * q;
}

// Encodes a representable magnitude v (0 <= v <= max) as exponent/mantissa fields.
uint32_t encode_magnitude(double v, const MiniFloat& f) {
  if (v == 0) return 0;
  int e = std::ilogb(v);
  if (e < f.emin) {  // subnormal
    return static_cast<uint32_t>(std::ldexp(v, f.mbits - f.emin));
  }
  double frac = std::ldexp(v, -e) - 1.0;  // in [0, 1)
  uint32_t mant = static_cast<uint32_t>(std::ldexp(frac, f.mbits));
  uint32_t exp_field = static_cast<uint32_t>(e + f.bias);
  return (exp_field << f.mbits) | mant;
}

constexpr MiniFloat kF16{10, -14, 15, 65504.0};
constexpr MiniFloat kE4M3{3, -6, 7, 448.0};
constexpr MiniFloat kE5M2{2, -14, 15, 57344.0};
constexpr MiniFloat kE2M1{1, 0, 1, 6.0};

double decode_minifloat(uint32_t bits, int ebits, const MiniFloat& f) {
  uint32_t mant = bits & ((1u << f.mbits) - 1);
  uint32_t exp_field = (bits >> f.mbits) & ((1u << ebits) - 1);
  if (exp_field == 0) return std::ldexp(static_cast<double>(mant), f.emin - f.mbits);
  return std::ldexp(1.0 + std::ldexp(static_cast<double>(mant), -f.mbits),
                    static_cast<int>(exp_field) - f.bias);
}

struct Tables {
  std::array<float, 65536> f16;
  std::array<float, 256> e4m3, e5m2, e8m0;
  std::array<float, 16> e2m1;
  Tables() {
    for (uint32_t h = 0; h < 65536; ++h) {
      uint32_t e = (h >> 10) & 31, m = h & 1023;
      float v;
      if (e == 31) v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
      else v = static_cast<float>(decode_minifloat(h & 0x7FFF, 5, kF16));
      f16[h] = (h & 0x8000) ? -v : v;
    }
    for (uint32_t c = 0; c < 256; ++c) {
      float v = (c & 0x7F) == 0x7F ? std::numeric_limits<float>::quiet_NaN()
                                   : static_cast<float>(decode_minifloat(c & 0x7F, 4, kE4M3));
      e4m3[c] = (c & 0x80) ? -v : v;
      uint32_t e = (c >> 2) & 31, m = c & 3;
      float w;
      if (e == 31) w = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
      else w = static_cast<float>(decode_minifloat(c & 0x7F, 5, kE5M2));
      e5m2[c] = (c & 0x80) ? -w : w;
      e8m0[c] = c == 0xFF ? std::numeric_limits<float>::quiet_NaN()
                          : static_cast<float>(std::ldexp(1.0, static_cast<int>(c) - 127));
    }
    for (uint32_t c = 0; c < 16; ++c) {
      float v = static_cast<float>(decode_minifloat(c & 7, 2, kE2M1));
      e2m1[c] = (c & 8) ? -v : v;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline uint32_t f32_bits(float x) { return std::bit_cast<uint32_t>(x); }

}  // namespace

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: case DType::U64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    case DType::F8_E4M3: case DType::F8_E5M2: case DType::F8_E8M0: case DType::F4_E2M1:
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 1;
}

namespace {
constexpr std::array<std::pair<DType, std::string_view>, 17> kNames = {{
    {DType::F64, "F64"}, {DType::F32, "F32"}, {DType::F16, "F16"}, {DType::BF16, "BF16"},
    {DType::F8_E4M3, "F8_E4M3"}, {DType::F8_E5M2, "F8_E5M2"}, {DType::F8_E8M0, "F8_E8M0"},
    {DType::F4_E2M1, "F4"}, {DType::I64, "I64"}, {DType::I32, "I32"}, {DType::I16, "I16"},
    {DType::I8, "I8"}, {DType::U64, "U64"}, {DType::U32, "U32"}, {DType::U16, "U16"},
    {DType::U8, "U8"}, {DType::BOOL, "BOOL"},
}};
}  // namespace

std::string_view dtype_name(DType t) {
  for (const auto& [d, n] : kNames)
    if (d == t) return n;
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& [d, n] : kNames)
    if (n == name) return d;
  return std::nullopt;
}

bool dtype_is_float(DType t) {
  switch (t) {
    case DType::F64: case DType::F32: case DType::F16: case DType::BF16: case DType::F8_E4M3:
    case DType::F8_E5M2: return true;
    default: return false;
  }
}

float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_bf16(float x) {
  uint32_t u = f32_bits(x);
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x0040);
  u += 0x7FFF + ((u >> 16) & 1);  // RNE on the 16 dropped bits; carries into the exponent (-> Inf)
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) { return tables().f16[h]; }

uint16_t f32_to_f16(float x) {
  uint16_t sign = (f32_bits(x) >> 16) & 0x8000;
  if (std::isnan(x)) return sign | 0x7E00;
  double ax = std::fabs(static_cast<double>(x));
  if (std::isinf(ax)) return sign | 0x7C00;
  double v = round_to_format(ax, kF16);
  if (v > kF16.max) return sign | 0x7C00;
  return static_cast<uint16_t>(sign | encode_magnitude(v, kF16));
}

float e4m3_to_f32(uint8_t c) { return tables().e4m3[c]; }

uint8_t f32_to_e4m3(float x, bool saturate) {
  uint8_t sign = (f32_bits(x) >> 24) & 0x80;
  if (std::isnan(x)) return sign | 0x7F;
  double ax = std::fabs(static_cast<double>(x));
  if (std::isinf(ax)) return saturate ? (sign | 0x7E) : (sign | 0x7F);
  double v = round_to_format(ax, kE4M3);
  if (v > kE4M3.max) return saturate ? (sign | 0x7E) : (sign | 0x7F);
  return static_cast<uint8_t>(sign | encode_magnitude(v, kE4M3));
}

float e5m2_to_f32(uint8_t c) { return tables().e5m2[c]; }

uint8_t f32_to_e5m2(float x, bool saturate) {
  uint8_t sign = (f32_bits(x) >> 24) & 0x80;
  if (std::isnan(x)) return sign | 0x7F;
  double ax = std::fabs(static_cast<double>(x));
  if (std::isinf(ax)) return saturate ? (sign | 0x7B) : (sign | 0x7C);
  double v = round_to_format(ax, kE5M2);
  if (v > kE5M2.max) return saturate ? (sign | 0x7B) : (sign | 0x7C);
  return static_cast<uint8_t>(sign | encode_magnitude(v, kE5M2));
}

float e2m1_to_f32(uint8_t code) { return tables().e2m1[code & 0xF]; }

uint8_t f32_to_e2m1(float x) {
  if (std::isnan(x)) return 0;
  uint8_t sign = (f32_bits(x) >> 28) & 0x8;
  double ax = std::fabs(static_cast<double>(x));
  double v = std::isinf(ax) ? kE2M1.max : std::min(round_to_format(ax, kE2M1), kE2M1.max);
  return static_cast<uint8_t>(sign | encode_magnitude(v, kE2M1));
}

float e8m0_to_f32(uint8_t e) { return tables().e8m0[e]; }

uint8_t f32_to_e8m0(float x, E8M0Round mode) {
  CALQ_CHECK(std::isfinite(x) && x > 0, "E8M0 scale must be a positive finite number, got {}", x);
  int k = std::ilogb(static_cast<double>(x));  // 2^k <= x < 2^(k+1)
  double p = std::ldexp(1.0, k);
  bool exact = static_cast<double>(x) == p;
  if (mode == E8M0Round::Ceil && !exact) ++k;
  if (mode == E8M0Round::Nearest && static_cast<double>(x) >= 1.5 * p) ++k;
  k = std::clamp(k, -127, 127);
  return static_cast<uint8_t>(k + 127);
}

void to_f32(const void* src, DType t, float* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::F64: {
      const auto* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) {
        uint32_t u = static_cast<uint32_t>(s[i]) << 16;
        std::memcpy(dst + i, &u, 4);
      }
      return;
    }
    case DType::F16: {
      const auto* s = static_cast<const uint16_t*>(src);
      const float* tab = tables().f16.data();
      for (size_t i = 0; i < n; ++i) dst[i] = tab[s[i]];
      return;
    }
    case DType::F8_E4M3: case DType::F8_E5M2: {
      const auto* s = static_cast<const uint8_t*>(src);
      const float* tab = t == DType::F8_E4M3 ? tables().e4m3.data() : tables().e5m2.data();
      for (size_t i = 0; i < n; ++i) dst[i] = tab[s[i]];
      return;
    }
    default: fail("cannot convert dtype {} to fp32", dtype_name(t));
  }
}

void from_f32(const float* src, DType t, void* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_e4m3(src[i], true);
      return;
    }
    case DType::F8_E5M2: {
      auto* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_e5m2(src[i], false);
      return;
    }
    default: fail("cannot convert fp32 to dtype {}", dtype_name(t));
  }
}

}  // namespace calq
