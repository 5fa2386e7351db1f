// Element formats: scale rules, element codes, pack/unpack. The rules are docs/format.md §2 and
// the layouts §3; tests/unit/format_test.cpp checks both against independent references.
#include "calq/quant/format.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "calq/core/error.h"
#include "calq/quant/layout.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Codes must be bit-identical to the spec's fp32/double arithmetic; fusing a*b+c into an FMA
// would change rounding, so the library is compiled with -ffp-contract=off (CMakeLists.txt).

namespace calq::quant {

namespace {

// The element rules themselves (thresholds, scale rounding, codes, values) are calq/quant/
// element.h, shared with the CUDA kernels; this file adds the 4-lane bulk paths and pack/unpack.
// ---- 4-lane vectors (GCC vector extensions). 16 bytes is native at the x86-64 baseline (SSE2)
// and on NEON, so GCC never splits them; -O2 builds do not auto-vectorise these loops. ----
using vf = float __attribute__((vector_size(16)));
using vi = int32_t __attribute__((vector_size(16)));
using vu8 = uint8_t __attribute__((vector_size(4)));

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf splat(float x) {
  return vf{} + x;
}
inline vi splati(int32_t x) {
  return vi{} + x;
}

// Stores 16 codes (each lane 0..255) as bytes; SSE2's saturating packs do the narrowing in two
// instructions where a generic conversion would go lane by lane.
inline void store16(uint8_t* p, vi a, vi b, vi c, vi d) {
#if defined(__SSE2__)
  const __m128i ab = _mm_packs_epi32(reinterpret_cast<__m128i>(a), reinterpret_cast<__m128i>(b));
  const __m128i cd = _mm_packs_epi32(reinterpret_cast<__m128i>(c), reinterpret_cast<__m128i>(d));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(ab, cd));
#else
  const vi v[4] = {a, b, c, d};
  for (int k = 0; k < 4; ++k) {
    vu8 bytes = __builtin_convertvector(v[k], vu8);
    std::memcpy(p + 4 * k, &bytes, sizeof bytes);
  }
#endif
}

// Runs a 4-lane code function over x, 16 elements at a time, and a scalar one over the tail.
template <typename Vec, typename Scalar>
inline void run_codes(const float* x, int64_t n, uint8_t* out, Vec&& vec, Scalar&& scalar) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    store16(out + i, vec(loadv(x + i)), vec(loadv(x + i + 4)), vec(loadv(x + i + 8)),
            vec(loadv(x + i + 12)));
  for (; i < n; ++i) out[i] = scalar(x[i]);
}

// ---- int: u = clamp(RNE(x/s + z), 0, 2^b - 1) ----

// Exact scalar path (any scale): the double quotient decides every tie (docs/format.md rule 2).
void codes_int_exact(const float* x, int64_t n, float s, float z, int hi, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = elem::code_int(x[i], s, z, hi);
}

// Fast path for fp16 scales: y ~ x * (1/s) picks a candidate k within one of the answer; the
// candidate's rounding boundaries (k - z ± 1/2) * s are exact in fp32 (10 by 11 significant
// bits), so comparing x with them corrects k and decides ties (to the even k) exactly.
void codes_int_fast(const float* x, int64_t n, float s, float z, int hi, uint8_t* out) {
  const float inv = 1.f / s;
  const vf vinv = splat(inv), vz = splat(z), vs = splat(s), vlo = splat(-1.f),
           vhi = splat(static_cast<float>(hi + 1)), magic = splat(12582912.f), half = splat(0.5f);
  const vi one = splati(1), zero = splati(0), top = splati(hi);
  auto vec = [&](vf xv) {
    vf y = xv * vinv + vz;
    y = y > vlo ? y : vlo;  // clamp, so that k fits the rounding trick and the exact products
    y = y < vhi ? y : vhi;
    const vf k = (y + magic) - magic;  // nearest integer (1.5 * 2^23 trick, |y| < 2^22)
    const vf t = k - vz;
    const vf up_b = (t + half) * vs, dn_b = (t - half) * vs;
    vi ki = __builtin_convertvector(k, vi);
    const vi odd = (ki & one) != zero;
    const vi up = (xv > up_b) | ((xv == up_b) & odd);
    const vi dn = (xv < dn_b) | ((xv == dn_b) & odd);
    ki = ki - up + dn;  // masks are -1 where set
    ki = ki > zero ? ki : zero;
    return ki < top ? ki : top;
  };
  auto scalar = [&](float v) {
    uint8_t c;
    codes_int_exact(&v, 1, s, z, hi, &c);
    return c;
  };
  run_codes(x, n, out, vec, scalar);
}

