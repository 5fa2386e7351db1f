// The exact mode's kernels (contracts and the CPU order they follow: exact_kernels.h). Built with
// --fmad=false like the rest of calq_cuda: a*b+c is two roundings, as in the CPU sources
// (-ffp-contract=off); the FMA chains call fmaf.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "calq/backend/cuda/exact_kernels.h"
#include "calq/engine/fast_exp.h"

namespace calq::backend::cuda {

namespace {

constexpr int64_t kChain = 512;  // the CPU gemm's block of K (engine/gemm.cpp kKc)
constexpr int kBM = 64, kBN = 64, kBK = 16;
static_assert(kChain % kBK == 0, "chain restarts must fall on tile boundaries");

__device__ __forceinline__ float load_b(const float* B, int64_t i) { return B[i]; }
__device__ __forceinline__ float load_b(const uint16_t* B, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(B[i]) << 16);
}

// 256 threads: thread (ty, tx) owns rows m0 + ty + 16·i and columns n0 + tx + 16·j (i, j < 4).
// Every accumulator runs over k in order; tiles past K are never multiplied (kmax), so no
// padding term enters a chain.
template <typename TB>
__global__ void __launch_bounds__(256) exact_gemm_kernel(int64_t M, int64_t N, int64_t K, float alpha, float beta,
                                                         const float* A, int64_t sam, int64_t sak, const TB* B,
                                                         int64_t sbk, int64_t sbn, float* C, int64_t ldc, bool upper) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  if (upper && n0 + kBN - 1 < m0) return;  // the whole tile is below the diagonal
  __shared__ float As[kBK][kBM];
  __shared__ float Bs[kBK][kBN];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4], res[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = res[i][j] = 0.0f;
  bool first = true;
  const bool a_k_fast = sak == 1, b_k_fast = sbk == 1;
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = tid + 256 * q;
      const int kk = a_k_fast ? e % kBK : e / kBM, m = a_k_fast ? e / kBK : e % kBM;
      const int64_t gm = m0 + m, gk = k0 + kk;
      As[kk][m] = gm < M && gk < K ? A[gm * sam + gk * sak] : 0.0f;
      const int kb = b_k_fast ? e % kBK : e / kBN, n = b_k_fast ? e / kBK : e % kBN;
      const int64_t gn = n0 + n, gkb = k0 + kb;
      Bs[kb][n] = gn < N && gkb < K ? load_b(B, gkb * sbk + gn * sbn) : 0.0f;
    }
    __syncthreads();
    const int kmax = K - k0 < kBK ? static_cast<int>(K - k0) : kBK;
    for (int kk = 0; kk < kmax; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
    if ((k0 + kBK) % kChain == 0 || k0 + kBK >= K) {
      // The end of one chain: v = alpha·acc merged into the element as the CPU's kernels do.
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float v = __fmul_rn(alpha, acc[i][j]);
          if (!first) {
            res[i][j] = __fadd_rn(v, res[i][j]);
          } else if (beta != 0.0f) {
            const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
            const float c = gm < M && gn < N ? C[gm * ldc + gn] : 0.0f;
            res[i][j] = __fadd_rn(v, __fmul_rn(beta, c));
          } else {
            res[i][j] = v;
          }
          acc[i][j] = 0.0f;
        }
      first = false;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
      if (gm < M && gn < N) C[gm * ldc + gn] = res[i][j];
    }
}

// Σ over the 8 fp64 lanes of the CPU's sums (engine.cpp sum_squares, softmax_row), in its order.
__device__ __forceinline__ double combine_lanes(const double* p) {
  return __dadd_rn(__dadd_rn(__dadd_rn(p[0], p[1]), __dadd_rn(p[2], p[3])),
                   __dadd_rn(__dadd_rn(p[4], p[5]), __dadd_rn(p[6], p[7])));
}

// One warp per row; lanes 0..7 hold the CPU's 8 partial sums.
__global__ void exact_rms_norm_kernel(const float* x, float* y, int64_t H, const float* w, double eps) {
  __shared__ double part[8];
  __shared__ float inv_sh;
  const int64_t r = blockIdx.x;
  const float* xr = x + r * H;
  float* yr = y + r * H;
  const int l = threadIdx.x;
  if (l < 8) {
    double p = 0.0;
    for (int64_t i = 0; i + 8 <= H; i += 8) {
      const double v = static_cast<double>(xr[i + l]);
      p = __dadd_rn(p, __dmul_rn(v, v));
    }
    if (l == 0)
      for (int64_t i = H - H % 8; i < H; ++i) {
        const double v = static_cast<double>(xr[i]);
        p = __dadd_rn(p, __dmul_rn(v, v));
      }
    part[l] = p;
  }
  __syncthreads();
  if (l == 0) {
    const double ss = combine_lanes(part);
    inv_sh = static_cast<float>(__ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(__ddiv_rn(ss, static_cast<double>(H)), eps))));
  }
  __syncthreads();
  const float inv = inv_sh;
  for (int64_t i = l; i < H; i += blockDim.x) yr[i] = __fmul_rn(w[i], __fmul_rn(xr[i], inv));
}

