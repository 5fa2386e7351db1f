#include "calq/quant/format.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "calq/core/error.h"

namespace calq::quant {

namespace {

// QLoRA NormalFloat-4 (the fp32 values bitsandbytes uses), code = index.
constexpr std::array<float, 16> kNF4 = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

constexpr float kF16Max = 65504.f;

// E2M1 magnitude code of |y| with round-to-nearest-even and saturation at 6. The thresholds are
// the midpoints between neighbours; at a midpoint the even-mantissa neighbour wins
// (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
inline uint8_t e2m1_magnitude(double a) {
  return static_cast<uint8_t>((a > 0.25) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) +
                              (a > 5.0));
}

// Signed E2M1 code of y; results of magnitude 0 are always +0 (0x0).
inline uint8_t e2m1_code(double y) {
  uint8_t m = e2m1_magnitude(std::fabs(y));
  return m != 0 && y < 0 ? static_cast<uint8_t>(m | 8) : m;
}

// Nearest NF4 index of y in [-1, 1]; on an exact tie the smaller magnitude wins.
inline uint8_t nf4_code(double y) {
  uint8_t best = 0;
  double best_d = std::fabs(y - kNF4[0]);
  for (uint8_t i = 1; i < 16; ++i) {
    double d = std::fabs(y - kNF4[i]);
    if (d < best_d || (d == best_d && std::fabs(kNF4[i]) < std::fabs(kNF4[best]))) {
      best = i;
      best_d = d;
    }
  }
  return best;
}

float round_fp16_scale(double s) {
  float f = static_cast<float>(std::min<double>(s, kF16Max));
  return f16_to_f32(f32_to_f16(f));
}

}  // namespace

Format Format::parse(std::string_view name, std::optional<int> group, bool symmetric) {
  Format f;
  f.symmetric = symmetric;
  std::string n(name);
  if (n == "int2" || n == "int3" || n == "int4" || n == "int8") {
    f.family = Family::Int;
    f.bits = n[3] - '0';
  } else if (n == "fp4") {
    f.family = Family::FP4;
  } else if (n == "nvfp4") {
    f.family = Family::NVFP4;
  } else if (n == "mxfp4") {
    f.family = Family::MXFP4;
  } else if (n == "nf4") {
    f.family = Family::NF4;
  } else if (n == "fp8") {
    f.family = Family::FP8;
    f.bits = 8;
  } else {
    fail("unknown format '{}'; expected one of int2, int3, int4, int8, fp4, nvfp4, mxfp4, nf4, fp8", n);
  }
  if (f.family != Family::Int && f.family != Family::FP8) f.bits = 4;
  CALQ_CHECK(symmetric || f.family == Family::Int,
             "format {} has no asymmetric variant (asymmetric quantization is for int formats)", n);
  int dflt = f.family == Family::NVFP4 ? 16 : f.family == Family::MXFP4 ? 32 : f.family == Family::FP8 ? -1 : 128;
  f.group_size = group.value_or(dflt);
  int g = f.group_size;
  if (f.family == Family::NVFP4)
    CALQ_CHECK(g == 16, "format nvfp4 uses blocks of 16 elements; group size {} is not possible", g);
  if (f.family == Family::MXFP4)
    CALQ_CHECK(g == 32, "format mxfp4 uses blocks of 32 elements; group size {} is not possible", g);
  CALQ_CHECK(g == -1 || (g >= 16 && g <= 256 && (g & (g - 1)) == 0),
             "group size {} is not supported: use 16, 32, 64, 128, 256, or -1 for per-channel", g);
  return f;
}

std::string Format::name() const {
  switch (family) {
    case Family::Int: return "int" + std::to_string(bits);
    case Family::FP4: return "fp4";
    case Family::NVFP4: return "nvfp4";
    case Family::MXFP4: return "mxfp4";
    case Family::NF4: return "nf4";
    case Family::FP8: return "fp8";
  }
  return "?";
}

std::string Format::describe() const {
  std::string s = name();
  if (family == Family::Int) s += symmetric ? " sym" : " asym";
  s += group_size < 0 ? " per-channel" : " g" + std::to_string(group_size);
  return s;
}

DType Format::scale_dtype() const {
  switch (family) {
    case Family::NVFP4: return DType::F8_E4M3;
    case Family::MXFP4: return DType::U8;
    case Family::FP8: return DType::F32;
    default: return DType::F16;
  }
}

int values_per_int32(int bits) { return 32 / bits; }

double Format::bits_per_weight() const {
  double code_bits = family == Family::Int ? 32.0 / values_per_int32(bits) : bits;
  if (group_size < 0) return code_bits;  // one scale per row: negligible
  double scale_bits = static_cast<double>(dtype_size(scale_dtype())) * 8;
  double zero_bits = (family == Family::Int && !symmetric) ? code_bits : 0;
  return code_bits + (scale_bits + zero_bits) / group_size;
}