// Whether s is an fp16 value (bit test: no library conversion per group).
bool is_f16_value(float s) {
  const uint32_t b = std::bit_cast<uint32_t>(s) & 0x7FFFFFFFu;
  if (b == 0) return true;
  const int e = static_cast<int>(b >> 23) - 127;
  if (e > 15) return false;
  if (e >= -14) return (b & 0x1FFFu) == 0;  // 10 mantissa bits
  if (e < -24) return false;
  return (b & ((1u << (-1 - e)) - 1)) == 0;  // fp16 subnormals: multiples of 2^-24
}
void codes_int(const float* x, int64_t n, float s, float z, int bits, uint8_t* out) {
  const int hi = (1 << bits) - 1;
  if (is_f16_value(s) && z == std::floor(z) && z >= 0 && z <= hi)
    codes_int_fast(x, n, s, z, hi, out);
  else
    codes_int_exact(x, n, s, z, hi, out);
}

// ---- E2M1 (fp4, nvfp4, mxfp4): magnitude = number of thresholds |x| exceeds ----
void codes_e2m1(const float* x, int64_t n, float e, uint8_t* out) {
  float h[7];
  elem::e2m1_thresholds(e, h);
  std::array<vf, 7> vh;
  for (int j = 0; j < 7; ++j) vh[j] = splat(h[j]);
  const vi absmask = splati(0x7FFFFFFF), eight = splati(8), zero = splati(0);
  auto vec = [&](vf xv) {
    const vf a = reinterpret_cast<vf>(reinterpret_cast<vi>(xv) & absmask);
    vi m = zero;
    for (int j = 0; j < 7; ++j) m -= (a > vh[j]);
    const vi neg = (xv < splat(0.f)) & (m != zero);  // -0 is not < 0: zero is always 0x0
    return m | (neg & eight);
  };
  auto scalar = [&](float v) { return elem::code_e2m1(v, h); };
  run_codes(x, n, out, vec, scalar);
}

// ---- NF4: index = number of midpoints x/s lies above; an exact tie goes to the entry of smaller
// magnitude: at negative midpoints the upper neighbour (>=), at positive ones the lower (>). ----
void codes_nf4(const float* x, int64_t n, float s, uint8_t* out) {
  float h[15];
  elem::nf4_thresholds(s, h);
  std::array<vf, 15> vh;
  for (int j = 0; j < 15; ++j) vh[j] = splat(h[j]);
  auto vec = [&](vf xv) {
    vi m = splati(0);
    for (int j = 0; j < 15; ++j) m -= (xv > vh[j]);
    return m;
  };
  auto scalar = [&](float v) { return elem::code_nf4(v, h); };
  run_codes(x, n, out, vec, scalar);
}

// ---- E4M3 (fp8): elem::e4m3_code of x/s: nearest, ties to even, saturating at ±448 ----
void codes_fp8(const float* x, int64_t n, float s, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = elem::code_fp8(x[i], s);
}

using elem::nvfp4_effective;

uint8_t zero_scale_code(const Format& f) { return elem::zero_scale_code(f.spec()); }

// The value of a code (docs/format.md: an fp32 product).
inline float value_of(const Format& f, uint8_t u, const GroupParams& p, float g) {
  return elem::value(f.spec(), u, p, g);
}

