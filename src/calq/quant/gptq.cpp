#include "calq/quant/gptq.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/quant/linalg.h"

namespace calq::quant {

namespace detail {

GroupParams gptq_choose_params(const Format& f, const float* x, int64_t n, int64_t stride, const GptqOptions& o,
                          float global, std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) scratch[static_cast<size_t>(i)] = x[i * stride];
  float mn = 0.f, mx = 0.f;
  elem::min_max(scratch.data(), n, 1, &mn, &mx);
  // The clip search of element.h (shared with the CUDA kernel), with the bulk group_error.
  return elem::choose_params(f.spec(), mn, mx, o.clip_search, o.clip_grid, o.clip_min, global,
                             [&](const GroupParams& p) { return group_error(f, scratch.data(), n, p, global, o.clip_norm); });
}

}  // namespace detail

namespace {
using detail::gptq_choose_params;
}  // namespace


namespace detail {

GptqPrepared gptq_prepare(const float* w_in, int64_t rows, int64_t cols, const std::vector<double>& h_in,
                          const Format& f, const GptqOptions& o, const std::string& what, bool permuted_copies) {
  f.check_shape(rows, cols, what);
  // H on the GPU (o.hessian_device): h_in is its diagonal.
  const bool diag_only = o.hessian_device != nullptr;
  CALQ_CHECK(!diag_only || o.cuda, "{}: a Hessian on the GPU needs GPTQ on the GPU", what);
  CALQ_CHECK(static_cast<int64_t>(h_in.size()) == (diag_only ? cols : cols * cols),
             "{}: Hessian has {} values, expected {}×{}", what, h_in.size(), cols, diag_only ? 1 : cols);
  CALQ_CHECK(o.damp >= 0 && std::isfinite(o.damp), "--damp must be >= 0, got {}", o.damp);
  CALQ_CHECK(o.block_size >= 1, "GPTQ block size must be >= 1, got {}", o.block_size);
  const size_t R = static_cast<size_t>(rows), C = static_cast<size_t>(cols);
  const bool big = rows * cols >= 65536;
  // Weights on the GPU (o.weight_device): checked there; nothing below may read w_in.
  CALQ_CHECK(w_in || (o.cuda && o.weight_device), "internal: {}: no weights", what);
  const bool host_w = w_in != nullptr;
  CALQ_CHECK(host_w || !(f.group_size < 0 || (o.act_order && o.static_groups) ||
                         (f.family == Family::NVFP4 && !o.global_scale)),
             "internal: {}: static group parameters or an nvfp4 global scale need the weights on the host", what);
  // The first non-finite weight (in memory order) names itself in the error.
  int64_t bad = rows * cols;
  if (host_w) {
#pragma omp parallel for schedule(static) reduction(min : bad) if (big)
    for (int64_t i = 0; i < rows * cols; ++i)
      if (!std::isfinite(w_in[i])) bad = std::min(bad, i);
  }
  if (bad < rows * cols)
    fail("{}: weight {} at row {}, column {} is not finite", what, w_in[bad], bad / cols, bad % cols);
  bool h_finite = true;
  const int64_t h_count = static_cast<int64_t>(h_in.size());
#pragma omp parallel for schedule(static) reduction(&& : h_finite) if (h_count >= 65536)
  for (int64_t i = 0; i < h_count; ++i) h_finite = h_finite && std::isfinite(h_in[static_cast<size_t>(i)]);
  CALQ_CHECK(h_finite, "{}: the Hessian has a non-finite value", what);

  GptqPrepared p;
  QuantizedWeight& q = p.res.q;
  q.format = f;
  q.rows = rows;
  q.cols = cols;
  q.codes.assign(R * C, 0);
  const int64_t G = p.groups = f.groups_per_row(cols), gs = p.group_len = f.group_len(cols);
  q.params.assign(R * static_cast<size_t>(G), GroupParams{});

  // 1. Dead inputs (H_jj = 0): the column's weights count as 0 and H_jj as 1 from here on (the
  // inputs are not copied: every reader below applies `dead`).
  p.dead.assign(C, 0);
  std::vector<double> diag(C);
  for (int64_t j = 0; j < cols; ++j) {
    diag[j] = h_in[diag_only ? j : j * cols + j];
    if (diag[j] == 0.0) {
      diag[j] = 1.0;
      p.dead[j] = 1;
      ++p.res.dead_inputs;
    }
  }
  const uint8_t* dead = p.dead.data();
  // nvfp4 global scale: from the (dead-zeroed) tensor unless shared.
  if (f.family == Family::NVFP4) {
    if (o.global_scale) {
      p.global = *o.global_scale;
    } else {
      float amax = 0.f;
#pragma omp parallel for schedule(static) reduction(max : amax) if (big)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j)
          if (!dead[j]) amax = std::max(amax, std::fabs(w_in[r * cols + j]));
      p.global = nvfp4_global_scale(amax);
    }
    q.global_scale = p.global;
  }
  // Static groups (and per-channel): parameters from the original weights, original order.
  p.per_channel = f.group_size < 0;
  p.static_params = p.per_channel || (o.act_order && o.static_groups);
  if (p.static_params) {
#pragma omp parallel for schedule(static) if (big)
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> grp(static_cast<size_t>(gs)), scratch;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t l = 0; l < gs; ++l) grp[l] = dead[g * gs + l] ? 0.f : w_in[r * cols + g * gs + l];
        q.params[r * G + g] = gptq_choose_params(f, grp.data(), gs, 1, o, p.global, scratch);
      }
    }
  }
  p.dynamic_act = o.act_order && !o.static_groups && !p.per_channel;
  // 3. Act-order permutation (stable, so ties keep the original order), and the permuted copies
  // in fp64: the blocked and the unblocked algorithm then agree to ~1e-12, so the codes are the
  // same as the reference's (tests), and the CUDA path has a precise target.
  p.perm.resize(C);
  std::iota(p.perm.begin(), p.perm.end(), 0);
  if (o.act_order)
    std::stable_sort(p.perm.begin(), p.perm.end(), [&](int64_t a, int64_t b) { return diag[a] > diag[b]; });
  const auto& perm = p.perm;
  for (int64_t k = 0; k < cols; ++k) p.mean_diag += diag[perm[k]];
  p.mean_diag /= static_cast<double>(cols);
  if (permuted_copies) {
    p.Wp.resize(R * C);
    p.Hp.resize(C * C);
#pragma omp parallel for schedule(static) if (big)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) p.Wp[r * cols + k] = permuted_weight(w_in, dead, perm.data(), cols, r, k);
#pragma omp parallel for schedule(static) if (cols * cols >= 65536)
    for (int64_t k = 0; k < cols; ++k)
      for (int64_t l = 0; l < cols; ++l) p.Hp[k * cols + l] = permuted_hessian(h_in.data(), dead, perm.data(), cols, k, l);
  }
  // g_idx when groups follow the processing order.
  if (p.dynamic_act) {
    q.g_idx.assign(C, 0);
    for (int64_t k = 0; k < cols; ++k) q.g_idx[perm[k]] = static_cast<int32_t>(k / gs);
  }
  return p;
}