__global__ void exact_silu_mul_kernel(float* g, const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = g[i];
    g[i] = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, engine::fast_exp(-x))), u[i]);
  }
}

constexpr int kAttnThreads = 128;

// One block per (sequence b, query head hd, query i): blockIdx.x = (b·NQ + hd)·T + i. Shared
// memory: the query row (D floats), then the row of scores (up to T floats).
__global__ void __launch_bounds__(kAttnThreads)
    exact_attention_kernel(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                           float* out, int64_t ldo, int64_t T, int64_t NQ, int64_t groups, int64_t D,
                           const int64_t* lengths, int64_t window, float scale, int64_t row0) {
  extern __shared__ float sh[];
  __shared__ float red[kAttnThreads / 32];
  __shared__ double part[8];
  __shared__ float inv_sh;
  float* qs = sh;
  float* s = sh + D;
  const int tid = threadIdx.x;
  const int64_t row = row0 + blockIdx.x;
  const int64_t i = row % T, bh = row / T, hd = bh % NQ, b = bh / NQ, kvh = hd / groups;
  const int64_t len = lengths[b];
  // attention_head's block of queries and the keys its products run over.
  const int64_t i0 = i / 64 * 64, i1 = i0 + 64 < T ? i0 + 64 : T;
  const int64_t kend = i1 < len ? i1 : len;
  const int64_t kstart = window > 0 ? (i0 - window + 1 > 0 ? i0 - window + 1 : 0) : 0;
  const int64_t nk = kend - kstart;
  float* o = out + (b * T + i) * ldo + hd * D;
  if (nk <= 0) {
    for (int64_t d = tid; d < D; d += blockDim.x) o[d] = 0.0f;
    return;
  }
  for (int64_t d = tid; d < D; d += blockDim.x) qs[d] = q[(b * T + i) * ldq + hd * D + d];
  __syncthreads();
  // Scores: scale · (q · k_j), one chain per key over d (restarted every 512 terms).
  for (int64_t j = tid; j < nk; j += blockDim.x) {
    const float* kr = k + (b * T + kstart + j) * ldk + kvh * D;
    float c = 0.0f;
    for (int64_t d0 = 0; d0 < D; d0 += kChain) {
      const int64_t d1 = d0 + kChain < D ? d0 + kChain : D;
      float acc = 0.0f;
      for (int64_t d = d0; d < d1; ++d) acc = fmaf(qs[d], kr[d], acc);
      const float t = __fmul_rn(scale, acc);
      c = d0 == 0 ? t : __fadd_rn(t, c);
    }
    s[j] = c;
  }
  __syncthreads();
  const int64_t hi = i < len - 1 ? i : len - 1;  // inclusive
  const int64_t lo = window > 0 ? (i - window + 1 > 0 ? i - window + 1 : 0) : 0;
  if (hi < lo) {
    for (int64_t j = tid; j < nk; j += blockDim.x) s[j] = 0.0f;
  } else {
    float* vis = s + (lo - kstart);
    const int64_t nv = hi - lo + 1;
    // The maximum of the visible scores, NaN left out (the CPU's `a > m ? a : m` from -inf); its
    // sign when it is zero does not change any exp below.
    float mx = -INFINITY;
    for (int64_t j = tid; j < nv; j += blockDim.x) mx = vis[j] > mx ? vis[j] : mx;
    for (int off = 16; off > 0; off >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, mx, off);
      mx = other > mx ? other : mx;
    }
    if (tid % 32 == 0) red[tid / 32] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (int w = 0; w < kAttnThreads / 32; ++w) mx = red[w] > mx ? red[w] : mx;
    for (int64_t j = tid; j < nv; j += blockDim.x) vis[j] = engine::fast_exp(__fsub_rn(vis[j], mx));
    __syncthreads();
    if (tid < 8) {
      double p = 0.0;
      for (int64_t j = 0; j + 8 <= nv; j += 8) p = __dadd_rn(p, static_cast<double>(vis[j + tid]));
      if (tid == 0)
        for (int64_t j = nv - nv % 8; j < nv; ++j) p = __dadd_rn(p, static_cast<double>(vis[j]));
      part[tid] = p;
    }
    __syncthreads();
    if (tid == 0) inv_sh = static_cast<float>(__ddiv_rn(1.0, combine_lanes(part)));
    __syncthreads();
    const float inv = inv_sh;
    const int64_t vlo = lo - kstart, vhi = hi - kstart;
    for (int64_t j = tid; j < nk; j += blockDim.x) s[j] = j < vlo || j > vhi ? 0.0f : __fmul_rn(s[j], inv);
  }
  __syncthreads();
  // Output: Σ_j p_j · v_j over all nk keys (zeros included), chains of 512 keys merged in order.
  for (int64_t d = tid; d < D; d += blockDim.x) {
    const float* vc = v + (b * T + kstart) * ldv + kvh * D + d;
    float c = 0.0f;
    for (int64_t j0 = 0; j0 < nk; j0 += kChain) {
      const int64_t j1 = j0 + kChain < nk ? j0 + kChain : nk;
      float acc = 0.0f;
      for (int64_t j = j0; j < j1; ++j) acc = fmaf(s[j], vc[j * ldv], acc);
      c = j0 == 0 ? acc : __fadd_rn(acc, c);
    }
    o[d] = c;
  }
}