// The values of all 2^bits codes of a group, so that loops over elements are table look-ups.
void value_table(const Format& f, const GroupParams& p, float g, float* tab) {
  const int ncodes = 1 << f.bits;
  for (int c = 0; c < ncodes; ++c) tab[c] = value_of(f, static_cast<uint8_t>(c), p, g);
}

bool valid_group(int g) {
  return g == -1 || (g >= 16 && g <= 256 && (g & (g - 1)) == 0);
}

int fixed_block(Family fam) {
  return fam == Family::NVFP4 ? 16 : fam == Family::MXFP4 ? 32 : 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Format

Format Format::parse(std::string_view name, std::optional<int> group, bool symmetric) {
  Format f;
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
    fail("unknown format '{}'; expected one of int2, int3, int4, int8, fp4, nvfp4, mxfp4, nf4, fp8",
         n);
  }
  if (f.family != Family::Int && f.family != Family::FP8) f.bits = 4;
  CALQ_CHECK(symmetric || f.family == Family::Int,
             "format {} has no asymmetric variant: only int formats take --asymmetric", n);
  f.symmetric = symmetric;
  const int block = fixed_block(f.family);
  const int dflt = block ? block : f.family == Family::FP8 ? -1 : 128;
  f.group_size = group.value_or(dflt);
  const int g = f.group_size;
  if (block)
    CALQ_CHECK(g == block,
               "format {} uses fixed blocks of {} elements; group size {} is not possible "
               "(leave the group size unset)",
               n, block, g);
  CALQ_CHECK(valid_group(g),
             "group size {} is not supported: use 16, 32, 64, 128, 256, or -1 for per-channel", g);
  return f;
}

std::string Format::name() const {
  switch (family) {
    case Family::Int:
      return "int" + std::to_string(bits);
    case Family::FP4:
      return "fp4";
    case Family::NVFP4:
      return "nvfp4";
    case Family::MXFP4:
      return "mxfp4";
    case Family::NF4:
      return "nf4";
    case Family::FP8:
      return "fp8";
  }
  return "?";
}

std::string Format::describe() const {
  std::string s = name();
  if (family == Family::Int && !symmetric) s += " asym";
  s += group_size < 0 ? " per-channel" : " g" + std::to_string(group_size);
  return s;
}

DType Format::scale_dtype() const {
  switch (family) {
    case Family::NVFP4:
      return DType::F8_E4M3;
    case Family::MXFP4:
      return DType::U8;
    case Family::FP8:
      return DType::F32;
    default:
      return DType::F16;
  }
}

double Format::bits_per_weight() const {
  const double code_bits = bits;         // dense packing: int3 costs 3 bits, not 3.2
  if (group_size < 0) return code_bits;  // one scale per row: negligible
  const double scale_bits = family == Family::NVFP4 || family == Family::MXFP4 ? 8
                            : family == Family::FP8                            ? 32
                                                                               : 16;
  const double zero_bits = family == Family::Int && !symmetric ? bits : 0;
  return code_bits + (scale_bits + zero_bits) / group_size;
}