void Format::check_shape(int64_t rows, int64_t cols, const std::string& what) const {
  CALQ_CHECK(rows > 0 && cols > 0, "{}: empty weight [{}, {}]", what, rows, cols);
  if (group_size > 0 && cols % group_size != 0)
    fail("{}: in-features {} not divisible by group size {} ({})", what, cols, group_size, describe());
  if (bits == 4 && family != Family::Int && cols % 2 != 0)
    fail("{}: {} packs two codes per byte and needs an even number of in-features, got {}", what, name(), cols);
}

float nvfp4_global_scale(float amax) {
  if (!(amax > 0) || !std::isfinite(amax)) return 1.f;
  return static_cast<float>(448.0 * 6.0 / static_cast<double>(amax));
}

GroupParams group_params(const Format& f, const float* x, int64_t n, float shrink, float global_scale) {
  GroupParams p;
  if (f.family == Family::Int && !f.symmetric) {
    float mn = 0.f, mx = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      mn = std::min(mn, x[i]);
      mx = std::max(mx, x[i]);
    }
    mn *= shrink;
    mx *= shrink;
    const int qmin = -(1 << (f.bits - 1)), qmax = (1 << (f.bits - 1)) - 1;
    p.scale = round_fp16_scale((static_cast<double>(mx) - mn) / ((1 << f.bits) - 1));
    int zero_s = 0;
    if (p.scale > 0) zero_s = static_cast<int>(std::clamp<double>(qmin - std::nearbyint(mn / static_cast<double>(p.scale)), qmin, qmax));
    p.zero = static_cast<float>(zero_s - qmin);
    return p;
  }
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  double a = static_cast<double>(amax) * shrink;
  switch (f.family) {
    case Family::Int:
      p.scale = round_fp16_scale(a / ((1 << (f.bits - 1)) - 1));
      p.zero = static_cast<float>(1 << (f.bits - 1));
      break;
    case Family::FP4: p.scale = round_fp16_scale(a / 6.0); break;
    case Family::NF4: p.scale = round_fp16_scale(a); break;
    case Family::NVFP4: p.scale = e4m3_to_f32(f32_to_e4m3(static_cast<float>(a * global_scale / 6.0), true)); break;
    case Family::MXFP4: {
      // OCP MX v1.0: shared exponent = floor(log2(amax)) - emax(E2M1) = floor(log2(amax)) - 2.
      int e = a > 0 ? std::ilogb(static_cast<float>(a)) - 2 : -127;
      e = std::clamp(e, -127, 127);
      p.scale = e8m0_to_f32(static_cast<uint8_t>(e + 127));
      break;
    }
    case Family::FP8: p.scale = static_cast<float>(a / 448.0); break;
  }
  return p;
}

uint8_t quantize_element(const Format& f, float x, const GroupParams& p, float global_scale) {
  if (p.scale == 0.f) {
    if (f.family == Family::Int) return static_cast<uint8_t>(f.symmetric ? (1 << (f.bits - 1)) : p.zero);
    return f.family == Family::NF4 ? 7 : 0;
  }
  switch (f.family) {
    case Family::Int: {
      const int qmax_u = (1 << f.bits) - 1;
      double q = std::nearbyint(static_cast<double>(x) / p.scale) + p.zero;
      return static_cast<uint8_t>(std::clamp<double>(q, 0, qmax_u));
    }
    case Family::FP4:
    case Family::MXFP4: return e2m1_code(static_cast<double>(x) / p.scale);
    case Family::NVFP4: {
      float eff = p.scale / global_scale;
      return e2m1_code(static_cast<double>(x) / eff);
    }
    case Family::NF4: return nf4_code(static_cast<double>(x) / p.scale);
    case Family::FP8: return f32_to_e4m3(x / p.scale, true);
  }
  return 0;
}

float dequantize_element(const Format& f, uint8_t code, const GroupParams& p, float global_scale) {
  switch (f.family) {
    case Family::Int: return (static_cast<float>(code) - p.zero) * p.scale;
    case Family::FP4:
    case Family::MXFP4: return e2m1_to_f32(code) * p.scale;
    case Family::NVFP4: return e2m1_to_f32(code) * (p.scale / global_scale);
    case Family::NF4: return kNF4[code & 15] * p.scale;
    case Family::FP8: return e4m3_to_f32(code) * p.scale;
  }
  return 0.f;
}

float nf4_value(uint8_t code) { return kNF4[code & 15]; }

int64_t QuantizedWeight::group_of(int64_t col) const {
  if (!g_idx.empty()) return g_idx[static_cast<size_t>(col)];
  return format.group_size < 0 ? 0 : col / format.group_size;
}

std::vector<float> QuantizedWeight::dequantize() const {
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const int64_t G = format.groups_per_row(cols);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = dequantize_element(format, codes[r * cols + c], params[r * G + group_of(c)], global_scale);
  return out;
}

}  // namespace calq::quant
