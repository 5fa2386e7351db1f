// GPTQ's in-block column loop as one CUDA kernel: the device twin of
// quant::detail::gptq_block (src/calq/quant/gptq.cpp), read side by side with it.
//
// One thread per row (rows are independent inside a block); kGptqRowsPerCta rows per thread
// block. The row's columns [i1, hi) are staged column-major across the thread block's rows
// (shared memory: sh[c·T + t], so a warp reading one column touches consecutive doubles), or in a
// global scratch laid out the same way across all rows when they do not fit. U's rows are read
// through the L1 cache: every thread reads the same U[k, l] at the same time (a broadcast).
// After column k is quantized its staged value is not read again, so the slot holds its error
// (needed by the parameter choice of a group that reaches past the block).
//
// Arithmetic: the same fp64 operations in the same order as the CPU loop (no FMA: --fmad=false),
// the group parameters and codes from calq/quant/element.h, the functions format.cpp uses.
#include <cuda_runtime.h>

#include "calq/backend/cuda/gptq_kernel.h"
#include "calq/quant/element.h"
#include "calq/quant/gptq_permute.h"

namespace calq::backend::cuda {

namespace {

using quant::GroupParams;
namespace elem = quant::elem;

constexpr int kMaxGroup = 256;  // the largest group a parameter choice inside the loop sees

template <bool kShared>
__global__ void __launch_bounds__(kGptqRowsPerCta) gptq_block_kernel(GptqBlockArgs a) {
  extern __shared__ double sh[];
  const int T = blockDim.x, t = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * T, r = r0 + t;
  const int64_t i1 = a.i1, i2 = a.i2, width = a.hi - a.i1, rows = a.rows, cols = a.cols;
  double* base;
  int64_t stride;
  if (kShared) {
    // Stage the thread block's rows: consecutive threads read consecutive columns of one row.
    const int64_t n = (rows - r0 < T ? rows - r0 : T);
    for (int64_t idx = t; idx < n * width; idx += T) {
      const int64_t rr = idx / width, c = idx % width;
      sh[c * T + rr] = a.w[(r0 + rr) * cols + i1 + c];
    }
    __syncthreads();
    base = sh + t;
    stride = T;
  } else {
    if (r >= rows) return;
    for (int64_t c = 0; c < width; ++c) a.stage[c * rows + r] = a.w[r * cols + i1 + c];
    base = a.stage + r;
    stride = rows;
  }
  if (r >= rows) return;
  // wr(k): column k of this row (k in [i1, hi)).
  auto wr = [&](int64_t k) -> double& { return base[(k - i1) * stride]; };
  const double* U = a.u;
  float cur[kMaxGroup];
  int64_t cur_g = -1;
  GroupParams gp;
  elem::Coder coder;
  double loss = 0;
  for (int64_t k = i1; k < i2; ++k) {
    const int64_t g = a.per_channel ? 0 : a.dynamic_act ? k / a.group_len : a.perm[k] / a.group_len;
    if (!a.static_params && k % a.group_len == 0) {
      // The group is columns k..k+gs-1 of the processing order at their current values; columns
      // past this block have not received this block's errors yet (the lazy update brings them):
      // add them here (the CPU loop's very expression and order).
      const int64_t len = a.group_len < cols - k ? a.group_len : cols - k;
      for (int64_t l = 0; l < len; ++l) {
        double v = wr(k + l);
        if (k + l >= i2)
          for (int64_t m = i1; m < k; ++m) v -= wr(m) * U[m * cols + k + l];  // wr(m): column m's error
        cur[l] = static_cast<float>(v);
      }
      float mn, mx;
      elem::min_max(cur, len, 1, &mn, &mx);
      const elem::Spec spec = a.spec;
      const float global = a.global, norm = a.clip_norm;
      gp = elem::choose_params(spec, mn, mx, a.clip, a.clip_grid, a.clip_min, global, [&](const GroupParams& p) {
        return elem::group_error(spec, cur, len, p, global, norm);
      });
      a.params[g * rows + r] = gp;
      coder = elem::Coder(a.spec, gp, a.global);
      cur_g = g;
    } else if (g != cur_g) {
      gp = a.params[g * rows + r];
      coder = elem::Coder(a.spec, gp, a.global);
      cur_g = g;
    }
    const double xd = wr(k);
    const uint8_t c = coder.code(static_cast<float>(xd));
    const double v = elem::value(a.spec, c, gp, a.global);
    a.codes[k * rows + r] = c;
    const double e = (xd - v) / U[k * cols + k];
    loss += 0.5 * e * e;
    a.err[(k - i1) * rows + r] = e;
    wr(k) = e;
    // Propagate inside the block: w[l] -= err · U[k, l] for k < l < i2.
    if (e != 0.0) {
      const double* urow = U + k * cols;
      for (int64_t l = k + 1; l < i2; ++l) wr(l) -= e * urow[l];
    }
  }
  a.loss[r] += loss;
}

__global__ void permute_weights(const float* w, const uint8_t* dead, const int32_t* perm, double* wp, int64_t rows,
                                int64_t cols) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= cols) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
    wp[r * cols + k] = quant::detail::permuted_weight(w, dead, perm, cols, r, k);
}

