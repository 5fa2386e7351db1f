// Kernels of the GPU forward pass (declarations and contracts in engine_kernels.h). Compiled with
// --fmad=false like the rest of calq_cuda, so a*b+c is two roundings as in the CPU engine
// (-ffp-contract=off); the dot products that the CPU computes as FMA chains (its gemm kernels) use
// fmaf explicitly.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "calq/backend/cuda/engine_kernels.h"
#include "calq/engine/router.h"

namespace calq::backend::cuda {

namespace {

constexpr unsigned kFull = 0xffffffffu;

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 * 64 ? b : 65535 * 64);
}

__device__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// One block per row.
__global__ void rms_norm_kernel(const float* x, float* y, int64_t H, const float* w, double eps) {
  __shared__ double red[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * H;
  float* yr = y + r * H;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) ss += static_cast<double>(xr[i]) * xr[i];
  ss = warp_sum(ss);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = (blockDim.x + 31) / 32;
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    double t = lane < nw ? red[lane] : 0.0;
    t = warp_sum(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  const float inv = static_cast<float>(1.0 / sqrt(red[0] / static_cast<double>(H) + eps));
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// Sum of v over the block (fp64), returned to every thread; red holds 32 doubles.
__device__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = (blockDim.x + 31) / 32;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < nw ? red[lane] : 0.0;
    t = warp_sum(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  return red[0];
}

// One block per row.
__global__ void layer_norm_kernel(const float* x, float* y, int64_t H, const float* w, const float* b, double eps) {
  __shared__ double red[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * H;
  float* yr = y + r * H;
  double s = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) s += xr[i];
  const double mean = block_sum(s, red) / static_cast<double>(H);
  double v = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
  const double var = block_sum(v, red) / static_cast<double>(H);
  const double inv = 1.0 / sqrt(var + eps);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) yr[i] = static_cast<float>((xr[i] - mean) * inv) * w[i] + b[i];
}

__global__ void gelu_tanh_kernel(float* x, int64_t n) {
  const double c = sqrt(2.0 / 3.14159265358979323846);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double xd = x[i];
    x[i] = static_cast<float>(0.5 * xd * (1.0 + tanh(c * (xd + 0.044715 * xd * xd * xd))));
  }
}

__global__ void rope_kernel(float* x, int64_t rows, int64_t ld, int64_t heads, int64_t half, int64_t T,
                            const float* cs, const float* sn) {
  const int64_t n = rows * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / (heads * half), rem = idx % (heads * half), hd = rem / half, i = rem % half;
    const int64_t t = r % T;
    const float c = cs[t * half + i], s = sn[t * half + i];
    float* xh = x + r * ld + hd * 2 * half;
    const float a = xh[i], b = xh[i + half];
    xh[i] = a * c - b * s;
    xh[i + half] = b * c + a * s;
  }
}

__global__ void add_bias_kernel(float* y, const float* bias, int64_t N, int64_t out) {
  const int64_t n = N * out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += bias[i % out];
}

__global__ void add_kernel(float* h, const float* o, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    h[i] += o[i];
}

__global__ void silu_mul_kernel(float* g, const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    g[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

__global__ void to_bf16_kernel(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}

__global__ void split_bf16_kernel(const float* x, uint16_t* hi, uint16_t* lo, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
    hi[i] = __bfloat16_as_ushort(h);
    lo[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i] - __bfloat162float(h)));
  }
}

__global__ void bf16_to_f32_kernel(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = __bfloat162float(__ushort_as_bfloat16(x[i]));
}

__global__ void count_nonfinite_kernel(const float* x, int64_t n, unsigned int* count) {
  unsigned int c = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    c += isfinite(x[i]) ? 0u : 1u;
  if (c) atomicAdd(count, c);
}

__global__ void gather_rows_kernel(const float* x, const int64_t* rows, int64_t n, int64_t H, float* y) {
  const int64_t total = n * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = x[rows[i / H] * H + i % H];
}

__global__ void gather_rows_bf16_kernel(const uint16_t* x, const int64_t* rows, int64_t n, int64_t H, float* y) {
  const int64_t total = n * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = __bfloat162float(__ushort_as_bfloat16(x[rows[i / H] * H + i % H]));
}

