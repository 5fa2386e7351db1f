// A reference quantizer and a byte-level decoder written from docs/format.md alone, for
// format_test.cpp and rtn_test.cpp. Deliberately naive: scales by the documented formulas, codes by
// brute force over every code (nearest decoded value in double, the documented tie rule applied
// explicitly), packed tensors read with shifts and masks on the raw bytes. It shares no code with
// src/calq/quant; only the fp16 rounding comes from calq's dtype functions (tested exhaustively in
// dtype_test.cpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "calq/core/dtype.h"
#include "calq/core/tensor.h"
#include "calq/quant/format.h"

namespace qref {

using calq::quant::Family;
using calq::quant::Format;

inline const std::array<double, 16> kE2M1 = {0,    0.5,  1,  1.5,  2,  3,  4,  6,
                                             -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};
inline const std::array<float, 16> kNF4 = {-1.0f,
                                           -0.6961928009986877f,
                                           -0.5250730514526367f,
                                           -0.39491748809814453f,
                                           -0.28444138169288635f,
                                           -0.18477343022823334f,
                                           -0.09105003625154495f,
                                           0.0f,
                                           0.07958029955625534f,
                                           0.16093020141124725f,
                                           0.24611230194568634f,
                                           0.33791524171829224f,
                                           0.44070982933044434f,
                                           0.5626170039176941f,
                                           0.7229568362236023f,
                                           1.0f};

// E4M3 (e4m3fn) from the spec's formula; NaN codes give NaN.
inline double e4m3(unsigned c) {
  const unsigned s = (c >> 7) & 1, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double v =
      e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1 + m / 8.0, static_cast<int>(e) - 7);
  return s ? -v : v;
}

inline float f16r(float v) {
  return calq::f16_to_f32(calq::f32_to_f16(v));
}

// Nearest non-negative E4M3 value to v >= 0, ties to the even code, saturating at 448.
inline float e4m3_round(double v) {
  int best = 0;
  for (int c = 1; c < 127; ++c) {
    const double d = std::fabs(v - e4m3(c)), db = std::fabs(v - e4m3(best));
    if (d < db || (d == db && c % 2 == 0)) best = c;
  }
  return static_cast<float>(e4m3(best));
}

inline float global_scale(float amax) {
  const float g = 2688.f / std::max(std::fabs(amax), std::numeric_limits<float>::min());
  return std::isfinite(g) ? g : 1.f;
}

struct Params {
  float scale = 0, zero = 0;
  bool operator==(const Params&) const = default;
};

// docs/format.md §2 scale rules, operation by operation in fp32.
inline Params params(const Format& f, const float* x, int64_t n, float shrink, float G) {
  float amax = 0, mn = 0, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    mn = std::min(mn, x[i]);
    mx = std::max(mx, x[i]);
  }
  const float a = amax * shrink;
  const int b = f.bits;
  Params p;
  switch (f.family) {
    case Family::Int:
      if (f.symmetric) {
        const float D = static_cast<float>((1 << b) - 1) / 2.f;
        p.scale = f16r(std::min(a / D, 65504.f));
        p.zero = static_cast<float>(1 << (b - 1));
      } else {
        const float lo = mn * shrink, hi = mx * shrink;
        const float range = hi - lo;
        p.scale = f16r(std::min(range / static_cast<float>((1 << b) - 1), 65504.f));
        if (p.scale > 0)
          p.zero = static_cast<float>(
              std::clamp(std::nearbyint(-static_cast<double>(lo) / p.scale), 0.0, (1 << b) - 1.0));
      }
      break;
    case Family::FP4:
      p.scale = f16r(std::min(a / 6.f, 65504.f));
      break;
    case Family::NF4:
      p.scale = f16r(std::min(a, 65504.f));
      break;
    case Family::NVFP4: {
      const float t = (a / 6.f) * G;
      p.scale = e4m3_round(std::min(t, 448.f));
      break;
    }
    case Family::MXFP4: {
      int E = -127;
      if (a > 0) {
        int ex;
        std::frexp(static_cast<double>(a), &ex);  // a = m * 2^ex, m in [0.5, 1)
        const int k = ex - 1;
        E = std::clamp(k - 2 + (static_cast<double>(a) >= 1.75 * std::ldexp(1.0, k) ? 1 : 0), -127,
                       127);
      }
      p.scale = std::ldexp(1.f, E);
      break;
    }
    case Family::FP8:
      p.scale = a / 448.f;
      break;
  }
  return p;
}

inline float effective_scale(const Format& f, const Params& p, float G) {
  return f.family == Family::NVFP4 ? p.scale / G : p.scale;
}

