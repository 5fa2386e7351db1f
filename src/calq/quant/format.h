// Element formats: what a quantized weight is, how one element is encoded, how codes and scales
// are packed into the tensors calq writes. The byte-level spec is docs/format.md; this code and
// that text must agree (tests/unit/format_test.cpp decodes packed tensors with an independent
// decoder written from the spec).
//
// A quantized 2-D weight W[out, in] is split along `in` into groups of `group_size` consecutive
// elements (group_size = -1: one group per output row, "per-channel"). Each (row, group) has a
// scale (and for asymmetric int formats a zero point); nvfp4 has in addition one fp32 global scale
// per tensor.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "calq/core/tensor.h"
#include "calq/quant/element.h"

namespace calq::quant {

// Family and GroupParams: calq/quant/element.h (shared with the CUDA kernels).

struct Format {
  Family family = Family::Int;
  int bits = 4;           // 2, 3, 4, 8 for Int; 4 for FP4/NVFP4/MXFP4/NF4; 8 for FP8
  bool symmetric = true;  // only Int may be asymmetric
  int group_size = 128;   // 16..256 (power of two) or -1 (per output channel); fixed 16 for
                          // nvfp4 and 32 for mxfp4

  // Parses "int2|int3|int4|int8|fp4|nvfp4|mxfp4|nf4|fp8"; group = nullopt gives the format's
  // default (128; nvfp4 16; mxfp4 32; fp8 -1). Throws calq::Error naming the bad value.
  static Format parse(std::string_view name, std::optional<int> group = std::nullopt,
                      bool symmetric = true);
  std::string name() const;  // "int4", "nvfp4", ... (asymmetric int: "int4" + symmetric=false)
  std::string describe() const;  // "int4 asym g128", "nvfp4 g16", "fp8 per-channel"
  // Storage dtype of the group scale: F16 (int, fp4, nf4), F8_E4M3 (nvfp4), U8 (mxfp4: E8M0
  // exponent bytes, stored as U8 like compressed-tensors' torch.uint8, so that loaders copy the
  // bytes rather than convert values), F32 (fp8).
  DType scale_dtype() const;
  // Bits per weight including scales and zero points (the per-tensor global scale is ignored).
  double bits_per_weight() const;
  // Throws calq::Error (naming `what`) unless the format can quantize a [rows, cols] weight.
  void check_shape(int64_t rows, int64_t cols, const std::string& what) const;
  int64_t groups_per_row(int64_t cols) const { return group_size < 0 ? 1 : cols / group_size; }
  int64_t group_len(int64_t cols) const { return group_size < 0 ? cols : group_size; }
  // What the element code needs (calq/quant/element.h).
  elem::Spec spec() const { return {family, bits, symmetric}; }
};

// Computes a group's parameters from its values, shrinking the range by `shrink` (1 = absmax or
// min/max). `global_scale` is used only by nvfp4. The scale is rounded to its storage dtype here,
// so codes chosen with quantize_element() always agree with what is stored.
GroupParams group_params(const Format& f, const float* x, int64_t n, float shrink = 1.f,
                         float global_scale = 1.f);
// The storage code of x given the group's parameters (unsigned, < 2^bits; see docs/format.md).
uint8_t quantize_element(const Format& f, float x, const GroupParams& p, float global_scale = 1.f);
// The value a code decodes to.
float dequantize_element(const Format& f, uint8_t code, const GroupParams& p,
                         float global_scale = 1.f);
// The value of an NF4 code (QLoRA table).
float nf4_value(uint8_t code);
// Whole int codes that fit in one int32 (32 / bits, rounded down). pack-quantized packs densely
// (compressed-tensors >= 0.17): int3 codes straddle words, 32 codes per 3 words; use
// packed_int32_words() for tensor sizes.
int values_per_int32(int bits);
// Int32 words holding n codes of `bits` bits packed as one little-endian bit stream:
// ceil(n * bits / 32) (compressed-tensors pack_to_int32 and vLLM's packed dimension).
int64_t packed_int32_words(int bits, int64_t n);
// group_params() from the group's precomputed minimum and maximum (the rules only depend on
// these); `saturated`, when given, is set when the scale overflowed its storage type and was
// clamped (fp16: 65504; E4M3: 448).
GroupParams group_params_from_range(const Format& f, float min, float max, float shrink = 1.f,
                                    float global_scale = 1.f, bool* saturated = nullptr);
// quantize_element() over n consecutive values of one group, without per-element dispatch.
void quantize_group(const Format& f, const float* x, int64_t n, const GroupParams& p,
                    float global_scale, uint8_t* codes);
// sum over the group of |x - dequantize(quantize(x))|^norm, in double (the clip-search error).
double group_error(const Format& f, const float* x, int64_t n, const GroupParams& p,
                   float global_scale, float norm);
// nvfp4's per-tensor global scale for a tensor (or a fused set of tensors) whose absmax is `amax`
// (compressed-tensors convention: global = 448*6/amax; 1 when amax is 0).
float nvfp4_global_scale(float amax);

// A whole quantized weight, unpacked: one code per element.
struct QuantizedWeight {
  Format format;
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes;     // rows*cols storage codes, row-major
  std::vector<GroupParams> params;  // rows*groups_per_row, row-major
  float global_scale = 1.f;       // nvfp4 only
  std::vector<int32_t> g_idx;     // optional: group of each input column (act-order); empty = c/gs
  // Groups whose scale overflowed its storage type and was clamped (set by rtn_quantize; fp16
  // scales of groups with |w| beyond ~65504*D): their largest weights clip. Callers may warn.
  int64_t saturated_scales = 0;

  int64_t group_of(int64_t col) const;
  std::vector<float> dequantize() const;  // rows*cols fp32
};

// Packs into the named tensors of docs/format.md ("weight_packed", "weight_scale",
// "weight_zero_point", "weight_global_scale", "weight_g_idx", "weight_shape").
std::map<std::string, Tensor> pack(const QuantizedWeight& q);
// Inverse of pack(); validates names, dtypes and shapes against `format` and the shape, throwing
// calq::Error that names `what` (the module) on any mismatch.
QuantizedWeight unpack(const Format& format, const std::map<std::string, TensorView>& tensors,
                       const std::string& what);

}  // namespace calq::quant
