// Exact scalar and bulk dtype conversions. Every fp32 -> narrow conversion is done on the fp32
// bits (or by one exact FPU addition), never through double or another narrow format, so there
// is exactly one rounding. The code is branchless so that the bulk loops vectorize.
#include "calq/core/dtype.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "calq/core/error.h"

namespace calq {

namespace {

constexpr uint32_t kF32AbsMask = 0x7FFFFFFFu;
constexpr uint32_t kF32Inf = 0x7F800000u;
constexpr uint32_t kF32QuietNaN = 0x7FC00000u;
constexpr uint32_t kF32QuietBit = 0x00400000u;

inline uint32_t f32_bits(float x) { return std::bit_cast<uint32_t>(x); }
inline float bits_f32(uint32_t u) { return std::bit_cast<float>(u); }

// c ? a : b, written with a mask. A plain ?: lets g++ move a floating-point operation that only
// one side uses into a branch, and then (as it may trap under -ftrapping-math) it will not turn
// the branch back into a vector select: the bulk loops would not vectorize.
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// ---- fp32 -> narrow float ----

// A narrow binary float with an IEEE-like layout [sign | exponent | mantissa]. The exponent field
// 0 holds the subnormals; `max_code` is the magnitude code of the largest finite value.
struct NarrowFormat {
  int nbits;          // total bits; the sign is the top bit
  int mbits;          // stored mantissa bits
  int bias;           // exponent bias
  uint32_t max_code;  // magnitude code of the largest finite value
  uint32_t nan_mag;   // magnitude code produced for a NaN input
  bool nan_signed;    // whether a NaN input keeps its sign bit (false: e2m1, where NaN -> +0)
};

constexpr NarrowFormat kF16Fmt{16, 10, 15, 0x7BFF, 0x7E00, true};
constexpr NarrowFormat kE4M3Fmt{8, 3, 7, 0x7E, 0x7F, true};
constexpr NarrowFormat kE5M2Fmt{8, 2, 15, 0x7B, 0x7F, true};
constexpr NarrowFormat kE2M1Fmt{4, 1, 1, 0x7, 0x0, false};

// Encodes fp32 x in format F with RNE. A magnitude whose rounded value (with an unbounded
// exponent) exceeds F's largest finite value becomes `over_mag` (Inf, NaN or max, per format and
// mode); ±Inf inputs take the same path, because their rounded value is "above max" too.
template <NarrowFormat F>
inline uint32_t encode_narrow(float x, uint32_t over_mag) {
  constexpr int kShift = 23 - F.mbits;     // fp32 mantissa bits dropped in the normal range
  constexpr int kEmin = 1 - F.bias;        // exponent of the smallest normal
  constexpr uint32_t kRebias = static_cast<uint32_t>(127 - F.bias) << F.mbits;
  constexpr uint32_t kMinNormal = static_cast<uint32_t>(127 + kEmin) << 23;  // 2^kEmin, fp32 bits
  // A float whose ulp is F's subnormal quantum 2^(kEmin - mbits); every subnormal of F plus it
  // stays in its binade (mbits < 23).
  constexpr float kMagic = std::bit_cast<float>(static_cast<uint32_t>(127 + kEmin - F.mbits + 23)
                                                << 23);
  const uint32_t u = f32_bits(x);
  const uint32_t a = u & kF32AbsMask;
  const uint32_t sign = (u >> 31) << (F.nbits - 1);
  // Normal range of F: RNE on the dropped bits (add half-ulp - 1, plus 1 if the kept LSB is odd);
  // a carry out of the mantissa correctly bumps the exponent. Then rebias 127 -> F.bias.
  // a <= 0x7FFFFFFF and the addend < 2^22, so this cannot overflow 32 bits.
  const uint32_t normal =
      ((a + ((1u << (kShift - 1)) - 1) + ((a >> kShift) & 1)) >> kShift) - kRebias;
  // Below 2^kEmin the quantum is fixed: adding kMagic makes the FPU round |x| to a multiple of the
  // quantum, RNE, in one exact rounding; the sum's low bits are then the subnormal code (a result
  // of 2^mbits is the smallest normal's code, also correct). The sum is a normal fp32, so this is
  // right even with flush-to-zero; with denormals-are-zero only fp32-subnormal inputs (which round
  // to 0 in every format here anyway) are affected.
  const uint32_t sub = f32_bits(bits_f32(a) + kMagic) - f32_bits(kMagic);
  uint32_t mag = select(a < kMinNormal, sub, normal);
  mag = mag > F.max_code ? over_mag : mag;
  const uint32_t nan = (F.nan_signed ? sign : 0u) | F.nan_mag;
  return select(a > kF32Inf, nan, sign | mag);
}

inline uint16_t encode_f16(float x) {
  return static_cast<uint16_t>(encode_narrow<kF16Fmt>(x, 0x7C00));
}
inline uint8_t encode_e4m3(float x, bool saturate) {
  return static_cast<uint8_t>(encode_narrow<kE4M3Fmt>(x, saturate ? 0x7Eu : 0x7Fu));
}
inline uint8_t encode_e5m2(float x, bool saturate) {
  return static_cast<uint8_t>(encode_narrow<kE5M2Fmt>(x, saturate ? 0x7Bu : 0x7Cu));
}

inline uint16_t encode_bf16(float x) {
  // bf16 is fp32 with 16 mantissa bits dropped: RNE on the bits directly works for subnormals,
  // and the carry out of the largest finite values gives exactly Inf (0x7F80).
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
  return static_cast<uint16_t>((u & kF32AbsMask) > kF32Inf ? nan : rounded);
}

// ---- narrow float -> fp32 ----

inline float decode_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent+mantissa, fp32-aligned
  const uint32_t exp = h & 0x7C00u;
  const uint32_t normal = em + (112u << 23);                       // rebias 15 -> 127
  const uint32_t special = (em + (224u << 23)) | (em & 0x7FFFFFu ? kF32QuietBit : 0u);  // Inf/NaN
  // A subnormal m·2^-24: read the mantissa as 1.m·2^-14 and subtract 2^-14 (exact, Sterbenz).
  const uint32_t sub = f32_bits(bits_f32(em + (113u << 23)) - bits_f32(113u << 23));
  const uint32_t mag = select(exp == 0, sub, exp == 0x7C00u ? special : normal);
  return bits_f32(sign | mag);
}

inline float decode_bf16(uint16_t h) {
  // bf16 is the top half of fp32; only NaNs are changed, made quiet like every decoder's NaNs.
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  return bits_f32((u & kF32AbsMask) > kF32Inf ? (u | kF32QuietBit) : u);
}

// fp32 bits of the value of a finite magnitude code of a narrow format, computed from the fields.
constexpr uint32_t narrow_value_bits(uint32_t mag, int mbits, int bias) {
  const uint32_t e = mag >> mbits, m = mag & ((1u << mbits) - 1);
  if (e != 0) return ((e - bias + 127) << 23) | (m << (23 - mbits));
  if (m == 0) return 0;
  // Subnormal m·2^(1-bias-mbits): normalize around m's top bit p.
  const int p = std::bit_width(m) - 1;
  return static_cast<uint32_t>(p + 1 - bias - mbits + 127) << 23 | ((m - (1u << p)) << (23 - p));
}

// Decode tables of the 8- and 4-bit formats, built at compile time from fp32 bit patterns.
template <size_t N, typename Fn>
constexpr std::array<float, N> make_table(Fn bits_of) {
  std::array<float, N> t{};
  for (uint32_t c = 0; c < N; ++c) t[c] = std::bit_cast<float>(bits_of(c));
  return t;
}

alignas(64) constexpr std::array<float, 256> kE4M3Table = make_table<256>([](uint32_t c) {
  const uint32_t sign = (c & 0x80u) << 24, mag = c & 0x7Fu;
  return sign | (mag == 0x7F ? kF32QuietNaN : narrow_value_bits(mag, 3, 7));
});
alignas(64) constexpr std::array<float, 256> kE5M2Table = make_table<256>([](uint32_t c) {
  const uint32_t sign = (c & 0x80u) << 24, mag = c & 0x7Fu;
  if (mag == 0x7C) return sign | kF32Inf;
  // NaN codes keep their payload, made quiet, like the fp16 decoder (e5m2 is the top byte of fp16).
  if (mag > 0x7C) return sign | kF32Inf | kF32QuietBit | ((mag & 3u) << 21);
  return sign | narrow_value_bits(mag, 2, 15);
});
alignas(64) constexpr std::array<float, 256> kE8M0Table = make_table<256>([](uint32_t c) {
  if (c == 0xFF) return kF32QuietNaN;
  return c == 0 ? kF32QuietBit : c << 23;  // 2^-127 is the fp32 subnormal 0x00400000
});
constexpr std::array<float, 16> kE2M1Table = make_table<16>([](uint32_t c) {
  return ((c & 0x8u) << 28) | narrow_value_bits(c & 0x7u, 1, 1);
});

// ---- bulk helpers ----

// Below this many elements a conversion is memory-bound work of well under a millisecond and a
// thread team costs more than it saves.
constexpr size_t kParallelMin = size_t{1} << 18;
constexpr size_t kBlock = size_t{1} << 15;

// Runs kernel(begin, end) over [0, n), in parallel blocks when n is large. Kernels must not throw.
template <typename Kernel>
void for_blocks(size_t n, Kernel kernel) {
  if (n < kParallelMin) {
    kernel(size_t{0}, n);
    return;
  }
  const auto nblocks = static_cast<int64_t>((n + kBlock - 1) / kBlock);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const size_t begin = static_cast<size_t>(b) * kBlock;
    kernel(begin, std::min(n, begin + kBlock));
  }
}

