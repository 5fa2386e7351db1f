// GPTQ's fused in-block column loop on the GPU (gptq_kernel.cu): the device twin of
// quant::detail::gptq_block, with the element code of calq/quant/element.h. Plain C++
// declarations so that host code compiled by the C++ compiler can launch it.
#pragma once

#include <cstdint>

#include "calq/quant/element.h"

typedef struct CUstream_st* cudaStream_t;

namespace calq::backend::cuda {

// One block [i1, i2) of GPTQ's column loop for every row, on the device. Layouts:
//   w       rows × cols fp64, row-major (processing order), read only: columns [i1, hi) of each row
//           are staged (shared memory, or `stage` when they do not fit) and updated there;
//   u       cols × cols fp64, row-major upper factor of H⁻¹;
//   err     count × rows fp64: err[(k − i1)·rows + r] (the lazy GEMM's input);
//   codes   cols × rows bytes: codes[k·rows + r], k the processing position;
//   params  groups × rows: params[g·rows + r] (read when static, written when chosen here);
//   perm    cols int32 (the act-order permutation; the identity without act-order);
//   loss    rows fp64: Σ ½·err² of the row, added to.
struct GptqBlockArgs {
  const double* w = nullptr;
  const double* u = nullptr;
  double* err = nullptr;
  uint8_t* codes = nullptr;
  quant::GroupParams* params = nullptr;
  const int32_t* perm = nullptr;
  double* loss = nullptr;
  double* stage = nullptr;  // rows × (hi − i1) fp64 scratch for the global-memory variant, or null
  int64_t rows = 0, cols = 0;
  int64_t i1 = 0, i2 = 0, hi = 0;  // the block, and the last column read (+1): i2, or i2 + group_len
  int64_t group_len = 0;
  quant::elem::Spec spec;
  float global = 1.f;
  bool static_params = false, per_channel = false, dynamic_act = false;
  bool clip = false;
  int clip_grid = 20;
  float clip_min = 0.5f, clip_norm = 2.f;
};

// Threads (rows) per thread block of the in-block kernel, and the dynamic shared memory it needs
// for a block of `width` = hi − i1 columns. gptq_block_shared_limit() is the largest amount the
// device allows (set once on the kernel); above it the kernel stages in args.stage instead.
constexpr int kGptqRowsPerCta = 32;
inline size_t gptq_block_shared_bytes(int64_t width) {
  return static_cast<size_t>(width) * kGptqRowsPerCta * sizeof(double);
}
size_t gptq_block_shared_limit();

// Launches the in-block kernel (shared-memory staging when it fits, else args.stage must hold
// rows × (hi − i1) doubles).
void launch_gptq_block(const GptqBlockArgs& args, cudaStream_t stream);

// The permuted fp64 working copies of quant::detail::gptq_prepare, on the GPU, with its functions
// (calq/quant/gptq_permute.h): wp[r·cols + k] = W[r][perm[k]] (0 for dead columns), and
// hp[k·cols + l] = H[perm[k]][perm[l]] (1 on the diagonal of dead columns).
void launch_permute_weights(const float* w, const uint8_t* dead, const int32_t* perm, double* wp, int64_t rows,
                            int64_t cols, cudaStream_t stream);
void launch_permute_hessian(const double* h, const uint8_t* dead, const int32_t* perm, double* hp, int64_t cols,
                            cudaStream_t stream);

// Ŵ in the weight's layout from the codes in processing order (in[k·rows + r]) and the group
// parameters (params[g·rows + r]): out[r·cols + perm[k]] = elem::value(code, params of its group,
// global), the group g = k / group_len when groups follow the processing order (dynamic_act), 0
// per channel, else perm[k] / group_len; the value function of QuantizedWeight::dequantize.
void launch_dequantize(const uint8_t* in, const quant::GroupParams* params, const int32_t* perm, float* out,
                       int64_t rows, int64_t cols, int64_t group_len, quant::elem::Spec spec, float global,
                       bool dynamic_act, bool per_channel, cudaStream_t stream);

// out[r·cols + perm[k]] = in[k·rows + r]: the codes from processing order to the weight's layout.
void launch_scatter_codes(const uint8_t* in, uint8_t* out, const int32_t* perm, int64_t rows, int64_t cols,
                          cudaStream_t stream);

}  // namespace calq::backend::cuda