// h[rows[i], :] += w[i] * y[i, :] for n rows of H (the rows are distinct).
__global__ void scatter_add_rows_kernel(float* h, const int64_t* rows, const float* w, const float* y, int64_t n,
                                        int64_t H) {
  const int64_t total = n * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H;
    h[rows[r] * H + i % H] += w[r] * y[i];
  }
}

// One thread per row: engine::route_row (calq/engine/router.h), the CPU engine's own function.
__global__ void route_topk_kernel(const float* logits, int64_t N, int E, int K, bool renorm, int32_t* sel,
                                  float* wts) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < N;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    engine::route_row(logits + r * E, E, K, renorm, sel + r * K, wts + r * K);
}

// Attention: a block takes kBQ query rows of one (sequence, query head); each of its kWarps warps
// owns kRows of them. Keys and values come through shared memory in tiles of 32 (one key per
// lane for the scores, then one output dimension per lane, DC = ceil(D / 32) per lane, for p·v),
// with an online softmax (running max and sum per row), so no T×T matrix exists.
constexpr int kWarps = 8, kRows = 4, kBQ = kWarps * kRows, kBK = 32;

size_t attention_smem(int64_t D) { return sizeof(float) * static_cast<size_t>(kBQ * D + kBK * (D + 1) + kBK * D); }

template <int DC>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const float* __restrict__ q, int64_t ldq, const float* __restrict__ k, int64_t ldk,
                     const float* __restrict__ v, int64_t ldv, float* __restrict__ out, int64_t ldo, int64_t T,
                     int64_t groups, int D, const int64_t* __restrict__ lengths, int64_t window, float scale) {
  extern __shared__ float smem[];
  float* Qs = smem;               // [kBQ, D]
  float* Ks = Qs + kBQ * D;       // [kBK, D + 1] (padded: lane j reads row j without bank conflicts)
  float* Vs = Ks + kBK * (D + 1); // [kBK, D]
  const int ldks = D + 1;
  const int64_t b = blockIdx.z, hq = blockIdx.y, kvh = hq / groups;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  const int64_t len = lengths[b];
  const int64_t base = b * T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int idx = threadIdx.x; idx < kBQ * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t i = i0 + r;
    Qs[idx] = i < T ? q[(base + i) * ldq + hq * D + d] : 0.0f;
  }
  const int64_t ilast = min(i0 + kBQ - 1, T - 1);
  const int64_t kend = min(ilast, len - 1);  // inclusive
  const int64_t kstart = window > 0 ? max(int64_t{0}, i0 - window + 1) : 0;

  float acc[kRows][DC];
  float m[kRows], l[kRows];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[rr][c] = 0.0f;
  }
  for (int64_t j0 = kstart; j0 <= kend; j0 += kBK) {
    __syncthreads();  // the previous tile is no longer read (and Qs is written, first time)
    for (int idx = threadIdx.x; idx < kBK * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      const int64_t j = j0 + r;
      const bool ok = j <= kend;
      Ks[r * ldks + d] = ok ? k[(base + j) * ldk + kvh * D + d] : 0.0f;
      Vs[r * D + d] = ok ? v[(base + j) * ldv + kvh * D + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const int r = warp * kRows + rr;
      const int64_t i = i0 + r;
      if (i >= T) continue;  // uniform over the warp
      const int64_t hi = min(i, len - 1);
      const int64_t lo = window > 0 ? max(int64_t{0}, i - window + 1) : 0;
      const int64_t j = j0 + lane;
      const bool valid = j >= lo && j <= hi;
      float s = -INFINITY;
      if (valid) {
        const float* qr = Qs + r * D;
        const float* kr = Ks + lane * ldks;
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
        s = dot * scale;
      }
      const float mt = warp_max(s);
      if (mt == -INFINITY) continue;  // no visible key in this tile (uniform)
      const float mn = fmaxf(m[rr], mt);
      const float corr = expf(m[rr] - mn);  // 0 for the first visible tile
      const float p = valid ? expf(s - mn) : 0.0f;
      l[rr] = l[rr] * corr + warp_sum(p);
#pragma unroll
      for (int c = 0; c < DC; ++c) acc[rr][c] *= corr;
      for (int jj = 0; jj < kBK; ++jj) {
        const float pj = __shfl_sync(kFull, p, jj);
#pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int d = lane + 32 * c;
          if (d < D) acc[rr][c] = fmaf(pj, Vs[jj * D + d], acc[rr][c]);
        }
      }
      m[rr] = mn;
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int64_t i = i0 + warp * kRows + rr;
    if (i >= T) continue;
    const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) out[(base + i) * ldo + hq * D + d] = acc[rr][c] * inv;
    }
  }
}