template <typename Src, typename Dst, typename Fn>
void map_elements(const void* src, void* dst, size_t n, Fn fn) {
  // Loads and stores go through memcpy: tensor data in a safetensors file is only byte-aligned
  // when its header length is not a multiple of the element size.
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  for_blocks(n, [=](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      Src v;
      std::memcpy(&v, s + i * sizeof(Src), sizeof(Src));
      const Dst r = fn(v);
      std::memcpy(d + i * sizeof(Dst), &r, sizeof(Dst));
    }
  });
}

}  // namespace

// ---- names and sizes ----

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: case DType::U64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    case DType::F8_E4M3: case DType::F8_E5M2: case DType::F8_E8M0: case DType::F4_E2M1:
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  fail("invalid DType value {}", static_cast<int>(t));
}

uint64_t dtype_nbytes(DType t, uint64_t numel) {
  if (t == DType::F4_E2M1) {
    CALQ_CHECK(numel % 2 == 0, "{} F4 elements do not fill whole bytes (two per byte)", numel);
    return numel / 2;
  }
  const uint64_t esize = dtype_size(t);
  CALQ_CHECK(numel <= std::numeric_limits<uint64_t>::max() / esize,
             "{} elements of {} take more bytes than fit in 64 bits", numel, dtype_name(t));
  return numel * esize;
}