void Format::check_shape(int64_t rows, int64_t cols, const std::string& what) const {
  CALQ_CHECK(rows > 0 && cols > 0, "{}: cannot quantize an empty weight [{}, {}]", what, rows,
             cols);
  CALQ_CHECK(family != Family::Int || bits == 2 || bits == 3 || bits == 4 || bits == 8,
             "{}: int{} is not a format (int2, int3, int4, int8)", what, bits);
  CALQ_CHECK(symmetric || family == Family::Int, "{}: {} has no asymmetric variant", what, name());
  const int block = fixed_block(family);
  if (block) {
    CALQ_CHECK(group_size == block, "{}: {} uses fixed blocks of {}; group size {} is not possible",
               what, name(), block, group_size);
    CALQ_CHECK(cols % block == 0,
               "{}: in-features {} not divisible by the {} block size {}; use --override or --keep",
               what, cols, name(), block);
  } else {
    CALQ_CHECK(valid_group(group_size),
               "{}: group size {} is not supported: use 16, 32, 64, 128, 256, or -1", what,
               group_size);
    CALQ_CHECK(group_size < 0 || cols % group_size == 0,
               "{}: in-features {} not divisible by group size {}; use --group-size, --override or "
               "--keep",
               what, cols, group_size);
  }
  // Nibble formats put two codes in a byte; grouped ones are even already (g >= 16).
  CALQ_CHECK(family == Family::Int || family == Family::FP8 || cols % 2 == 0,
             "{}: {} packs two 4-bit codes per byte and needs an even number of in-features, got "
             "{}; use --override or --keep",
             what, name(), cols);
  // int formats have no divisibility rule: pack-quantized rows are bit streams padded with zero
  // bits to a whole int32, as compressed-tensors pads them.
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers

int values_per_int32(int bits) {
  return 32 / bits;
}

int64_t packed_int32_words(int bits, int64_t n) {
  return (n * bits + 31) / 32;
}

float nf4_value(uint8_t code) {
  return elem::nf4_table(code);
}

float nvfp4_global_scale(float amax) {
  // compressed-tensors generate_gparam: fp32(448*6 / max(amax, FLT_MIN)); 1 if not finite.
  float a = std::max(std::fabs(amax), std::numeric_limits<float>::min());
  float g = 2688.f / a;
  return std::isfinite(g) ? g : 1.f;
}

GroupParams group_params_from_range(const Format& f, float mn, float mx, float shrink,
                                    float global_scale, bool* saturated) {
  return elem::params_from_range(f.spec(), mn, mx, shrink, global_scale, saturated);
}

GroupParams group_params(const Format& f, const float* x, int64_t n, float shrink,
                         float global_scale) {
  float mn = 0.f, mx = 0.f;
  elem::min_max(x, n, 1, &mn, &mx);
  return group_params_from_range(f, mn, mx, shrink, global_scale);
}

uint8_t quantize_element(const Format& f, float x, const GroupParams& p, float global_scale) {
  return elem::Coder(f.spec(), p, global_scale).code(x);
}

float dequantize_element(const Format& f, uint8_t code, const GroupParams& p, float global_scale) {
  return value_of(f, code, p, global_scale);
}

void quantize_group(const Format& f, const float* x, int64_t n, const GroupParams& p,
                    float global_scale, uint8_t* codes) {
  const float e = f.family == Family::NVFP4 ? nvfp4_effective(p.scale, global_scale) : p.scale;
  if (e == 0.f) {
    std::memset(codes, zero_scale_code(f), static_cast<size_t>(n));
    return;
  }
  switch (f.family) {
    case Family::Int:
      codes_int(x, n, p.scale, p.zero, f.bits, codes);
      return;
    case Family::FP4:
    case Family::MXFP4:
    case Family::NVFP4:
      codes_e2m1(x, n, e, codes);
      return;
    case Family::NF4:
      codes_nf4(x, n, p.scale, codes);
      return;
    case Family::FP8:
      codes_fp8(x, n, p.scale, codes);
      return;
  }
}

double group_error(const Format& f, const float* x, int64_t n, const GroupParams& p,
                   float global_scale, float norm) {
  float tab[256];
  value_table(f, p, global_scale, tab);
  uint8_t codes[256];
  double err = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 256) {
    const int64_t m = std::min<int64_t>(256, n - i0);
    quantize_group(f, x + i0, m, p, global_scale, codes);
    // elem::error_term with the norm's branch taken once per chunk (the same expression).
    if (norm == 2.f) {
      for (int64_t i = 0; i < m; ++i)
        err += elem::error_term(static_cast<double>(x[i0 + i]) - tab[codes[i]], 2.f);
    } else if (norm == 1.f) {
      for (int64_t i = 0; i < m; ++i)
        err += elem::error_term(static_cast<double>(x[i0 + i]) - tab[codes[i]], 1.f);
    } else {
      for (int64_t i = 0; i < m; ++i)
        err += elem::error_term(static_cast<double>(x[i0 + i]) - tab[codes[i]], norm);
    }
  }
  return err;
}

