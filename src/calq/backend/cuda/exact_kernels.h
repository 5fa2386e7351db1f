// Kernels of the GPU engine's exact mode (engine::Precision::Exact, `--forward-precision exact`)
// and of exact Hessian blocks (`--hessian-precision exact`): each one performs the CPU engine's
// arithmetic in the CPU engine's order, so that a GPU run gives the CPU's bits. What "the CPU's
// order" is, operation by operation (src/calq/engine/gemm.cpp, engine.cpp, quant/hessian.cpp):
//
//   products   C = alpha·A·op(B) (+ beta·C): every element is an fp32 FMA chain over k in order,
//              starting from +0, restarted every 512 terms; each chain is multiplied by alpha and
//              then merged: the first as C = v (beta 0) or v + beta·C, later ones as C = v + C.
//   RMSNorm    Σ x² in fp64 in 8 interleaved lanes (lane l takes x[l], x[l+8], ... over the whole
//              groups of 8; the tail goes into lane 0), combined ((0+1)+(2+3))+((4+5)+(6+7));
//              inv = float(1 / sqrt(Σ/H + eps)); y = w·(x·inv).
//   SiLU·up    g = (g / (1 + fast_exp(-g))) · u (calq/engine/fast_exp.h).
//   attention  per head, queries in blocks of 64: scores of a block's queries against keys
//              [kstart, kend) (kend = min(block end, length), kstart = block start − window + 1
//              or 0) as a product with alpha = 1/√D; each row's masked softmax (max, fast_exp,
//              Σ in 8 fp64 lanes as RMSNorm's, times float(1/Σ)); then the row's probabilities
//              (zeros outside the visible keys included) times V as a product over those keys.
//   Hessian    each block of ≤ 512 rows: the upper triangle of XᵀX as products (one chain per
//              element over the rows in order), added to the fp64 sum.
//
// Compiled with --fmad=false; the chains use fmaf explicitly. Several times slower than cuBLAS
// (no tensor cores, no split-K): a mode for reproducing CPU results, not for speed.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace calq::backend::cuda {

// C[m·ldc + n] = alpha · Σ_k A(m, k)·B(k, n) (+ beta · C), with the CPU gemm's chains and merges
// (above). A(m, k) = A[m·sam + k·sak]; B(k, n) = B[k·sbk + n·sbn], fp32 or (b_bf16) bf16 bits.
// upper: only elements with n >= m are needed (others may be left unwritten). K = 0: C = beta · C
// (0 when beta is 0), as the CPU gemm.
void launch_exact_gemm(int64_t M, int64_t N, int64_t K, float alpha, float beta, const float* A, int64_t sam,
                       int64_t sak, const void* B, bool b_bf16, int64_t sbk, int64_t sbn, float* C, int64_t ldc,
                       bool upper, cudaStream_t s);

// The CPU's rms_norm_rows: N rows of H, y may be x.
void launch_exact_rms_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, double eps,
                           cudaStream_t s);

// The CPU's silu_mul: g[i] = (g[i] / (1 + fast_exp(-g[i]))) · u[i].
void launch_exact_silu_mul(float* g, const float* u, int64_t n, cudaStream_t s);

// The CPU's attention (Model::Impl::attention with attention_head per (sequence, head)) for B
// sequences of T tokens: q [B·T, NQ·D] (row stride ldq), k/v [B·T, NKV·D] (ldk, ldv), out
// [B·T, NQ·D] (ldo); query head h uses key head h / (NQ / NKV); lengths: B entries on the device.
// Needs (T + D) floats of shared memory per block: returns false (launching nothing) when the GPU
// cannot give that much, true otherwise.
bool launch_exact_attention(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                            float* out, int64_t ldo, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D,
                            const int64_t* lengths, int64_t window, float scale, cudaStream_t s);

}  // namespace calq::backend::cuda