namespace {
constexpr std::array<std::string_view, 17> kNames = {
    "F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
    "I64", "I32", "I16", "I8",   "U64",     "U32",     "U16",     "U8", "BOOL",
};
static_assert(static_cast<size_t>(DType::BOOL) + 1 == kNames.size(), "kNames follows DType");
}  // namespace

std::string_view dtype_name(DType t) {
  const auto i = static_cast<size_t>(t);
  if (i >= kNames.size()) fail("invalid DType value {}", i);
  return kNames[i];
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (size_t i = 0; i < kNames.size(); ++i)
    if (kNames[i] == name) return static_cast<DType>(i);
  return std::nullopt;
}

bool dtype_is_float(DType t) {
  switch (t) {
    case DType::F64: case DType::F32: case DType::F16: case DType::BF16: case DType::F8_E4M3:
    case DType::F8_E5M2:
      return true;
    default:
      return false;
  }
}

// ---- scalar conversions ----

float bf16_to_f32(uint16_t h) { return decode_bf16(h); }
uint16_t f32_to_bf16(float x) { return encode_bf16(x); }
float f16_to_f32(uint16_t h) { return decode_f16(h); }
uint16_t f32_to_f16(float x) { return encode_f16(x); }
float e4m3_to_f32(uint8_t c) { return kE4M3Table[c]; }
uint8_t f32_to_e4m3(float x, bool saturate) { return encode_e4m3(x, saturate); }
float e5m2_to_f32(uint8_t c) { return kE5M2Table[c]; }
uint8_t f32_to_e5m2(float x, bool saturate) { return encode_e5m2(x, saturate); }
float e2m1_to_f32(uint8_t code) { return kE2M1Table[code & 0xFu]; }
uint8_t f32_to_e2m1(float x) {
  return static_cast<uint8_t>(encode_narrow<kE2M1Fmt>(x, kE2M1Fmt.max_code));
}
float e8m0_to_f32(uint8_t e) { return kE8M0Table[e]; }