__global__ void exact_scale_kernel(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x)
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x)
      C[r * ldc + c] = beta == 0.0f ? 0.0f : __fmul_rn(beta, C[r * ldc + c]);
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 * 64 ? b : 65535 * 64);
}

}  // namespace

void launch_exact_gemm(int64_t M, int64_t N, int64_t K, float alpha, float beta, const float* A, int64_t sam,
                       int64_t sak, const void* B, bool b_bf16, int64_t sbk, int64_t sbn, float* C, int64_t ldc,
                       bool upper, cudaStream_t s) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // the CPU gemm: C = beta · C (0 when beta is 0)
    exact_scale_kernel<<<static_cast<unsigned>(M < 65535 ? M : 65535), 256, 0, s>>>(M, N, beta, C, ldc);
    return;
  }
  // Row chunks within the grid's y limit (upper-triangle skipping assumes one chunk: M = N there).
  constexpr int64_t kRows = int64_t{65535} * kBM;
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t m = M - r0 < kRows ? M - r0 : kRows;
    const dim3 grid(static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>((m + kBM - 1) / kBM));
    const float* a = A + r0 * sam;
    float* c = C + r0 * ldc;
    const bool up = upper && r0 == 0;
    if (b_bf16)
      exact_gemm_kernel<uint16_t><<<grid, 256, 0, s>>>(m, N, K, alpha, beta, a, sam, sak,
                                                       static_cast<const uint16_t*>(B), sbk, sbn, c, ldc, up);
    else
      exact_gemm_kernel<float><<<grid, 256, 0, s>>>(m, N, K, alpha, beta, a, sam, sak, static_cast<const float*>(B),
                                                    sbk, sbn, c, ldc, up);
  }
}

void launch_exact_rms_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, double eps,
                           cudaStream_t s) {
  constexpr int64_t kMaxGrid = int64_t{1} << 30;
  for (int64_t r0 = 0; r0 < N; r0 += kMaxGrid) {
    const int64_t n = N - r0 < kMaxGrid ? N - r0 : kMaxGrid;
    exact_rms_norm_kernel<<<static_cast<unsigned>(n), 32, 0, s>>>(x + r0 * H, y + r0 * H, H, w, eps);
  }
}

void launch_exact_silu_mul(float* g, const float* u, int64_t n, cudaStream_t s) {
  if (n > 0) exact_silu_mul_kernel<<<grid_for(n, 256), 256, 0, s>>>(g, u, n);
}

bool launch_exact_attention(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                            float* out, int64_t ldo, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D,
                            const int64_t* lengths, int64_t window, float scale, cudaStream_t s) {
  const int64_t rows = B * NQ * T;
  if (rows <= 0) return true;
  const size_t bytes = static_cast<size_t>(T + D) * sizeof(float);
  if (bytes > 48 * 1024) {
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      return false;
    // The kernel's static shared memory (the reductions) comes on top of the dynamic part.
    if (bytes + 256 > static_cast<size_t>(optin)) return false;
    if (cudaFuncSetAttribute(exact_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)) != cudaSuccess)
      return false;
  }
  constexpr int64_t kMaxGrid = int64_t{1} << 30;
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxGrid) {
    const int64_t n = rows - r0 < kMaxGrid ? rows - r0 : kMaxGrid;
    exact_attention_kernel<<<static_cast<unsigned>(n), kAttnThreads, bytes, s>>>(
        q, ldq, k, ldk, v, ldv, out, ldo, T, NQ, NQ / NKV, D, lengths, window, scale, r0);
  }
  return true;
}

}  // namespace calq::backend::cuda