double gptq_block(GptqPrepared& p, const std::vector<double>& U, int64_t i1, int64_t i2, double* w, int64_t ldw,
                  int64_t w_col0, std::vector<double>& err, int64_t B, const Format& f, const GptqOptions& o) {
  QuantizedWeight& q = p.res.q;
  const int64_t rows = q.rows, cols = q.cols, G = p.groups, gs = p.group_len;
  double loss = 0;
#pragma omp parallel for schedule(static) reduction(+ : loss) if (rows * (i2 - i1) >= 4096)
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> cur, scr;
    double* wr = w + r * ldw - w_col0;  // wr[k]: column k of this row
    double* er = err.data() + r * B;
    for (int64_t k = i1; k < i2; ++k) {
      const int64_t g = p.group_at(k);
      if (!p.static_params && k % gs == 0) {
        // The group is columns k..k+gs-1 of the processing order (without act-order the original
        // columns g·gs.., with dynamic act-order the permuted ones), at their current values.
        // Columns past this block have not received this block's errors yet (they come with the
        // lazy update): add them here so the parameters see the current weights.
        const int64_t len = std::min(gs, cols - k);
        cur.resize(static_cast<size_t>(len));
        for (int64_t l = 0; l < len; ++l) {
          double v = wr[k + l];
          if (k + l >= i2)
            for (int64_t m = i1; m < k; ++m) v -= er[m - i1] * U[m * cols + k + l];
          cur[static_cast<size_t>(l)] = static_cast<float>(v);
        }
        q.params[r * G + g] = gptq_choose_params(f, cur.data(), len, 1, o, p.global, scr);
      }
      const double xd = wr[k];
      const GroupParams& gp = q.params[r * G + g];
      const uint8_t c = quantize_element(f, static_cast<float>(xd), gp, p.global);
      const double v = dequantize_element(f, c, gp, p.global);
      q.codes[r * cols + p.perm[k]] = c;
      const double e = (xd - v) / U[k * cols + k];
      loss += 0.5 * e * e;
      er[k - i1] = e;
      // Propagate inside the block: w[l] -= err · U[k, l] for k < l < i2.
      if (e != 0.0) {
        const double* urow = U.data() + k * cols;
        for (int64_t l = k + 1; l < i2; ++l) wr[l] -= e * urow[l];
      }
    }
  }
  return loss;
}

}  // namespace detail