uint8_t f32_to_e8m0(float x, E8M0Round mode) {
  CALQ_CHECK(std::isfinite(x) && x > 0,
             "cannot encode {} as an E8M0 scale: it must be a positive finite number", x);
  int k = -127;  // x = 2^k · (1 + frac / 2^23)
  uint32_t u = f32_bits(x);
  if (u < 0x00800000u) {  // fp32 subnormal: scale by 2^64 (exact) to read its exponent
    u = f32_bits(x * 0x1p64f);
    k -= 64;
  }
  k += static_cast<int>(u >> 23);
  const uint32_t frac = u & 0x7FFFFFu;
  if (mode == E8M0Round::Ceil && frac != 0) ++k;
  if (mode == E8M0Round::Nearest && frac >= 0x400000u) ++k;  // x >= 1.5·2^k: ties go up
  return static_cast<uint8_t>(std::clamp(k, -127, 127) + 127);
}

// ---- bulk conversions ----

void to_f32(const void* src, DType t, float* dst, size_t n) {
  switch (t) {
    case DType::F32:
      if (n != 0) std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::F64:
      return map_elements<double, float>(src, dst, n,
                                         [](double v) { return static_cast<float>(v); });
    case DType::BF16:
      return map_elements<uint16_t, float>(src, dst, n,
                                           [](uint16_t h) { return decode_bf16(h); });
    case DType::F16:
      return map_elements<uint16_t, float>(src, dst, n,
                                           [](uint16_t h) { return decode_f16(h); });
    case DType::F8_E4M3:
      return map_elements<uint8_t, float>(src, dst, n, [](uint8_t c) { return kE4M3Table[c]; });
    case DType::F8_E5M2:
      return map_elements<uint8_t, float>(src, dst, n, [](uint8_t c) { return kE5M2Table[c]; });
    default:
      fail("cannot convert dtype {} to fp32 (only F64, F32, F16, BF16, F8_E4M3, F8_E5M2)",
           dtype_name(t));
  }
}

void from_f32(const float* src, DType t, void* dst, size_t n) {
  switch (t) {
    case DType::F32:
      if (n != 0) std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::F64:
      return map_elements<float, double>(src, dst, n,
                                         [](float v) { return static_cast<double>(v); });
    case DType::BF16:
      return map_elements<float, uint16_t>(src, dst, n,
                                           [](float v) { return encode_bf16(v); });
    case DType::F16:
      return map_elements<float, uint16_t>(src, dst, n,
                                           [](float v) { return encode_f16(v); });
    case DType::F8_E4M3:
      return map_elements<float, uint8_t>(src, dst, n,
                                          [](float v) { return encode_e4m3(v, true); });
    case DType::F8_E5M2:
      return map_elements<float, uint8_t>(src, dst, n,
                                          [](float v) { return encode_e5m2(v, false); });
    default:
      fail("cannot convert fp32 to dtype {} (only F64, F32, F16, BF16, F8_E4M3, F8_E5M2)",
           dtype_name(t));
  }
}

}  // namespace calq