// ---------------------------------------------------------------------------------------------
// QuantizedWeight

int64_t QuantizedWeight::group_of(int64_t col) const {
  if (!g_idx.empty()) return g_idx[static_cast<size_t>(col)];
  return format.group_size < 0 ? 0 : col / format.group_size;
}

std::vector<float> QuantizedWeight::dequantize() const {
  const int64_t G = format.groups_per_row(cols), len = format.group_len(cols);
  CALQ_CHECK(codes.size() == static_cast<size_t>(rows * cols) &&
                 params.size() == static_cast<size_t>(rows * G) &&
                 (g_idx.empty() || g_idx.size() == static_cast<size_t>(cols)),
             "internal: quantized weight [{}, {}] holds {} codes, {} group parameters and {} g_idx "
             "entries",
             rows, cols, codes.size(), params.size(), g_idx.size());
  std::vector<float> out(static_cast<size_t>(rows * cols));
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 18))
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* c = codes.data() + r * cols;
    float* o = out.data() + r * cols;
    if (g_idx.empty()) {
      float tab[256];
      for (int64_t g = 0; g < G; ++g) {
        value_table(format, params[r * G + g], global_scale, tab);
        for (int64_t i = g * len; i < (g + 1) * len; ++i) o[i] = tab[c[i]];
      }
    } else {
      for (int64_t i = 0; i < cols; ++i)
        o[i] = value_of(format, c[i], params[r * G + g_idx[i]], global_scale);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// pack / unpack (docs/format.md §3)

namespace {

// Appends codes as one little-endian bit stream of `bits`-bit fields, the first in the lowest bits
// of word 0; fields straddle words when 32 % bits != 0; the tail of the last word stays 0.
// `stride` steps through the source (1 along a row; G when streaming zero points down a column).
void pack_stream(int bits, const uint8_t* src, int64_t n, uint32_t* dst, int64_t dst_stride) {
  uint64_t acc = 0;
  int have = 0;
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc |= static_cast<uint64_t>(src[i]) << have;
    have += bits;
    if (have >= 32) {
      dst[w++ * dst_stride] = static_cast<uint32_t>(acc);
      acc >>= 32;
      have -= 32;
    }
  }
  if (have > 0) dst[w * dst_stride] = static_cast<uint32_t>(acc);
}

void unpack_stream(int bits, const uint32_t* src, int64_t src_stride, int64_t n, uint8_t* dst) {
  const uint64_t mask = (1u << bits) - 1;
  uint64_t acc = 0;
  int have = 0;
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (have < bits) {
      acc |= static_cast<uint64_t>(src[w++ * src_stride]) << have;
      have += 32;
    }
    dst[i] = static_cast<uint8_t>(acc & mask);
    acc >>= bits;
    have -= bits;
  }
}

uint8_t e8m0_byte(float pow2) {
  return static_cast<uint8_t>(std::ilogb(pow2) + 127);
}

template <typename T>
T load(const std::byte* p, int64_t i) {
  T v;
  std::memcpy(&v, p + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
}

}  // namespace