// The code of x by brute force over all codes: nearest decoded value to the exact quotient, then
// the documented tie rule.
inline uint8_t code(const Format& f, float x, const Params& p, float G) {
  const float s = effective_scale(f, p, G);
  const int b = f.bits;
  if (s == 0) {
    if (f.family == Family::Int) return static_cast<uint8_t>(f.symmetric ? 1 << (b - 1) : 0);
    return f.family == Family::NF4 ? 7 : 0;
  }
  // Beyond the code range the nearest code is the extreme one; clamping keeps the distances of
  // huge quotients (1e34) from collapsing into ties in double.
  const double lim = f.family == Family::Int   ? (1 << b) + 1.0
                     : f.family == Family::FP8 ? 1024.0
                                               : 16.0;
  const double y = std::clamp(static_cast<double>(x) / s, -lim, lim);
  int best = -1;
  double bd = 0;
  auto consider = [&](int c, double v, bool wins_tie) {
    const double d = std::fabs(y - v);
    if (best < 0 || d < bd || (d == bd && wins_tie)) {
      best = c;
      bd = d;
    }
  };
  switch (f.family) {
    case Family::Int: {
      const double zero = p.zero;
      for (int u = 0; u < (1 << b); ++u) consider(u, u - zero, u % 2 == 0);  // ties: even u
      break;
    }
    case Family::FP4:
    case Family::MXFP4:
    case Family::NVFP4:
      for (int c = 0; c < 16; ++c)
        if (c != 8) consider(c, kE2M1[c], c % 2 == 0);  // ties: even mantissa; never -0
      break;
    case Family::NF4:
      for (int c = 0; c < 16; ++c)
        consider(c, kNF4[c], best >= 0 && std::fabs(kNF4[c]) < std::fabs(kNF4[best]));
      break;
    case Family::FP8:
      for (int c = 0; c < 256; ++c)
        if ((c & 0x7F) != 0x7F && c != 0x80) consider(c, e4m3(c), c % 2 == 0);
      break;
  }
  return static_cast<uint8_t>(best);
}

// The value of a code: an fp32 product, as docs/format.md defines it.
inline float value(const Format& f, uint8_t u, const Params& p, float G) {
  const float s = effective_scale(f, p, G);
  switch (f.family) {
    case Family::Int:
      return static_cast<float>(static_cast<int>(u) - static_cast<int>(p.zero)) * s;
    case Family::FP4:
    case Family::MXFP4:
    case Family::NVFP4:
      return static_cast<float>(kE2M1[u & 15]) * s;
    case Family::NF4:
      return kNF4[u & 15] * s;
    case Family::FP8:
      return static_cast<float>(e4m3(u)) * s;
  }
  return 0;
}

inline double group_error(const Format& f, const float* x, int64_t n, const Params& p, float G,
                          double norm) {
  double e = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(x[i]) - value(f, code(f, x[i], p, G), p, G));
    e += norm == 2 ? d * d : std::pow(d, norm);
  }
  return e;
}

struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<Params> params;
  float G = 1;
};

// Reference RTN: absmax (or min/max) per group, or the documented clip-search grid.
inline Quantized quantize(const Format& f, const std::vector<float>& w, int64_t R, int64_t C,
                          bool clip = false, int grid = 20, float fmin = 0.5f, float norm = 2.f,
                          std::optional<float> G_override = std::nullopt) {
  Quantized q;
  if (f.family == Family::NVFP4) {
    float A = 0;
    for (float v : w) A = std::max(A, std::fabs(v));
    q.G = G_override ? *G_override : global_scale(A);
  }
  const int64_t len = f.group_size < 0 ? C : f.group_size, G = C / len;
  q.codes.resize(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* x = w.data() + r * C + g * len;
      Params best = params(f, x, len, 1.f, q.G);
      if (clip) {
        double be = group_error(f, x, len, best, q.G, norm);
        for (int i = 1; i < grid; ++i) {
          const float s =
              static_cast<float>(1.0 - i * (1.0 - static_cast<double>(fmin)) / (grid - 1));
          const Params c = params(f, x, len, s, q.G);
          const double e = group_error(f, x, len, c, q.G, norm);
          if (e < be) {
            be = e;
            best = c;
          }
        }
      }
      q.params.push_back(best);
      for (int64_t i = 0; i < len; ++i) q.codes[r * C + g * len + i] = code(f, x[i], best, q.G);
    }
  return q;
}

// ---- byte-level decoder of docs/format.md §3 ----

inline uint32_t word(const calq::Tensor& t, int64_t i) {
  uint32_t v = 0;
  for (int k = 0; k < 4; ++k)
    v |= static_cast<uint32_t>(static_cast<uint8_t>(t.bytes.at(static_cast<size_t>(4 * i + k))))
         << (8 * k);
  return v;
}

