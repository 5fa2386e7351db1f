// The CUDA kernels of the GPU forward pass (engine_kernels.cu), launched on `stream`; plain C++
// declarations so that host code compiled by the C++ compiler can call them. Every kernel is the
// GPU twin of a CPU engine loop (src/calq/engine/engine.cpp) with the same arithmetic where it
// matters (RMSNorm's sum of squares in fp64, RoPE's rotate_half, products not fused: nvcc
// --fmad=false); attention is a tiled online-softmax kernel (no T×T matrix).
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace calq::backend::cuda {

// y[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)) for N rows of H (fp64 sum; y may be x).
void launch_rms_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, double eps, cudaStream_t s);
// GPT-2 LayerNorm: y[r] = float((x[r] - mean) / sqrt(var + eps)) * w + b (mean and variance in
// fp64) for N rows of H.
void launch_layer_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, const float* b, double eps,
                       cudaStream_t s);
// x[i] = gelu_new(x[i]) = 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))), in fp64 as the CPU.
void launch_gelu_tanh(float* x, int64_t n, cudaStream_t s);
// rotate_half RoPE in place: row r (position r % T) has `heads` heads of 2·half values at stride
// ld; cos/sin are [T, half].
void launch_rope(float* x, int64_t rows, int64_t ld, int64_t heads, int64_t half, int64_t T, const float* cos,
                 const float* sin, cudaStream_t s);
// y[r, o] += bias[o] for N rows of `out`.
void launch_add_bias(float* y, const float* bias, int64_t N, int64_t out, cudaStream_t s);
// h[i] += o[i].
void launch_add(float* h, const float* o, int64_t n, cudaStream_t s);
// g[i] = silu(g[i]) * u[i].
void launch_silu_mul(float* g, const float* u, int64_t n, cudaStream_t s);
// y[i] = bf16(x[i]) (round to nearest even), y as uint16 bits.
void launch_to_bf16(const float* x, uint16_t* y, int64_t n, cudaStream_t s);
// x split into two bf16 terms: hi[i] = bf16(x[i]), lo[i] = bf16(x[i] - hi[i]) (round to nearest
// even; hi + lo carries 16 significant bits of x).
void launch_split_bf16(const float* x, uint16_t* hi, uint16_t* lo, int64_t n, cudaStream_t s);
// y[i] = bits of bf16 -> fp32.
void launch_bf16_to_f32(const uint16_t* x, float* y, int64_t n, cudaStream_t s);
// *count += number of non-finite x[i] (count must be zeroed by the caller).
void launch_count_nonfinite(const float* x, int64_t n, unsigned int* count, cudaStream_t s);
// y[i, :] = float(x[rows[i], :]) for n rows of H, x a bf16 table (uint16 bits): exact widening.
void launch_gather_rows_bf16(const uint16_t* x, const int64_t* rows, int64_t n, int64_t H, float* y, cudaStream_t s);
// y[i, :] = x[rows[i], :] for n rows of H.
void launch_gather_rows(const float* x, const int64_t* rows, int64_t n, int64_t H, float* y, cudaStream_t s);

// h[rows[i], :] += w[i] * y[i, :] for n rows of H (rows distinct; product and sum rounded
// separately, as the CPU engine's scatter-add of an expert's output).
void launch_scatter_add_rows(float* h, const int64_t* rows, const float* w, const float* y, int64_t n, int64_t H,
                             cudaStream_t s);
// MoE routing of N rows of E router logits, engine::route_row per row (the CPU engine's function,
// calq/engine/router.h, so the same bits): softmax over all experts (fp32
// probabilities), the top K by decreasing probability (ties: lower expert index first) into
// sel [N, K] and their probabilities into wts [N, K], divided by their fp32 sum when renorm. A row
// whose logits are NaN gets expert -1 from the first pick that finds none.
void launch_route_topk(const float* logits, int64_t N, int64_t E, int64_t K, bool renorm, int32_t* sel, float* wts,
                       cudaStream_t s);

// The softmax step of attention through GEMMs: S holds `pairs` blocks of nq rows of nk raw scores
// q·k (pair p = global pair pair0 + p = sequence b · heads + head; row r = query i0 + r; column c
// = key k0 + c). Each row becomes softmax(scale · scores) over the keys its query sees (as
// launch_attention: j <= i, j < lengths[b], i - j < window when window > 0), 0 for the others;
// a row that sees no key becomes all zeros. pairs <= 65535.
void launch_masked_softmax(float* S, int64_t pairs, int64_t nq, int64_t nk, int64_t i0, int64_t k0, int64_t pair0,
                           int64_t heads, const int64_t* lengths, int64_t window, float scale, cudaStream_t s);

// Causal GQA attention of B sequences of T tokens: q [B·T, NQ·D] (row stride ldq), k/v [B·T,
// NKV·D] (strides ldk, ldv), out [B·T, NQ·D] (stride ldo). Query head h uses key head h / (NQ /
// NKV). Query i of sequence b sees keys j with j <= i, j < lengths[b] and (window > 0) i - j <
// window; a row that sees no key gets zeros. lengths is a device array of B entries. D <= 256.
void launch_attention(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                      float* out, int64_t ldo, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D,
                      const int64_t* lengths, int64_t window, float scale, cudaStream_t s);

}  // namespace calq::backend::cuda
