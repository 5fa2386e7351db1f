// Element types and exact scalar conversions.
//
// Every narrow float conversion from fp32 rounds to nearest, ties to even (RNE), on the exact
// fp32 value (no double rounding). Special-value rules per format:
//   bf16, fp16 : IEEE-style; overflow -> ±Inf; NaN -> quiet NaN with the sign kept.
//   fp8 e5m2   : IEEE-style (has Inf). saturate=false: overflow -> ±Inf; saturate=true: -> ±57344.
//                NaN -> 0x7F/0xFF (sign kept).
//   fp8 e4m3fn : no Inf; NaN is S.1111.111 (0x7F/0xFF); max ±448.
//                saturate=true: |x| beyond 448 (incl. ±Inf) -> ±448;
//                saturate=false: values that round above 448, and ±Inf -> NaN (0x7F/0xFF).
//   fp4 e2m1   : codes [s e1 e0 m], values ±{0,0.5,1,1.5,2,3,4,6}; no Inf/NaN; always saturates
//                to ±6; ±Inf -> ±6; NaN -> code 0x0 (+0); results of magnitude 0 are encoded as
//                0x0 when their sign is + and 0x8 when - (see f32_to_e2m1 for the quantizer rule).
//   e8m0       : unsigned exponent-only (OCP MX scale), value 2^(e-127), e in 0..254; 0xFF = NaN.
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
// The safetensors name ("F32", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "BOOL", ...).
std::string_view dtype_name(DType t);
// Parses a safetensors dtype name; nullopt when unknown.
std::optional<DType> dtype_from_name(std::string_view name);
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
//   by value (ties, i.e. x = 1.5·2^k, go up). Clamped to codes 0..254. x <= 0 or NaN -> error.
enum class E8M0Round { Floor, Ceil, Nearest };
uint8_t f32_to_e8m0(float x, E8M0Round mode);

// ---- bulk conversions ----
// Converts n elements of a float dtype (F64/F32/F16/BF16/F8_E4M3/F8_E5M2) to fp32.
// Throws calq::Error for other dtypes.
void to_f32(const void* src, DType t, float* dst, size_t n);
// Converts fp32 to a float dtype (F32/F16/BF16/F8_E4M3 saturating/F8_E5M2), RNE.
void from_f32(const float* src, DType t, void* dst, size_t n);

}  // namespace calq
