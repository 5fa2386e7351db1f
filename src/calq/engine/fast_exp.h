// fast_exp: the CPU engine's exp(x) for float (softmax, SiLU), in a header that both the host
// compiler and nvcc compile, so that the GPU engine's exact mode (engine::Precision::Exact)
// evaluates the very same operations. Constants are hexadecimal (the bits each compiler must
// use, with no decimal conversion in between); every operation is a single IEEE rounding (the
// host sources build with -ffp-contract=off, the CUDA ones with --fmad=false), so host and device
// return the same bits for every input.
//
// x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two parts so r is exact; n rounded by the
// 1.5·2^23 trick), exp(r) by its degree-7 Taylor polynomial (relative error < 6e-9 on that
// interval), times 2^n built in the exponent bits. Below -87.3 it returns 0 (the true value is
// subnormal), above 88 +inf (a little early: exp(88.72) is the largest finite float); NaN stays
// NaN. Branch-free, so that loops over it vectorize (plain SSE2 is enough). Within a few ulp of
// std::exp (tests/unit/engine_test.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CALQ_HOST_DEVICE __host__ __device__
#else
#define CALQ_HOST_DEVICE
#endif

namespace calq::engine {

// The float / double with these bits (device intrinsics on the GPU, memcpy on the host).
CALQ_HOST_DEVICE inline float float_from_bits(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}
CALQ_HOST_DEVICE inline double double_from_bits(int64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(b);
#else
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
#endif
}

CALQ_HOST_DEVICE inline float fast_exp(float x) {
  constexpr float kLo = -0x1.5d589ep+6f;  // -87.33654
  constexpr float kHi = 0x1.6p+6f;        // 88
  constexpr float kRound = 0x1.8p+23f;    // 1.5 · 2^23
  // std::max(x, kLo) then std::min(·, kHi), written out (the same comparisons on both sides).
  float xc = x < kLo ? kLo : x;
  xc = kHi < xc ? kHi : xc;
  const float n = (xc * 0x1.715476p+0f + kRound) - kRound;  // round(x / ln2)
  const float r = (xc - n * 0x1.63p-1f) - n * -0x1.bd0106p-13f;
  float p = 0x1.a01a02p-13f;  // 1/5040
  p = p * r + 0x1.6c16c2p-10f;  // 1/720
  p = p * r + 0x1.111112p-7f;   // 1/120
  p = p * r + 0x1.555556p-5f;   // 1/24
  p = p * r + 0x1.555556p-3f;   // 1/6
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float y = p * float_from_bits(e);
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? INFINITY : y;
  return x != x ? x : y;
}

}  // namespace calq::engine