GptqResult gptq_quantize(const float* w_in, int64_t rows, int64_t cols, const std::vector<double>& h_in,
                         const Format& f, const GptqOptions& o, const std::string& what) {
  if (o.cuda) return backend::cuda_gptq_quantize(w_in, rows, cols, h_in, f, o, what);
  const auto t0 = std::chrono::steady_clock::now();
  auto prep = detail::gptq_prepare(w_in, rows, cols, h_in, f, o, what);
  GptqResult& res = prep.res;
  std::vector<double>& Hp = prep.Hp;
  const double mean_diag = prep.mean_diag;

  // 2. Damping, once: λ = damp · mean(diag H). 4. U = upper Cholesky factor of H⁻¹. When H + λI
  // is still not positive definite, retry from the undamped H with damp ×10 (at most 3 times),
  // saying so; the result records the damping used.
  const std::vector<double> undamped = Hp;
  double damp = o.damp;
  for (int attempt = 0;; ++attempt) {
    res.damp_value = damp * mean_diag;
    for (int64_t k = 0; k < cols; ++k) Hp[k * cols + k] += res.damp_value;
    if (inverse_cholesky_upper(Hp, cols)) break;
    const double next = damp > 0 ? damp * 10 : 0.01;
    if (attempt == 3 || !(mean_diag > 0))
      fail("{}: the Hessian is not positive definite even with damping λ = {:.3g} (damp {}): use a larger --damp "
           "or more calibration data",
           what, res.damp_value, damp);
    log_warn("{}: the Hessian is not positive definite with damp {}; retrying with damp {} (set --damp to choose)",
             what, damp, next);
    damp = next;
    Hp = undamped;
  }
  res.damp_used = damp;
  const std::vector<double>& U = Hp;

  // 5. Column loop with lazy block updates. Inside a block every row is independent (its updates
  // only read its own values and U), so rows run in parallel; the lazy update is one GEMM.
  const int64_t B = o.block_size;
  std::vector<double> err(static_cast<size_t>(rows * B));  // rows × block: err of each column
  std::vector<double>& Wp = prep.Wp;
  double loss = 0;
  for (int64_t i1 = 0; i1 < cols; i1 += B) {
    const int64_t i2 = std::min(i1 + B, cols), count = i2 - i1;
    loss += detail::gptq_block(prep, U, i1, i2, Wp.data(), cols, 0, err, B, f, o);
    // Lazy update of every later column: Wp[:, i2:] -= Err[:, 0:count] · U[i1:i2, i2:].
    if (i2 < cols)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(cols - i2),
                  static_cast<int>(count), -1.0, err.data(), static_cast<int>(B), U.data() + i1 * cols + i2,
                  static_cast<int>(cols), 1.0, Wp.data() + i2, static_cast<int>(cols));
  }
  res.proxy_loss = loss;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::move(res);
}

double hessian_error(const float* w, const float* w_hat, int64_t rows, int64_t cols, const std::vector<double>& h) {
  // Σ_r d_r H d_rᵀ with d = W − Ŵ, a block of rows at a time through one GEMM.
  const int64_t block = 256;
  std::vector<double> d(static_cast<size_t>(block * cols)), dh(static_cast<size_t>(block * cols));
  double total = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t n = std::min(block, rows - r0);
    for (int64_t i = 0; i < n * cols; ++i)
      d[i] = static_cast<double>(w[r0 * cols + i]) - static_cast<double>(w_hat[r0 * cols + i]);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(cols),
                static_cast<int>(cols), 1.0, d.data(), static_cast<int>(cols), h.data(), static_cast<int>(cols), 0.0,
                dh.data(), static_cast<int>(cols));
    for (int64_t i = 0; i < n * cols; ++i) total += d[i] * dh[i];
  }
  return total;
}

}  // namespace calq::quant
