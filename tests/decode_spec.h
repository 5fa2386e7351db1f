// An independent decoder of calq's packed tensors, written from docs/format.md section 3 with
// plain shifts and masks on the raw bytes (it shares no code with calq's unpack()).
#pragma once

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "support.h"

namespace calq_test {

inline double spec_e2m1(unsigned c) {
  static const double mag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (c & 8) ? -mag[c & 7] : mag[c & 7];
}
inline double spec_e4m3(unsigned c) {
  unsigned s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  double v = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, static_cast<int>(e) - 10);
  return s ? -v : v;
}
inline double spec_e8m0(unsigned c) { return c == 255 ? NAN : std::ldexp(1.0, static_cast<int>(c) - 127); }
inline double spec_nf4(unsigned c) {
  static const double t[16] = {-1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                               -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0,
                               0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                               0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                               0.7229568362236023, 1};
  return t[c & 15];
}

struct DecodedModule {
  int64_t rows = 0, cols = 0, group = 0;
  std::vector<double> values;  // rows*cols
  std::vector<double> scales;  // effective scale per (row, group)
  double max_step_multiple = 0.5;  // largest |w - value| allowed, in units of the effective scale
  std::vector<int32_t> g_idx;      // weight_g_idx when stored (act-order, groups in processing order)
  int64_t group_of(int64_t c) const { return g_idx.empty() ? c / group : g_idx[static_cast<size_t>(c)]; }
  double scale_at(int64_t r, int64_t c) const { return scales[r * (cols / group) + group_of(c)]; }
};

inline uint32_t u32_at(const std::string& b, size_t i) {
  uint32_t v;
  std::memcpy(&v, b.data() + 4 * i, 4);
  return v;
}