// The names, dtypes and shapes of docs/format.md §3 (layout.h); pack() allocates and unpack()
// validates with them, so the writer's up-front plan cannot drift from either.
std::vector<PackedTensorDesc> packed_layout(const Format& f, int64_t rows, int64_t cols,
                                            bool with_g_idx) {
  std::vector<PackedTensorDesc> out;
  const int64_t G = f.groups_per_row(cols);
  if (f.family == Family::Int) {
    // compressed-tensors pack-quantized: dense bit streams, rows along `in`, zero points along
    // `out`.
    out.push_back({"weight_packed", DType::I32, {rows, packed_int32_words(f.bits, cols)}});
    out.push_back({"weight_scale", DType::F16, {rows, G}});
    if (!f.symmetric)
      out.push_back({"weight_zero_point", DType::I32, {packed_int32_words(f.bits, rows), G}});
    out.push_back({"weight_shape", DType::I64, {2}});
  } else if (f.family == Family::FP8) {
    out.push_back({"weight", DType::F8_E4M3, {rows, cols}});
    out.push_back({"weight_scale", DType::F32, {rows, G}});
  } else {
    out.push_back({"weight_packed", DType::U8, {rows, cols / 2}});
    out.push_back({"weight_scale", f.scale_dtype(), {rows, G}});
    if (f.family == Family::NVFP4) out.push_back({"weight_global_scale", DType::F32, {1}});
    if (f.family == Family::FP4 || f.family == Family::NF4)
      out.push_back({"weight_shape", DType::I64, {2}});
  }
  if (with_g_idx) out.push_back({"weight_g_idx", DType::I32, {cols}});
  return out;
}

std::map<std::string, Tensor> pack(const QuantizedWeight& q) {
  const Format& f = q.format;
  const int64_t R = q.rows, C = q.cols, G = f.groups_per_row(C);
  f.check_shape(R, C, "pack");
  CALQ_CHECK(q.codes.size() == static_cast<size_t>(R * C) &&
                 q.params.size() == static_cast<size_t>(R * G) &&
                 (q.g_idx.empty() || q.g_idx.size() == static_cast<size_t>(C)),
             "internal: quantized weight [{}, {}] ({}) holds {} codes, {} group parameters and {} "
             "g_idx entries",
             R, C, f.describe(), q.codes.size(), q.params.size(), q.g_idx.size());
  std::map<std::string, Tensor> out;
  for (const auto& d : packed_layout(f, R, C, !q.g_idx.empty()))
    out.emplace(d.suffix, Tensor(d.dtype, d.shape));

  if (f.family == Family::Int) {
    const int64_t W = packed_int32_words(f.bits, C);
    auto* w = out.at("weight_packed").as<uint32_t>();
#pragma omp parallel for schedule(static) if (R * C > (1 << 18))
    for (int64_t r = 0; r < R; ++r) pack_stream(f.bits, q.codes.data() + r * C, C, w + r * W, 1);
    if (!f.symmetric) {
      std::vector<uint8_t> col(static_cast<size_t>(R));
      auto* z = out.at("weight_zero_point").as<uint32_t>();
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t r = 0; r < R; ++r) col[r] = static_cast<uint8_t>(q.params[r * G + g].zero);
        pack_stream(f.bits, col.data(), R, z + g, G);
      }
    }
  } else if (f.family == Family::FP8) {
    std::memcpy(out.at("weight").bytes.data(), q.codes.data(), q.codes.size());
  } else {
    auto* w = out.at("weight_packed").as<uint8_t>();
    for (int64_t i = 0; i < R * C; i += 2)
      w[i / 2] = static_cast<uint8_t>((q.codes[i] & 15) | ((q.codes[i + 1] & 15) << 4));
  }

  Tensor& s = out.at("weight_scale");
  for (int64_t i = 0; i < R * G; ++i) {
    const float v = q.params[i].scale;
    float back = 0;
    switch (s.dtype) {
      case DType::F16:
        s.as<uint16_t>()[i] = f32_to_f16(v);
        back = f16_to_f32(s.as<uint16_t>()[i]);
        break;
      case DType::F32:
        s.as<float>()[i] = back = v;
        break;
      case DType::F8_E4M3:
        s.as<uint8_t>()[i] = f32_to_e4m3(v, true);
        back = e4m3_to_f32(s.as<uint8_t>()[i]);
        break;
      case DType::U8:
        if (v > 0) {
          s.as<uint8_t>()[i] = e8m0_byte(v);
          back = std::ldexp(1.f, s.as<uint8_t>()[i] - 127);
        }
        break;
      default:
        fail("internal: scale dtype {}", dtype_name(s.dtype));
    }
    // The scale the codes were chosen with must be the one stored (docs/format.md rule 1).
    CALQ_CHECK(back == v, "internal: group scale {} is not representable in {}", v,
               dtype_name(s.dtype));
  }
  if (f.family == Family::NVFP4) out.at("weight_global_scale").as<float>()[0] = q.global_scale;
  if (auto it = out.find("weight_shape"); it != out.end()) {
    it->second.as<int64_t>()[0] = R;
    it->second.as<int64_t>()[1] = C;
  }
  if (!q.g_idx.empty())
    std::memcpy(out.at("weight_g_idx").bytes.data(), q.g_idx.data(), q.g_idx.size() * 4);
  return out;
}