template <int DC>
void attention_launch(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                      float* out, int64_t ldo, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D,
                      const int64_t* lengths, int64_t window, float scale, cudaStream_t s) {
  const size_t smem = attention_smem(D);
  static bool configured = false;  // the opt-in above 48 KiB, once per instantiation (D <= 32·DC)
  if (!configured) {
    cudaFuncSetAttribute(attention_kernel<DC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(attention_smem(32 * DC)));
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>((T + kBQ - 1) / kBQ), static_cast<unsigned>(NQ), static_cast<unsigned>(B));
  attention_kernel<DC><<<grid, kWarps * 32, smem, s>>>(q, ldq, k, ldk, v, ldv, out, ldo, T, NQ / NKV,
                                                        static_cast<int>(D), lengths, window, scale);
}

}  // namespace

void launch_rms_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, double eps, cudaStream_t s) {
  if (N == 0) return;
  const int threads = H >= 2048 ? 256 : H >= 256 ? 128 : 32;
  rms_norm_kernel<<<static_cast<unsigned>(N), threads, 0, s>>>(x, y, H, w, eps);
}

void launch_layer_norm(const float* x, float* y, int64_t N, int64_t H, const float* w, const float* b, double eps,
                       cudaStream_t s) {
  if (N == 0) return;
  const int threads = H >= 2048 ? 256 : H >= 256 ? 128 : 32;
  layer_norm_kernel<<<static_cast<unsigned>(N), threads, 0, s>>>(x, y, H, w, b, eps);
}

void launch_gelu_tanh(float* x, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  gelu_tanh_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, n);
}

void launch_rope(float* x, int64_t rows, int64_t ld, int64_t heads, int64_t half, int64_t T, const float* cos,
                 const float* sin, cudaStream_t s) {
  const int64_t n = rows * heads * half;
  if (n == 0) return;
  rope_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, rows, ld, heads, half, T, cos, sin);
}

void launch_add_bias(float* y, const float* bias, int64_t N, int64_t out, cudaStream_t s) {
  if (N * out == 0) return;
  add_bias_kernel<<<blocks_for(N * out, 256), 256, 0, s>>>(y, bias, N, out);
}

void launch_add(float* h, const float* o, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n, 256), 256, 0, s>>>(h, o, n);
}

void launch_silu_mul(float* g, const float* u, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  silu_mul_kernel<<<blocks_for(n, 256), 256, 0, s>>>(g, u, n);
}

void launch_to_bf16(const float* x, uint16_t* y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  to_bf16_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, y, n);
}

void launch_split_bf16(const float* x, uint16_t* hi, uint16_t* lo, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  split_bf16_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, hi, lo, n);
}

void launch_bf16_to_f32(const uint16_t* x, float* y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, y, n);
}

void launch_count_nonfinite(const float* x, int64_t n, unsigned int* count, cudaStream_t s) {
  if (n == 0) return;
  count_nonfinite_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, n, count);
}

void launch_gather_rows(const float* x, const int64_t* rows, int64_t n, int64_t H, float* y, cudaStream_t s) {
  if (n * H == 0) return;
  gather_rows_kernel<<<blocks_for(n * H, 256), 256, 0, s>>>(x, rows, n, H, y);
}

void launch_gather_rows_bf16(const uint16_t* x, const int64_t* rows, int64_t n, int64_t H, float* y, cudaStream_t s) {
  if (n * H == 0) return;
  gather_rows_bf16_kernel<<<blocks_for(n * H, 256), 256, 0, s>>>(x, rows, n, H, y);
}

void launch_scatter_add_rows(float* h, const int64_t* rows, const float* w, const float* y, int64_t n, int64_t H,
                             cudaStream_t s) {
  if (n * H == 0) return;
  scatter_add_rows_kernel<<<blocks_for(n * H, 256), 256, 0, s>>>(h, rows, w, y, n, H);
}