inline DecodedModule decode_module(std::map<std::string, RawTensor>& t, const std::string& m,
                                   const std::string& format, bool symmetric, int group,
                                   const nlohmann::json& /*quantization_config*/) {
  auto need = [&](const std::string& s) -> RawTensor& {
    auto it = t.find(m + "." + s);
    if (it == t.end()) throw std::runtime_error("missing " + m + "." + s);
    return it->second;
  };
  DecodedModule d;
  bool is_int = format.rfind("int", 0) == 0;
  if (format == "fp8") {
    auto& w = need("weight");
    EXPECT_EQ(w.dtype, "F8_E4M3");
    d.rows = w.shape[0];
    d.cols = w.shape[1];
  } else if (t.count(m + ".weight_shape")) {
    auto& s = need("weight_shape");
    EXPECT_EQ(s.dtype, "I64");
    int64_t rc[2];
    std::memcpy(rc, s.bytes.data(), 16);
    d.rows = rc[0];
    d.cols = rc[1];
  } else {
    auto& p = need("weight_packed");
    d.rows = p.shape[0];
    d.cols = p.shape[1] * 2;
  }
  d.group = group < 0 ? d.cols : group;
  const int64_t R = d.rows, C = d.cols, G = C / d.group;
  d.values.assign(static_cast<size_t>(R * C), 0);
  d.scales.assign(static_cast<size_t>(R * G), 0);
  if (auto gi = t.find(m + ".weight_g_idx"); gi != t.end()) {
    EXPECT_EQ(gi->second.dtype, "I32") << m;
    EXPECT_EQ(gi->second.shape, (std::vector<int64_t>{C})) << m;
    d.g_idx.resize(static_cast<size_t>(C));
    std::memcpy(d.g_idx.data(), gi->second.bytes.data(), d.g_idx.size() * 4);
    for (int32_t g : d.g_idx) EXPECT_TRUE(g >= 0 && g < G) << m << ": g_idx entry " << g << " outside 0.." << G - 1;
  }
  auto& sc = need("weight_scale");
  EXPECT_EQ(sc.shape, (std::vector<int64_t>{R, G})) << m;
  for (int64_t i = 0; i < R * G; ++i) {
    if (sc.dtype == "F16") {
      uint16_t h;
      std::memcpy(&h, sc.bytes.data() + 2 * i, 2);
      d.scales[i] = ref_f16(h);
    } else if (sc.dtype == "F32") {
      float f;
      std::memcpy(&f, sc.bytes.data() + 4 * i, 4);
      d.scales[i] = f;
    } else if (sc.dtype == "F8_E4M3") {
      d.scales[i] = spec_e4m3(static_cast<unsigned char>(sc.bytes[i]));
    } else if (sc.dtype == "U8") {
      d.scales[i] = spec_e8m0(static_cast<unsigned char>(sc.bytes[i]));
    } else {
      ADD_FAILURE() << m << ": unexpected scale dtype " << sc.dtype;
    }
  }
  if (is_int) {
    int b = format[3] - '0';
    auto& p = need("weight_packed");
    EXPECT_EQ(p.dtype, "I32");
    // Dense little-endian bit streams (compressed-tensors >= 0.17): field i at stream bit b*i.
    auto field = [&](const std::string& bytes, int64_t base_word, int64_t stride, int64_t i) {
      int64_t bit = b * i;
      uint64_t v = u32_at(bytes, static_cast<size_t>(base_word + (bit / 32) * stride)) >> (bit % 32);
      if (bit % 32 + b > 32) v |= static_cast<uint64_t>(u32_at(bytes, static_cast<size_t>(base_word + (bit / 32 + 1) * stride))) << (32 - bit % 32);
      return static_cast<unsigned>(v & ((1u << b) - 1));
    };
    int64_t words = (C * b + 31) / 32;
    EXPECT_EQ(p.shape, (std::vector<int64_t>{R, words})) << m;
    std::vector<double> zero(static_cast<size_t>(R * G), std::ldexp(1.0, b - 1));
    if (!symmetric) {
      auto& z = need("weight_zero_point");
      EXPECT_EQ(z.shape, (std::vector<int64_t>{(R * b + 31) / 32, G})) << m;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t g = 0; g < G; ++g) zero[r * G + g] = field(z.bytes, g, G, r);
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) {
        unsigned u = field(p.bytes, r * words, 1, c);
        int64_t g = d.group_of(c);
        d.values[r * C + c] = static_cast<float>((u - zero[r * G + g]) * d.scales[r * G + g]);
      }
    d.max_step_multiple = symmetric ? 0.5 + ((1 << (b - 1)) - 0.5) * std::ldexp(1.0, -10) : 1.0;
  } else if (format == "fp8") {
    auto& w = need("weight");
    for (int64_t i = 0; i < R * C; ++i)
      d.values[i] = static_cast<float>(spec_e4m3(static_cast<unsigned char>(w.bytes[i])) * d.scales[i / C * G + d.group_of(i % C)]);
    d.max_step_multiple = 16.01;  // half the largest E4M3 spacing (32 between 416 and 448)
  } else {
    auto& p = need("weight_packed");
    EXPECT_EQ(p.dtype, "U8");
    EXPECT_EQ(p.shape, (std::vector<int64_t>{R, C / 2})) << m;
    double global = 1;
    if (format == "nvfp4") {
      auto& gs = need("weight_global_scale");
      EXPECT_EQ(gs.dtype, "F32");
      float g;
      std::memcpy(&g, gs.bytes.data(), 4);
      global = g;
      for (auto& s : d.scales) s = static_cast<float>(static_cast<float>(s) / static_cast<float>(global));
    }
    for (int64_t i = 0; i < R * C; ++i) {
      unsigned byte = static_cast<unsigned char>(p.bytes[i / 2]);
      unsigned c = (i % 2 == 0) ? (byte & 15) : (byte >> 4);
      double s = d.scales[i / C * G + d.group_of(i % C)];
      double v = format == "nf4" ? spec_nf4(c) : spec_e2m1(c);
      d.values[i] = static_cast<float>(static_cast<float>(v) * static_cast<float>(s));
    }
    // Half of the widest E2M1 step (4 -> 6) is 1; nvfp4 block scales round to E4M3 (up to 1/16
    // relative below the block max: 6.375 max) and mxfp4's floor exponent clips up to 8.
    d.max_step_multiple = format == "nf4" ? 0.16 : format == "mxfp4" ? 2.0 : format == "nvfp4" ? 1.4 : 1.0 + 1e-3;
  }
  return d;
}

}  // namespace calq_test