__global__ void permute_hessian(const double* h, const uint8_t* dead, const int32_t* perm, double* hp, int64_t cols) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= cols) return;
  for (int64_t k = blockIdx.y; k < cols; k += gridDim.y)
    hp[k * cols + l] = quant::detail::permuted_hessian(h, dead, perm, cols, k, l);
}

__global__ void scatter_codes(const uint8_t* in, uint8_t* out, const int32_t* perm, int64_t rows, int64_t cols) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  for (int64_t k = blockIdx.y; k < cols; k += gridDim.y) out[r * cols + perm[k]] = in[k * rows + r];
}

__global__ void dequantize_kernel(const uint8_t* in, const quant::GroupParams* params, const int32_t* perm, float* out,
                                  int64_t rows, int64_t cols, int64_t gs, quant::elem::Spec spec, float global,
                                  bool dynamic_act, bool per_channel) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  for (int64_t k = blockIdx.y; k < cols; k += gridDim.y) {
    const int64_t c = perm[k];
    const int64_t g = dynamic_act ? k / gs : per_channel ? 0 : c / gs;
    out[r * cols + c] = quant::elem::value(spec, in[k * rows + r], params[g * rows + r], global);
  }
}

}  // namespace

void launch_dequantize(const uint8_t* in, const quant::GroupParams* params, const int32_t* perm, float* out,
                       int64_t rows, int64_t cols, int64_t group_len, quant::elem::Spec spec, float global,
                       bool dynamic_act, bool per_channel, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + 255) / 256), static_cast<unsigned>(cols < 65535 ? cols : 65535));
  dequantize_kernel<<<grid, 256, 0, stream>>>(in, params, perm, out, rows, cols, group_len, spec, global, dynamic_act,
                                              per_channel);
}

size_t gptq_block_shared_limit() {
  static const size_t limit = [] {
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaFuncSetAttribute(gptq_block_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    return static_cast<size_t>(optin);
  }();
  return limit;
}

void launch_gptq_block(const GptqBlockArgs& a, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((a.rows + kGptqRowsPerCta - 1) / kGptqRowsPerCta);
  const size_t bytes = gptq_block_shared_bytes(a.hi - a.i1);
  if (bytes <= gptq_block_shared_limit())
    gptq_block_kernel<true><<<grid, kGptqRowsPerCta, bytes, stream>>>(a);
  else
    gptq_block_kernel<false><<<grid, kGptqRowsPerCta, 0, stream>>>(a);
}

void launch_permute_weights(const float* w, const uint8_t* dead, const int32_t* perm, double* wp, int64_t rows,
                            int64_t cols, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  permute_weights<<<grid, 256, 0, stream>>>(w, dead, perm, wp, rows, cols);
}

void launch_permute_hessian(const double* h, const uint8_t* dead, const int32_t* perm, double* hp, int64_t cols,
                            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(cols < 65535 ? cols : 65535));
  permute_hessian<<<grid, 256, 0, stream>>>(h, dead, perm, hp, cols);
}

void launch_scatter_codes(const uint8_t* in, uint8_t* out, const int32_t* perm, int64_t rows, int64_t cols,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + 255) / 256), static_cast<unsigned>(cols < 65535 ? cols : 65535));
  scatter_codes<<<grid, 256, 0, stream>>>(in, out, perm, rows, cols);
}

}  // namespace calq::backend::cuda
