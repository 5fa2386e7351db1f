// Element types and exact scalar conversions.
//
// Every narrow float conversion from fp32 rounds to nearest, ties to even (RNE), on the exact
// fp32 value (no double rounding). "Overflow" means the RNE result with an unbounded exponent
// exceeds the largest finite value, so the tie just above the max rounds to the even side: fp16
// 65520 -> Inf, e5m2 61440 -> Inf (57344 saturating), e4m3 464 -> 448 (anything above overflows).
// Special-value rules per format:
//   bf16, fp16 : IEEE-style; overflow -> ±Inf; NaN -> the canonical quiet NaN with the sign kept
//                (bf16 0x7FC0/0xFFC0, fp16 0x7E00/0xFE00; the payload is dropped).
//   fp8 e5m2   : IEEE-style (has Inf). saturate=false: overflow -> ±Inf; saturate=true: overflow
//                and ±Inf -> ±57344 (0x7B/0xFB). NaN -> 0x7F/0xFF (sign kept).
//   fp8 e4m3fn : no Inf; NaN is S.1111.111 (0x7F/0xFF); max ±448.
//                saturate=true: |x| beyond 448 (incl. ±Inf) -> ±448;
//                saturate=false: values that round above 448, and ±Inf -> NaN (0x7F/0xFF).
//   fp4 e2m1   : codes [s e1 e0 m], values ±{0,0.5,1,1.5,2,3,4,6}; no Inf/NaN; always saturates
//                to ±6; ±Inf -> ±6; NaN -> code 0x0 (+0); results of magnitude 0 are encoded as
//                0x0 when their sign is + and 0x8 when - (see f32_to_e2m1 for the quantizer rule).
//   e8m0       : unsigned exponent-only (OCP MX scale), value 2^(e-127), e in 0..254; 0xFF = NaN.
// Decoding is exact; ±0 keep their sign and NaN codes decode to a quiet fp32 NaN with their sign.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace calq {

enum class DType : uint8_t {
  F64, F32, F16, BF16, F8_E4M3, F8_E5M2, F8_E8M0, F4_E2M1,
  I64, I32, I16, I8, U64, U32, U16, U8, BOOL,
};

// Bytes per element (F4_E2M1 is reported as 1: calq never stores it unpacked in a file, it packs
// two codes per U8 byte; see docs/format.md).
size_t dtype_size(DType t);
// Bytes that `numel` elements of `t` take in a safetensors file: numel · dtype_size, except F4
// (two 4-bit codes per byte, as safetensors stores it), which needs an even count. Throws
// calq::Error when the count is odd for F4 or the byte count does not fit in 64 bits.
uint64_t dtype_nbytes(DType t, uint64_t numel);
// The safetensors name ("F32", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "BOOL", ...).
// dtype_size and dtype_name throw calq::Error for a value outside the enum.
std::string_view dtype_name(DType t);
// Parses a safetensors dtype name (exact, case-sensitive); nullopt when unknown.
std::optional<DType> dtype_from_name(std::string_view name);
// True for the float dtypes that to_f32 converts: F64, F32, F16, BF16, F8_E4M3, F8_E5M2 (not the
// scale/packed types F8_E8M0 and F4_E2M1).
bool dtype_is_float(DType t);

// ---- scalar conversions ----
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float x);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float x);
float e4m3_to_f32(uint8_t c);
uint8_t f32_to_e4m3(float x, bool saturate = true);
float e5m2_to_f32(uint8_t c);
uint8_t f32_to_e5m2(float x, bool saturate = false);
float e2m1_to_f32(uint8_t code);  // low 4 bits used
uint8_t f32_to_e2m1(float x);     // RNE, saturating to ±6; magnitude-0 results keep the sign bit
float e8m0_to_f32(uint8_t e);     // 2^(e-127); 0xFF -> NaN
// Nearest E8M0 code to a positive finite x in the log2 domain rules below:
//   floor: largest 2^k <= x;  ceil: smallest 2^k >= x;  nearest: RNE of x onto powers of two
//   by value (ties, i.e. x = 1.5·2^k, go up). Clamped to codes 0..254 (so e.g. every x below
//   2^-127 floors to code 0). x <= 0, ±Inf or NaN -> calq::Error.
enum class E8M0Round { Floor, Ceil, Nearest };
uint8_t f32_to_e8m0(float x, E8M0Round mode);

// ---- bulk conversions ----
// Converts n elements of a float dtype (F64/F32/F16/BF16/F8_E4M3/F8_E5M2) to fp32.
// Throws calq::Error for other dtypes.
void to_f32(const void* src, DType t, float* dst, size_t n);
// Converts fp32 to a float dtype (F64/F32/F16/BF16/F8_E4M3 saturating/F8_E5M2 non-saturating),
// RNE, exactly as the scalar functions. Throws calq::Error for other dtypes.
void from_f32(const float* src, DType t, void* dst, size_t n);

}  // namespace calq
