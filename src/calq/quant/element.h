// Element formats, one element at a time, for the host and the CUDA device: the group-parameter
// rules (scale rounded to its storage type: fp16, E4M3 for nvfp4, E8M0 for mxfp4, f32 for fp8),
// the code of one element, the value of a code, the clip search and its error. One
// implementation: format.cpp's scalar paths and the CUDA GPTQ kernel (backend/cuda/gptq_kernel.cu)
// both call these functions, so codes and parameters are the same bits on both. The CPU's 4-lane
// bulk paths (format.cpp: quantize_group) are accelerations of code() and are tested against it.
//
// Everything here is plain arithmetic in IEEE fp32/fp64 with round-to-nearest-even and no fused
// multiply-add (the library builds with -ffp-contract=off, the CUDA code with --fmad=false), bit
// manipulation, and no library calls whose results could differ between host and device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CALQ_HD __host__ __device__
#else
#define CALQ_HD
#endif

namespace calq::quant {

enum class Family { Int, FP4, NVFP4, MXFP4, NF4, FP8 };

// Parameters of one (row, group): `scale` is the exact value of the stored scale (representable in
// the format's scale dtype; for nvfp4 the stored E4M3 block scale, before division by the global
// scale). `zero` is the int zero point in unsigned code units: asymmetric, the stored zero point (an
// integer in [0, 2^bits-1]); symmetric, the fixed offset 2^(bits-1); 0 for other families.
struct GroupParams {
  float scale = 0.f;
  float zero = 0.f;
};

namespace elem {

// What the element code needs of a Format (format.h: Format::spec()).
struct Spec {
  Family family = Family::Int;
  int bits = 4;
  bool symmetric = true;
};

// ---- bits ----
CALQ_HD inline uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
CALQ_HD inline float bits_f32(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}
CALQ_HD inline uint64_t f64_bits(double x) {
  uint64_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
CALQ_HD inline double bits_f64(uint64_t u) {
  double x;
  memcpy(&x, &u, sizeof x);
  return x;
}
CALQ_HD inline float abs_f32(float x) { return bits_f32(f32_bits(x) & 0x7FFFFFFFu); }
// std::min / std::max / std::clamp, with their exact comparison order (NaN behaviour included).
template <typename T>
CALQ_HD inline T min_of(T a, T b) {
  return (b < a) ? b : a;
}
template <typename T>
CALQ_HD inline T max_of(T a, T b) {
  return (a < b) ? b : a;
}
template <typename T>
CALQ_HD inline T clamp_to(T v, T lo, T hi) {
  return (v < lo) ? lo : (hi < v) ? hi : v;
}

// Round half to even of a double with |y| < 2^51 (callers clamp first): adding and subtracting
// 1.5*2^52 leaves the nearest integer, ties to even, in the default rounding mode.
CALQ_HD inline double rne(double y) {
  const double kMagic = 6755399441055744.0;
  return (y + kMagic) - kMagic;
}

// 2^e exactly, for -1074 <= e <= 1023 (double) / -149 <= e <= 127 (float).
CALQ_HD inline double pow2_f64(int e) {
  return e >= -1022 ? bits_f64(static_cast<uint64_t>(e + 1023) << 52) : bits_f64(uint64_t{1} << (e + 1074));
}
CALQ_HD inline float pow2_f32(int e) {
  return e >= -126 ? bits_f32(static_cast<uint32_t>(e + 127) << 23) : bits_f32(1u << (e + 149));
}

// ---- narrow storage types of scales ----

// The fp16 value nearest to x (RNE; beyond 65504 rounds to ±Inf; NaN → quiet NaN, sign kept,
// payload dropped): f16_to_f32(f32_to_f16(x)) of core/dtype.h, in one step.
CALQ_HD inline float f16_round(float x) {
  const uint32_t u = f32_bits(x), a = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
  if (a > 0x7F800000u) return bits_f32(sign | 0x7FC00000u);
  if (a < 0x38800000u) {
    // Below 2^-14 the fp16 quantum is 2^-24, the fp32 ulp of [0.5, 1): one exact RNE addition.
    const float r = (bits_f32(a) + 0.5f) - 0.5f;
    return bits_f32(sign | f32_bits(r));
  }
  const uint32_t r = ((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) << 13;  // RNE to 10 mantissa bits
  return bits_f32(sign | (r > 0x477FE000u ? 0x7F800000u : r));       // above 65504: Inf
}

// E4M3 code of y: nearest, ties to even, saturating at ±448, zero as 0x00.
CALQ_HD inline uint8_t e4m3_code(double y) {
  const double a = fabs(y);
  uint32_t mag;
  if (a > 448.0) {
    mag = 0x7E;
  } else if (a < 0.015625) {  // below 2^-6: subnormal quantum 2^-9; 8 carries into e=1, m=0
    mag = static_cast<uint32_t>(rne(a * 512.0));
  } else {
    // Round the 52-bit mantissa to 3 bits, ties to even, letting the carry run into the exponent;
    // then rebias the exponent from 1023 to 7.
    const uint64_t b = f64_bits(a);
    const uint64_t r = (b + ((uint64_t{1} << 48) - 1) + ((b >> 49) & 1)) >> 49;
    mag = static_cast<uint32_t>(r - ((1023 - 7) << 3));
  }
  return static_cast<uint8_t>(mag | ((y < 0 && mag != 0) ? 0x80 : 0));
}

// The value of an E4M3 code (0x7F/0xFF: quiet NaN), as core/dtype.h's e4m3_to_f32.
CALQ_HD inline float e4m3_value(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24, mag = c & 0x7Fu;
  if (mag == 0x7F) return bits_f32(sign | 0x7FC00000u);
  const uint32_t e = mag >> 3, m = mag & 7u;
  const uint32_t b = e != 0 ? ((e + 120u) << 23) | (m << 20) : f32_bits(static_cast<float>(m) * 0.001953125f);
  return bits_f32(sign | b);
}

// ---- value tables (one list of values; a device copy in constant memory under nvcc) ----
#define CALQ_NF4_VALUES                                                                            \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,        \
      0.7229568362236023f, 1.0f
#define CALQ_E2M1_VALUES 0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f

inline constexpr float kNF4Host[16] = {CALQ_NF4_VALUES};
inline constexpr float kE2M1Host[16] = {CALQ_E2M1_VALUES};
#if defined(__CUDACC__)
static __constant__ float kNF4Device[16] = {CALQ_NF4_VALUES};
static __constant__ float kE2M1Device[16] = {CALQ_E2M1_VALUES};
#endif

// QLoRA NormalFloat-4 (the fp32 values bitsandbytes uses), code = index.
CALQ_HD inline float nf4_table(int i) {
#if defined(__CUDA_ARCH__)
  return kNF4Device[i & 15];
#else
  return kNF4Host[i & 15];
#endif
}
// E2M1 values, code = index (bit 3 the sign).
CALQ_HD inline float e2m1_table(int i) {
#if defined(__CUDA_ARCH__)
  return kE2M1Device[i & 15];
#else
  return kE2M1Host[i & 15];
#endif
}

// ---- group parameters ----

constexpr float kF16Max = 65504.f;
// Quotients at or above these round to Inf (fp16) / beyond 448 (E4M3): a real overflow, as
// opposed to a value a hair above the maximum that rounds down to it anyway.
constexpr float kF16Overflow = 65520.f;
constexpr float kE4M3Overflow = 464.f;

// fp16 storage of a non-negative fp32 quotient q, clamped so that it never becomes Inf.
CALQ_HD inline float fp16_scale(float q, bool* saturated) {
  if (saturated && q >= kF16Overflow) *saturated = true;
  return f16_round(min_of(q, kF16Max));
}

// mxfp4's E8M0 scale of a group whose (shrunk) absmax is a: compressed-tensors rounds amax to a
// power of two, up when its significand is >= 1.75, then subtracts floor(log2 6) = 2.
CALQ_HD inline float mxfp4_scale(float a) {
  int e = -127;
  if (a > 0) {
    const uint32_t b = f32_bits(a);
    const int field = static_cast<int>(b >> 23);
    if (field == 255) {
      e = 127;  // Inf: std::ilogb gives INT_MAX, clamped
    } else {
      // k = ilogb(a) (exact, subnormals included); a >= 1.75·2^k in double is exact.
      int k;
      if (field != 0) {
        k = field - 127;
      } else {
        uint32_t m = b & 0x7FFFFFu;
        k = -150;
        while (m) {
          m >>= 1;
          ++k;
        }
      }
      e = k - 2 + (static_cast<double>(a) >= 1.75 * pow2_f64(k) ? 1 : 0);
      e = clamp_to(e, -127, 127);
    }
  }
  return pow2_f32(e);  // 2^-127 is an fp32 subnormal: exact
}

// A group's parameters from its minimum and maximum, the range shrunk by `shrink` (1 = absmax or
// min/max); see quant::group_params_from_range.
CALQ_HD inline GroupParams params_from_range(Spec f, float mn, float mx, float shrink, float global_scale,
                                             bool* saturated) {
  GroupParams p;
  if (f.family == Family::Int && !f.symmetric) {
    const float lo = min_of(mn, 0.f) * shrink, hi = max_of(mx, 0.f) * shrink;
    const int top = (1 << f.bits) - 1;
    p.scale = fp16_scale((hi - lo) / static_cast<float>(top), saturated);
    p.zero = 0.f;
    if (p.scale > 0) {
      const double z = clamp_to(-static_cast<double>(lo) / p.scale, 0.0, static_cast<double>(top));
      p.zero = static_cast<float>(rne(z));
    }
    return p;
  }
  const float a = max_of(abs_f32(mn), abs_f32(mx)) * shrink;
  switch (f.family) {
    case Family::Int: {
      const float d = static_cast<float>((1 << f.bits) - 1) / 2;  // 1.5, 3.5, 7.5, 127.5: exact
      p.scale = fp16_scale(a / d, saturated);
      p.zero = static_cast<float>(1 << (f.bits - 1));
      break;
    }
    case Family::FP4:
      p.scale = fp16_scale(a / 6.f, saturated);
      break;
    case Family::NF4:
      p.scale = fp16_scale(a, saturated);
      break;
    case Family::NVFP4: {
      const float t = (a / 6.f) * global_scale;
      if (saturated && !(t < kE4M3Overflow)) *saturated = true;
      p.scale = e4m3_value(e4m3_code(min_of(t, 448.f)));  // RNE, exact; t >= 0
      break;
    }
    case Family::MXFP4:
      p.scale = mxfp4_scale(a);
      break;
    case Family::FP8:
      p.scale = a / 448.f;
      break;
  }
  return p;
}

// The minimum and maximum of n values (stride apart), both starting from 0 (so the range always
// holds 0), as RTN and GPTQ compute them.
CALQ_HD inline void min_max(const float* x, int64_t n, int64_t stride, float* mn_out, float* mx_out) {
  float mn = 0.f, mx = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    mn = min_of(mn, v);
    mx = max_of(mx, v);
  }
  *mn_out = mn;
  *mx_out = mx;
}

// ---- element codes ----

// nvfp4's effective scale fp32(s / G), as compressed-tensors divides before quantizing.
CALQ_HD inline float nvfp4_effective(float s, float g) { return s / g; }

// The code every element of a zero-scale group gets (docs/format.md rule 4).
CALQ_HD inline uint8_t zero_scale_code(Spec f) {
  if (f.family == Family::Int) return static_cast<uint8_t>(f.symmetric ? (1 << (f.bits - 1)) : 0);
  return f.family == Family::NF4 ? 7 : 0;
}

// The next fp32 value towards -Inf of a finite float.
CALQ_HD inline float next_down(float h) {
  const uint32_t b = f32_bits(h);
  if (h > 0) return bits_f32(b - 1);
  if (h == 0) return bits_f32(0x80000001u);  // -denorm_min
  return bits_f32(b + 1);
}

// A threshold test "y > T" (or "y >= T") on the exact quotient y = x/s, turned into a test on x
// alone: x > H with H the fp32 value for which that is equivalent. T = cut * s is computed in
// double, where it is exact for the cuts used here (at most 25 significant bits times a 24-bit
// scale). Then for fp32 x: x > T iff x > floor_f32(T); x >= T iff x > pred_f32(T) when T is an
// fp32 value and x > floor_f32(T) otherwise. So codes need no division and compare exactly.
CALQ_HD inline float threshold_for_x(double t, bool inclusive) {
  const float h = static_cast<float>(t);
  if (static_cast<double>(h) > t) return next_down(h);  // floor_f32(T)
  if (static_cast<double>(h) == t && inclusive) return next_down(h);
  return h;
}

// E2M1 rounding thresholds on |x/s| (compressed-tensors' cast_to_fp4): ties go to the even
// mantissa, so at 0.75, 1.75, 3.5 the upper neighbour wins (>=) and at 0.25, 1.25, 2.5, 5 the
// lower one (>).
CALQ_HD inline double e2m1_cut(int j) {
  return j == 0 ? 0.25 : j == 1 ? 0.75 : j == 2 ? 1.25 : j == 3 ? 1.75 : j == 4 ? 2.5 : j == 5 ? 3.5 : 5.0;
}
CALQ_HD inline bool e2m1_cut_inclusive(int j) { return j == 1 || j == 3 || j == 5; }

// int: u = clamp(RNE(x/s + z), 0, hi), the double quotient deciding every tie (docs/format.md
// rule 2).
CALQ_HD inline uint8_t code_int(float x, float s, float z, int hi) {
  const double y = clamp_to(static_cast<double>(x) / s + z, -1.0, hi + 1.0);
  return static_cast<uint8_t>(clamp_to(static_cast<int>(rne(y)), 0, hi));
}
// E2M1 (fp4, nvfp4, mxfp4) with effective scale e: the 7 thresholds on |x|; the magnitude of a
// code is the number of thresholds |x| exceeds; -0 and values rounding to 0 give 0x0.
CALQ_HD inline void e2m1_thresholds(float e, float* h) {
  for (int j = 0; j < 7; ++j) h[j] = threshold_for_x(e2m1_cut(j) * e, e2m1_cut_inclusive(j));
}
CALQ_HD inline uint8_t code_e2m1(float x, const float* h) {
  const float a = abs_f32(x);
  int m = 0;
  for (int j = 0; j < 7; ++j) m += a > h[j];
  return static_cast<uint8_t>(m | (x < 0 && m ? 8 : 0));
}
// NF4 with scale s: index = number of midpoints x/s lies above (15 thresholds on x); an exact tie
// goes to the entry of smaller magnitude: at negative midpoints the upper neighbour (>=), at
// positive ones the lower (>).
CALQ_HD inline void nf4_thresholds(float s, float* h) {
  for (int j = 0; j < 15; ++j) {
    const double mid = (static_cast<double>(nf4_table(j)) + nf4_table(j + 1)) / 2;  // exact
    h[j] = threshold_for_x(mid * s, mid < 0);
  }
}
CALQ_HD inline uint8_t code_nf4(float x, const float* h) {
  int m = 0;
  for (int j = 0; j < 15; ++j) m += x > h[j];
  return static_cast<uint8_t>(m);
}
// fp8: the E4M3 code of x/s in double.
CALQ_HD inline uint8_t code_fp8(float x, float s) { return e4m3_code(static_cast<double>(x) / static_cast<double>(s)); }

// The codes of one group: built once per group (the thresholds of its scale), then code(x) per
// element. quant::quantize_element() and the CUDA kernel use it; format.cpp's bulk paths
// (quantize_group) agree with it on every input (tests/unit/element_test.cpp).
struct Coder {
  Family family = Family::Int;
  bool zero_scale = true;  // the effective scale is 0: every element gets `zc`
  uint8_t zc = 0;
  int hi = 0;              // int: the largest code
  float s = 0.f, z = 0.f;  // int: scale, zero; fp8: scale
  float h[15] = {};        // e2m1: 7 thresholds on |x|; nf4: 15 thresholds on x

  Coder() = default;
  CALQ_HD Coder(Spec f, GroupParams p, float global_scale) {
    family = f.family;
    const float e = f.family == Family::NVFP4 ? nvfp4_effective(p.scale, global_scale) : p.scale;
    zero_scale = e == 0.f;
    zc = zero_scale_code(f);
    s = p.scale;
    z = p.zero;
    hi = (1 << f.bits) - 1;
    if (zero_scale) return;
    if (f.family == Family::FP4 || f.family == Family::MXFP4 || f.family == Family::NVFP4) e2m1_thresholds(e, h);
    if (f.family == Family::NF4) nf4_thresholds(p.scale, h);
  }

  CALQ_HD uint8_t code(float x) const {
    if (zero_scale) return zc;
    switch (family) {
      case Family::Int:
        return code_int(x, s, z, hi);
      case Family::FP4:
      case Family::MXFP4:
      case Family::NVFP4:
        return code_e2m1(x, h);
      case Family::NF4:
        return code_nf4(x, h);
      case Family::FP8:
        return code_fp8(x, s);
    }
    return 0;
  }
};

// The value of a code (docs/format.md: an fp32 product).
CALQ_HD inline float value(Spec f, uint8_t u, GroupParams p, float g) {
  switch (f.family) {
    case Family::Int:
      return (static_cast<float>(u) - p.zero) * p.scale;
    case Family::FP4:
    case Family::MXFP4:
      return e2m1_table(u) * p.scale;
    case Family::NVFP4:
      return e2m1_table(u) * nvfp4_effective(p.scale, g);
    case Family::NF4:
      return nf4_table(u) * p.scale;
    case Family::FP8:
      return e4m3_value(u) * p.scale;
  }
  return 0.f;
}

// One element's term of the clip-search error: |d|^norm (norm 2 and 1 without pow).
CALQ_HD inline double error_term(double d, float norm) {
  if (norm == 2.f) return d * d;
  if (norm == 1.f) return fabs(d);
  return pow(fabs(d), static_cast<double>(norm));
}

// Σ over the group of |x − dequantize(quantize(x))|^norm in double, element by element in order.
CALQ_HD inline double group_error(Spec f, const float* x, int64_t n, GroupParams p, float g, float norm) {
  const Coder c(f, p, g);
  double err = 0;
  for (int64_t i = 0; i < n; ++i) err += error_term(static_cast<double>(x[i]) - value(f, c.code(x[i]), p, g), norm);
  return err;
}

// The parameters of a group with range [mn, mx]: absmax (min/max), or with `clip` the shrink grid
// of RTN's clip search (shrink 1 − i·(1 − clip_min)/(grid − 1), i < grid; repeated parameters
// skipped; the first smallest error wins). err(params) is the group's error (group_error above,
// or the CPU's bulk version of it).
template <typename ErrFn>
CALQ_HD inline GroupParams choose_params(Spec f, float mn, float mx, bool clip, int grid, float clip_min, float global,
                                         ErrFn&& err) {
  GroupParams best = params_from_range(f, mn, mx, 1.f, global, nullptr);
  if (!clip || grid <= 1) return best;
  double best_err = err(best);
  GroupParams prev = best;
  for (int i = 1; i < grid; ++i) {
    const float s = static_cast<float>(1.0 - i * (1.0 - static_cast<double>(clip_min)) / (grid - 1));
    const GroupParams c = params_from_range(f, mn, mx, s, global, nullptr);
    if (c.scale == prev.scale && c.zero == prev.zero) continue;
    prev = c;
    const double e = err(c);
    if (e < best_err) {
      best_err = e;
      best = c;
    }
  }
  return best;
}

}  // namespace elem
}  // namespace calq::quant