// Field `idx` of b bits from a little-endian bit stream of int32 words: element (line, idx) where
// word j of the line is at word_index(line, j).
template <typename WordIndex>
unsigned stream_field(const calq::Tensor& t, int b, int64_t idx, WordIndex&& word_index) {
  const int64_t bit = b * idx;
  const int64_t j = bit / 32;
  const int off = static_cast<int>(bit % 32);
  uint64_t v = word(t, word_index(j)) >> off;
  if (off + b > 32) v |= static_cast<uint64_t>(word(t, word_index(j + 1))) << (32 - off);
  return static_cast<unsigned>(v & ((1u << b) - 1));
}

struct Decoded {
  int64_t R = 0, C = 0;
  std::vector<uint8_t> codes;
  std::vector<Params> params;
  float G = 1;
  std::vector<float> values;
};

// Reads the packed tensors of one module as docs/format.md describes them.
inline Decoded decode(const Format& f, const std::map<std::string, calq::Tensor>& t) {
  Decoded d;
  auto le = [](const calq::Tensor& x, int64_t i, int nbytes) {
    uint64_t v = 0;
    for (int k = 0; k < nbytes; ++k)
      v |= static_cast<uint64_t>(
               static_cast<uint8_t>(x.bytes.at(static_cast<size_t>(nbytes * i + k))))
           << (8 * k);
    return v;
  };
  if (f.family == Family::FP8) {
    d.R = t.at("weight").shape.at(0);
    d.C = t.at("weight").shape.at(1);
  } else if (t.count("weight_shape")) {
    d.R = static_cast<int64_t>(le(t.at("weight_shape"), 0, 8));
    d.C = static_cast<int64_t>(le(t.at("weight_shape"), 1, 8));
  } else {
    d.R = t.at("weight_packed").shape.at(0);
    d.C = t.at("weight_packed").shape.at(1) * 2;
  }
  const int64_t R = d.R, C = d.C, len = f.group_size < 0 ? C : f.group_size, G = C / len;
  const int b = f.bits;
  d.codes.resize(static_cast<size_t>(R * C));
  d.params.resize(static_cast<size_t>(R * G));
  const calq::Tensor& sc = t.at("weight_scale");
  for (int64_t i = 0; i < R * G; ++i) {
    float s = 0;
    switch (sc.dtype) {
      case calq::DType::F16:
        s = calq::f16_to_f32(static_cast<uint16_t>(le(sc, i, 2)));
        break;
      case calq::DType::F32: {
        const uint32_t u = static_cast<uint32_t>(le(sc, i, 4));
        std::memcpy(&s, &u, 4);
        break;
      }
      case calq::DType::F8_E4M3:
        s = static_cast<float>(e4m3(static_cast<unsigned>(le(sc, i, 1))));
        break;
      case calq::DType::U8:
        s = std::ldexp(1.f, static_cast<int>(le(sc, i, 1)) - 127);
        break;
      default:
        break;
    }
    d.params[i].scale = s;
    if (f.family == Family::Int && f.symmetric) d.params[i].zero = static_cast<float>(1 << (b - 1));
  }
  if (f.family == Family::Int) {
    const calq::Tensor& p = t.at("weight_packed");
    const int64_t W = p.shape.at(1);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        d.codes[r * C + c] =
            static_cast<uint8_t>(stream_field(p, b, c, [&](int64_t j) { return r * W + j; }));
    if (!f.symmetric) {
      const calq::Tensor& z = t.at("weight_zero_point");
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < R; ++r)
          d.params[r * G + g].zero =
              static_cast<float>(stream_field(z, b, r, [&](int64_t j) { return j * G + g; }));
    }
  } else if (f.family == Family::FP8) {
    for (int64_t i = 0; i < R * C; ++i)
      d.codes[i] = static_cast<uint8_t>(t.at("weight").bytes.at(i));
  } else {
    const calq::Tensor& p = t.at("weight_packed");
    for (int64_t i = 0; i < R * C; ++i) {
      const auto byte = static_cast<uint8_t>(p.bytes.at(static_cast<size_t>(i / 2)));
      d.codes[i] = i % 2 == 0 ? (byte & 0x0F) : (byte >> 4);
    }
  }
  if (f.family == Family::NVFP4) {
    const uint32_t u = static_cast<uint32_t>(le(t.at("weight_global_scale"), 0, 4));
    std::memcpy(&d.G, &u, 4);
  }
  d.values.resize(static_cast<size_t>(R * C));
  std::vector<int32_t> gidx;
  if (t.count("weight_g_idx"))
    for (int64_t c = 0; c < C; ++c)
      gidx.push_back(static_cast<int32_t>(le(t.at("weight_g_idx"), c, 4)));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = gidx.empty() ? c / len : gidx[c];
      d.values[r * C + c] = value(f, d.codes[r * C + c], d.params[r * G + g], d.G);
    }
  return d;
}

}  // namespace qref
