// GPTQ (Frantar et al. 2022; reference code IST-DASLab/gptq), for every element format.
//
// Given W [rows × cols] and the Hessian H = XᵀX/n of the module's inputs [cols × cols]:
//  1. dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0;
//  2. λ = damp · mean(diag H) is added to the diagonal, once (if H + λI is still not positive
//     definite, the damping is retried ×10, up to 3 times, with a warning);
//  3. with act-order, columns are processed in order of decreasing H_jj;
//  4. U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU);
//  5. columns are quantized one at a time: q = Q(w_j), err = (w_j − q)/U_jj, and the error is
//     propagated to the later columns of the block (w_k −= err·U_jk); after each block of
//     `block_size` columns, to all later columns at once (one GEMM: the "lazy batch" update);
//  6. group parameters (scale, zero) are chosen when a group's first column comes up, from the
//     group's current (error-updated) weights. With act-order and `static_groups`, every group's
//     parameters are instead computed before anything is quantized, from the original weights
//     in the original column order (so no g_idx is needed); without static groups, groups follow
//     the processing order and the result carries g_idx.
// Proxy loss: Σ (w − q)² / U_jj² / 2 over all elements (the reference code's "error").
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "calq/quant/format.h"
#include "calq/quant/gptq_permute.h"

namespace calq::quant {

struct GptqOptions {
  double damp = 0.01;
  int64_t block_size = 128;
  bool act_order = false;
  bool static_groups = true;  // with act_order: group parameters from the original order
  // Group-parameter choice when a group starts: absmax (min/max), or the clipping search of RTN
  // (shrink grid, minimising Σ|w − q|^clip_norm over the group) on the group's current weights.
  bool clip_search = false;
  int clip_grid = 20;
  float clip_min = 0.5f;
  float clip_norm = 2.0f;
  std::optional<float> global_scale;  // nvfp4: the tensor scale (shared across fused modules)
  // Run on the CUDA device (calq --device cuda; src/calq/backend/cuda/): the factorization and
  // the lazy updates on the GPU, same algorithm and fp64 arithmetic. Errors when calq was built
  // without CUDA or no usable GPU is visible.
  bool cuda = false;
  // With cuda: the GPU ordinal this call runs on (calq --devices; the calling thread's current
  // device is restored afterwards).
  int device = 0;
  // With cuda: H is already on a GPU (the calibration's Hessians, backend::GpuHessian::
  // finish_on_device): its cols × cols fp64 values at `hessian_device` on GPU
  // `hessian_device_ordinal`, every entry finite (the caller checked). The host Hessian argument
  // then holds only its diagonal (cols values); nothing else of H goes through the host.
  const double* hessian_device = nullptr;
  int hessian_device_ordinal = 0;
  // With cuda: the weights already on a GPU (engine::Model::device_weight: rows × cols, row-major,
  // bf16 bits when weight_device_bf16, else fp32), read there instead of w_in, which may then be
  // null: copied (a peer copy from another GPU), widened and checked for non-finite values on the
  // GPU. Not with static group parameters (per-channel formats, act-order with static groups) or
  // nvfp4 without global_scale: those read the weights on the host.
  const void* weight_device = nullptr;
  bool weight_device_bf16 = false;
  // With cuda: also leave Ŵ = q.dequantize() (rows × cols fp32, bit for bit) on the GPU
  // (GptqResult::w_hat_device), for the GPU engine to take without a host round trip.
  bool w_hat_on_device = false;
};

// Where the time of one CUDA GPTQ call went (seconds; all zero on the CPU path). GPU stages are
// timed with CUDA events (`block_loop`, `lazy_gemm`: summed over the blocks), host stages with a
// steady clock; `gemm_flops` counts the lazy-update GEMMs (2·rows·(cols − i2)·count per block).
struct GptqStageTimes {
  double prepare = 0;     // host: gptq_prepare (checks, dead inputs, static params, permuted fp64 copies)
  double setup = 0;       // handles, allocation, uploads of W, H and the small arrays
  double factor = 0;      // damping, Cholesky, inverse (with the retries)
  double block_loop = 0;  // the fused in-block kernel, all blocks
  double lazy_gemm = 0;   // the lazy-update GEMMs, all blocks
  double download = 0;    // codes to the weight's layout, codes/params/loss to the host
  double gemm_flops = 0;
};

struct GptqResult {
  QuantizedWeight q;
  double proxy_loss = 0;
  int64_t dead_inputs = 0;
  double damp_value = 0;  // λ actually added
  double damp_used = 0;   // the damp factor that gave a positive definite H (after retries)
  double seconds = 0;
  GptqStageTimes stages;  // CUDA path only
  // GptqOptions::w_hat_on_device: Ŵ on GPU w_hat_device_ordinal (freed with the last reference).
  std::shared_ptr<const float> w_hat_device;
  int w_hat_device_ordinal = -1;
};

// w: rows×cols fp32 row-major; h: cols×cols fp64 row-major (symmetric). The column updates run in
// fp64. Errors name `what`: NaN/Inf weights or Hessian, shapes, a Hessian that stays indefinite
// after the damping retries (the error suggests a larger --damp).
GptqResult gptq_quantize(const float* w, int64_t rows, int64_t cols, const std::vector<double>& h,
                         const Format& f, const GptqOptions& opt, const std::string& what = "weight");

namespace detail {
// The parameters of one (row, group) from its current values, as RTN chooses them (absmax or the
// clip search); shared by the CPU and CUDA GPTQ so both choose identical parameters.
GroupParams gptq_choose_params(const Format& f, const float* x, int64_t n, int64_t stride, const GptqOptions& o,
                               float global, std::vector<float>& scratch);

// Everything CPU and CUDA GPTQ do before damping and the column loop, so that both start from
// identical values: the input checks, dead inputs (H_jj = 0: the column's weights count as zero
// and H_jj as 1), the nvfp4 tensor scale, static group parameters (per-channel, or act-order with
// static groups), the act-order permutation (stable: ties keep the original order), and, with
// `permuted_copies`, the permuted fp64 working copies Wp[r][k] = W[r][perm[k]],
// Hp[k][l] = H[perm[k]][perm[l]] (permuted_weight / permuted_hessian below, which the CUDA path
// evaluates on the GPU instead).
struct GptqPrepared {
  GptqResult res;  // q sized (codes, params; static params set), global scale, dead_inputs
  float global = 1.f;
  bool per_channel = false, static_params = false;
  bool dynamic_act = false;            // act-order with groups in processing order (q.g_idx set)
  int64_t groups = 0, group_len = 0;  // groups per row, columns per group
  std::vector<int64_t> perm;
  std::vector<uint8_t> dead;  // per input column: H_jj was 0
  std::vector<double> Wp, Hp;  // empty unless permuted_copies
  double mean_diag = 0;  // of Hp (undamped), summed in processing order
  // The group of processing position k.
  int64_t group_at(int64_t k) const { return per_channel ? 0 : dynamic_act ? k / group_len : perm[k] / group_len; }
};
GptqPrepared gptq_prepare(const float* w, int64_t rows, int64_t cols, const std::vector<double>& h, const Format& f,
                          const GptqOptions& o, const std::string& what, bool permuted_copies = true);

// The column loop of one block [i1, i2) for every row, shared by CPU and CUDA GPTQ: quantize
// column k (choosing a group's parameters when it starts, unless static), err = (w − q)/U_kk into
// err[r·B + k − i1], propagate inside the block. Row r's columns are w[r·ldw + k − w_col0] for
// k in [i1, min(cols, i2 + group_len)); U is the upper factor of H⁻¹ (cols × cols). Rows run in
// parallel. Returns Σ ½·err².
double gptq_block(GptqPrepared& p, const std::vector<double>& U, int64_t i1, int64_t i2, double* w, int64_t ldw,
                  int64_t w_col0, std::vector<double>& err, int64_t B, const Format& f, const GptqOptions& o);
}  // namespace detail

// tr((W − Ŵ) H (W − Ŵ)ᵀ): the layer-output error the Hessian measures (for reports and tests).
double hessian_error(const float* w, const float* w_hat, int64_t rows, int64_t cols,
                     const std::vector<double>& h);

}  // namespace calq::quant
