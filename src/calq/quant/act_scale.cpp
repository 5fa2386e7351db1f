#include "calq/quant/act_scale.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "calq/core/error.h"

namespace calq::quant {

namespace {

// Σ ‖X Wᵀ − X Ŵᵀ‖² = ‖X (W − Ŵ)ᵀ‖², through one GEMM per module.
double output_error(const float* x, int64_t tokens, int64_t cols, const float* w, const std::vector<float>& w_hat,
                    int64_t rows) {
  std::vector<float> d(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < d.size(); ++i) d[i] = w[i] - w_hat[i];
  std::vector<float> y(static_cast<size_t>(tokens * rows));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens), static_cast<int>(rows),
              static_cast<int>(cols), 1.f, x, static_cast<int>(cols), d.data(), static_cast<int>(cols), 0.f, y.data(),
              static_cast<int>(rows));
  double s = 0;
  for (float v : y) s += static_cast<double>(v) * v;
  return s;
}

}  // namespace

ActScaleResult act_scale_search(const std::vector<ActScaleModule>& mods, int64_t cols, const float* x, int64_t tokens,
                                const std::vector<double>& mean_abs, const Format& f, const ActScaleOptions& o,
                                const std::string& what) {
  CALQ_CHECK(!mods.empty(), "{}: no module to scale", what);
  CALQ_CHECK(static_cast<int64_t>(mean_abs.size()) == cols, "{}: {} channel statistics for {} inputs", what,
             mean_abs.size(), cols);
  CALQ_CHECK(tokens > 0, "{}: activation-aware scaling needs calibration inputs", what);
  CALQ_CHECK(o.grid >= 1 && o.grid <= 1000, "--act-grid must be in 1..1000, got {}", o.grid);
  // Channels never active get the geometric mean of the others, so their weights are not blown up.
  double floor_v = 0;
  for (double v : mean_abs) floor_v = std::max(floor_v, v);
  floor_v *= 1e-6;
  ActScaleResult best;
  best.error = INFINITY;
  std::vector<float> s(static_cast<size_t>(cols)), ws;
  for (int gi = 0; gi < o.grid; ++gi) {
    const double alpha = static_cast<double>(gi) / o.grid;
    double lmin = INFINITY, lmax = -INFINITY;
    std::vector<double> ls(static_cast<size_t>(cols));
    for (int64_t j = 0; j < cols; ++j) {
      ls[j] = alpha * std::log(std::max(mean_abs[j], floor_v) + 1e-30);
      lmin = std::min(lmin, ls[j]);
      lmax = std::max(lmax, ls[j]);
    }
    const double mid = 0.5 * (lmin + lmax);
    for (int64_t j = 0; j < cols; ++j) s[j] = static_cast<float>(std::exp(ls[j] - mid));
    double err = 0;
    std::vector<QuantizedWeight> qs;
    for (auto& m : mods) {
      ws.assign(m.w, m.w + m.rows * cols);
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t j = 0; j < cols; ++j) ws[r * cols + j] *= s[j];
      QuantizedWeight q = rtn_quantize(ws.data(), m.rows, cols, f, o.rtn, what);
      std::vector<float> back = q.dequantize();
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t j = 0; j < cols; ++j) back[r * cols + j] /= s[j];
      err += output_error(x, tokens, cols, m.w, back, m.rows);
      qs.push_back(std::move(q));
    }
    if (gi == 0) best.error_plain = err;
    if (err < best.error) {  // strict: ties keep the smaller α (plain RTN first)
      best.error = err;
      best.alpha = alpha;
      best.scales = s;
      best.q = std::move(qs);
    }
  }
  return best;
}

}  // namespace calq::quant