QuantizedWeight unpack(const Format& f, const std::map<std::string, TensorView>& t,
                       const std::string& what) {
  auto get = [&](const std::string& suffix) -> const TensorView& {
    auto it = t.find(suffix);
    CALQ_CHECK(it != t.end(), "{}: missing tensor {}.{} (format {})", what, what, suffix,
               f.describe());
    return it->second;
  };
  QuantizedWeight q;
  q.format = f;
  // The weight shape: weight_shape where the layout has one (int, fp4, nf4), else the packed
  // tensor's shape (nvfp4, mxfp4: [R, C/2]; fp8: [R, C]).
  if (f.family == Family::FP8 || f.family == Family::NVFP4 || f.family == Family::MXFP4) {
    const auto& w = get(f.family == Family::FP8 ? "weight" : "weight_packed");
    CALQ_CHECK(w.shape.size() == 2, "{}: {}.{} must be 2-D, got {}", what, what,
               f.family == Family::FP8 ? "weight" : "weight_packed", shape_str(w.shape));
    q.rows = w.shape[0];
    q.cols = f.family == Family::FP8 ? w.shape[1] : w.shape[1] * 2;
  } else {
    const auto& s = get("weight_shape");
    CALQ_CHECK(s.dtype == DType::I64 && s.shape == Shape{2} && s.nbytes == 16,
               "{}: {}.weight_shape must be I64 [2], got {} {}", what, what, dtype_name(s.dtype),
               shape_str(s.shape));
    q.rows = load<int64_t>(s.data, 0);
    q.cols = load<int64_t>(s.data, 1);
    CALQ_CHECK(
        q.rows > 0 && q.cols > 0 && q.rows < (int64_t{1} << 40) && q.cols < (int64_t{1} << 40),
        "{}: {}.weight_shape holds [{}, {}], not a weight shape", what, what, q.rows, q.cols);
  }
  f.check_shape(q.rows, q.cols, what);
  const bool has_g_idx = t.count("weight_g_idx") > 0;
  const auto layout = packed_layout(f, q.rows, q.cols, has_g_idx);
  for (const auto& d : layout) {
    const auto& v = get(d.suffix);
    CALQ_CHECK(v.dtype == d.dtype && v.shape == d.shape,
               "{}: {}.{} is {} {}, expected {} {} for {} [{}, {}]", what, what, d.suffix,
               dtype_name(v.dtype), shape_str(v.shape), dtype_name(d.dtype), shape_str(d.shape),
               f.describe(), q.rows, q.cols);
    CALQ_CHECK(v.nbytes == static_cast<size_t>(shape_numel(d.shape)) * dtype_size(d.dtype) &&
                   v.data != nullptr,
               "{}: {}.{} holds {} bytes, expected {}", what, what, d.suffix, v.nbytes,
               static_cast<size_t>(shape_numel(d.shape)) * dtype_size(d.dtype));
  }
  for (const auto& entry : t) {
    const std::string& name = entry.first;  // not a structured binding: clang 14 cannot capture one
    bool known = std::any_of(layout.begin(), layout.end(),
                             [&](const PackedTensorDesc& d) { return d.suffix == name; });
    CALQ_CHECK(known, "{}: unexpected tensor {}.{} for format {}", what, what, name, f.describe());
  }

  const int64_t R = q.rows, C = q.cols, G = f.groups_per_row(C);
  q.codes.assign(static_cast<size_t>(R * C), 0);
  q.params.assign(static_cast<size_t>(R * G), {});
  if (f.family == Family::Int) {
    const int64_t W = packed_int32_words(f.bits, C);
    std::vector<uint32_t> w(static_cast<size_t>(R * W));
    std::memcpy(w.data(), get("weight_packed").data, w.size() * 4);
#pragma omp parallel for schedule(static) if (R * C > (1 << 18))
    for (int64_t r = 0; r < R; ++r)
      unpack_stream(f.bits, w.data() + r * W, 1, C, q.codes.data() + r * C);
    if (f.symmetric) {
      for (auto& p : q.params) p.zero = static_cast<float>(1 << (f.bits - 1));
    } else {
      const auto& zv = get("weight_zero_point");
      std::vector<uint32_t> z(static_cast<size_t>(zv.numel()));
      std::memcpy(z.data(), zv.data, z.size() * 4);
      std::vector<uint8_t> col(static_cast<size_t>(R));
      for (int64_t g = 0; g < G; ++g) {
        unpack_stream(f.bits, z.data() + g, G, R, col.data());
        for (int64_t r = 0; r < R; ++r) q.params[r * G + g].zero = col[r];
      }
    }
  } else if (f.family == Family::FP8) {
    std::memcpy(q.codes.data(), get("weight").data, q.codes.size());
    for (int64_t i = 0; i < R * C; ++i)
      CALQ_CHECK((q.codes[i] & 0x7F) != 0x7F, "{}: {}.weight [{}, {}] is an fp8 NaN", what, what,
                 i / C, i % C);
  } else {
    const auto* w = reinterpret_cast<const uint8_t*>(get("weight_packed").data);
    for (int64_t i = 0; i < R * C; i += 2) {
      q.codes[i] = w[i / 2] & 15;
      q.codes[i + 1] = w[i / 2] >> 4;
    }
  }

  const auto& s = get("weight_scale");
  for (int64_t i = 0; i < R * G; ++i) {
    float v = 0;
    switch (s.dtype) {
      case DType::F16:
        v = f16_to_f32(load<uint16_t>(s.data, i));
        break;
      case DType::F32:
        v = load<float>(s.data, i);
        break;
      case DType::F8_E4M3:
        v = e4m3_to_f32(load<uint8_t>(s.data, i));
        break;
      case DType::U8:
        v = e8m0_to_f32(load<uint8_t>(s.data, i));
        break;
      default:
        fail("internal: scale dtype {}", dtype_name(s.dtype));
    }
    CALQ_CHECK(std::isfinite(v), "{}: {}.weight_scale [{}, {}] is not finite", what, what, i / G,
               i % G);
    q.params[i].scale = v;
  }
  if (f.family == Family::NVFP4) {
    q.global_scale = load<float>(get("weight_global_scale").data, 0);
    CALQ_CHECK(std::isfinite(q.global_scale) && q.global_scale > 0,
               "{}: {}.weight_global_scale is {}; it must be positive and finite", what, what,
               q.global_scale);
  }
  if (has_g_idx) {
    q.g_idx.resize(static_cast<size_t>(C));
    std::memcpy(q.g_idx.data(), get("weight_g_idx").data, q.g_idx.size() * 4);
    for (int64_t c = 0; c < C; ++c)
      CALQ_CHECK(q.g_idx[c] >= 0 && q.g_idx[c] < G,
                 "{}: {}.weight_g_idx[{}] = {} is outside [0, {})", what, what, c, q.g_idx[c], G);
  }
  return q;
}

}  // namespace calq::quant