void launch_route_topk(const float* logits, int64_t N, int64_t E, int64_t K, bool renorm, int32_t* sel, float* wts,
                       cudaStream_t s) {
  if (N == 0) return;
  route_topk_kernel<<<blocks_for(N, 128), 128, 0, s>>>(logits, N, static_cast<int>(E), static_cast<int>(K), renorm,
                                                       sel, wts);
}

namespace {

// Block-wide reduction of one value per thread (blockDim.x a multiple of 32, at most 1024):
// `warp_op` reduces a warp, `identity` fills the lanes past the last warp.
template <typename WarpOp>
__device__ float block_reduce(float v, float* red, float identity, WarpOp warp_op) {
  v = warp_op(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : identity;
  return warp_op(v);
}
__device__ float block_max(float v, float* red) {
  return block_reduce(v, red, -INFINITY, [](float x) { return warp_max(x); });
}
__device__ float block_sum(float v, float* red) {
  return block_reduce(v, red, 0.0f, [](float x) { return warp_sum(x); });
}

// One block per (query, pair): the row of nk scores of query i0 + blockIdx.x against keys
// [k0, k0 + nk), scaled, softmaxed over the visible keys, zero elsewhere.
__global__ void masked_softmax_kernel(float* S, int64_t nq, int64_t nk, int64_t i0, int64_t k0, int64_t pair0,
                                      int64_t heads, const int64_t* __restrict__ lengths, int64_t window,
                                      float scale) {
  __shared__ float red[32];
  const int64_t il = blockIdx.x, p = blockIdx.y;
  const int64_t i = i0 + il, b = (pair0 + p) / heads;
  float* row = S + (p * nq + il) * nk;
  const int64_t len = lengths[b];
  const int64_t hi = min(i, len - 1) - k0;  // local, inclusive
  const int64_t lo = (window > 0 ? max(int64_t{0}, i - window + 1) : int64_t{0}) - k0;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < nk; j += blockDim.x)
    if (j >= lo && j <= hi) m = fmaxf(m, row[j] * scale);
  m = block_max(m, red);
  float sum = 0.0f;
  if (m != -INFINITY)
    for (int64_t j = threadIdx.x; j < nk; j += blockDim.x)
      if (j >= lo && j <= hi) sum += expf(row[j] * scale - m);
  sum = block_sum(sum, red);
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int64_t j = threadIdx.x; j < nk; j += blockDim.x)
    row[j] = j >= lo && j <= hi && m != -INFINITY ? expf(row[j] * scale - m) * inv : 0.0f;
}

}  // namespace

void launch_masked_softmax(float* S, int64_t pairs, int64_t nq, int64_t nk, int64_t i0, int64_t k0, int64_t pair0,
                           int64_t heads, const int64_t* lengths, int64_t window, float scale, cudaStream_t s) {
  if (pairs * nq * nk == 0) return;
  const int threads = nk >= 1024 ? 256 : 128;
  masked_softmax_kernel<<<dim3(static_cast<unsigned>(nq), static_cast<unsigned>(pairs)), threads, 0, s>>>(
      S, nq, nk, i0, k0, pair0, heads, lengths, window, scale);
}

void launch_attention(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                      float* out, int64_t ldo, int64_t B, int64_t T, int64_t NQ, int64_t NKV, int64_t D,
                      const int64_t* lengths, int64_t window, float scale, cudaStream_t s) {
  if (B * T == 0) return;
  if (D <= 32)
    attention_launch<1>(q, ldq, k, ldk, v, ldv, out, ldo, B, T, NQ, NKV, D, lengths, window, scale, s);
  else if (D <= 64)
    attention_launch<2>(q, ldq, k, ldk, v, ldv, out, ldo, B, T, NQ, NKV, D, lengths, window, scale, s);
  else if (D <= 128)
    attention_launch<4>(q, ldq, k, ldk, v, ldv, out, ldo, B, T, NQ, NKV, D, lengths, window, scale, s);
  else
    attention_launch<8>(q, ldq, k, ldk, v, ldv, out, ldo, B, T, NQ, NKV, D, lengths, window, scale, s);
}

}  // namespace calq::backend::cuda
