// Training ops: forward and backward of every operation of the gpt2 and llama/qwen3 families, fp32
// on the CPU (cblas for the products, OpenMP over rows). Layouts are row-major; a sequence batch
// is [B*T, features] with row b*T + t the token t of sequence b. Backward functions ACCUMULATE
// into input gradients (dx += ...) unless their comment says otherwise, so that a tensor feeding
// several consumers (a residual, the shared input of q/k/v) needs no extra buffer.
#pragma once

#include <cstdint>
#include <vector>

namespace calq::train {

// C[M,N] = alpha * A[M,K] * B[N,K]^T + beta * C
void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta, float* C);
// C[M,N] = alpha * A[M,K] * B[K,N] + beta * C
void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta, float* C);
// C[M,N] = alpha * A[K,M]^T * B[K,N] + beta * C
void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta, float* C);

// y[N,out] = x[N,in] W[out,in]^T (+ b). Overwrites y.
void linear_fwd(const float* x, int64_t N, int64_t in, const float* W, const float* b, int64_t out, float* y);
// dx[N,in] += dy[N,out] W[out,in]
void linear_bwd_input(const float* dy, int64_t N, int64_t out, const float* W, int64_t in, float* dx);
// LoRA branch: u[N,r] = xl A[r,in]^T (overwritten); y[N,out] += scale * u B[out,r]^T.
void lora_fwd(const float* xl, int64_t N, int64_t in, const float* A, const float* B, int64_t r, int64_t out,
              float scale, float* u, float* y);
// dB[out,r] += scale dy^T u; dA[r,in] += (scale dy B)^T xl; dxl[N,in] += (scale dy B) A (dxl may be null).
void lora_bwd(const float* dy, const float* xl, const float* u, int64_t N, int64_t in, const float* A,
              const float* B, int64_t r, int64_t out, float scale, float* dA, float* dB, float* dxl);

// LayerNorm over rows (statistics in double, as the engine): y = (x - mean) * rstd * w + b.
// mean/rstd [N] are written for the backward pass.
void layer_norm_fwd(const float* x, int64_t N, int64_t H, const float* w, const float* b, double eps, float* y,
                    float* mean, float* rstd);
// dx += ...; dw/db += ... (either may be null: frozen norm).
void layer_norm_bwd(const float* dy, const float* x, const float* mean, const float* rstd, const float* w, int64_t N,
                    int64_t H, float* dx, float* dw, float* db);
// RMSNorm over rows: y = w * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps). rstd [N] written.
void rms_norm_fwd(const float* x, int64_t N, int64_t H, const float* w, double eps, float* y, float* rstd);
void rms_norm_bwd(const float* dy, const float* x, const float* rstd, const float* w, int64_t N, int64_t H, float* dx,
                  float* dw);

// Rotary embedding in place on x [N, ld] holding `heads` heads of D at column 0, rows of T
// positions per sequence (position = row % T); rotate-half layout as transformers. cos/sin [T, D/2].
// inverse = true applies the transpose rotation (the backward pass of the forward one).
void rope_apply(float* x, int64_t N, int64_t T, int64_t ld, int64_t heads, int64_t D, const float* cos_t,
                const float* sin_t, bool inverse);
// cos/sin tables [T, D/2] from inverse frequencies [D/2].
void rope_tables(const std::vector<float>& inv_freq, int64_t T, std::vector<float>& cos_t, std::vector<float>& sin_t);

// Causal multi-head attention with grouped KV heads. q [B*T, ldq] (NQ heads of D), k/v [B*T, ldk]
// (NKV heads of D), out [B*T, NQ*D] (overwritten). P [B, NQ, T, T] receives the probabilities
// (row i has zeros beyond column i) for the backward pass.
void attention_fwd(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldk, int64_t B, int64_t T,
                   int64_t NQ, int64_t NKV, int64_t D, float scale, float* out, float* P);
// dq [B*T, ldq], dk/dv [B*T, ldk]: OVERWRITTEN (the head columns; other columns untouched).
void attention_bwd(const float* dout, const float* q, int64_t ldq, const float* k, const float* v, int64_t ldk,
                   const float* P, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D, float scale, float* dq,
                   float* dk, float* dv);

// GELU with the tanh approximation (GPT-2's gelu_new), elementwise.
void gelu_tanh_fwd(const float* x, int64_t n, float* y);
void gelu_tanh_bwd(const float* dy, const float* x, int64_t n, float* dx);  // dx overwritten
// SwiGLU: a = silu(g) * u.
void swiglu_fwd(const float* g, const float* u, int64_t n, float* a);
void swiglu_bwd(const float* da, const float* g, const float* u, int64_t n, float* dg, float* du);  // overwritten

// Next-token targets for B sequences of T tokens: target[b*T + t] = tokens[b*T + t + 1] for
// t < T-1 and -1 (no target) at the last position. The one place where labels are shifted.
std::vector<int32_t> shifted_targets(const std::vector<int32_t>& tokens, int64_t B, int64_t T);
// Sum over rows with target >= 0 of -log softmax(logits[row])[target]. With dlogits non-null,
// writes dlogits[row] = grad_scale * (softmax - onehot) (zero rows for target < 0).
double cross_entropy(const float* logits, int64_t rows, int64_t V, const int32_t* targets, float* dlogits,
                     float grad_scale);

}  // namespace calq::train
