#include "calq/quant/act_scale.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <functional>

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

using ErrorFn = std::function<double(const float* w, const std::vector<float>& w_hat, int64_t rows)>;

ActScaleResult search(const std::vector<ActScaleModule>& mods, int64_t cols, const std::vector<double>& mean_abs,
                      const std::vector<double>& diag, const Format& f, const ActScaleOptions& o,
                      const std::string& what, const ErrorFn& error) {
  CALQ_CHECK(!mods.empty(), "{}: no module to scale", what);
  CALQ_CHECK(static_cast<int64_t>(mean_abs.size()) == cols, "{}: {} channel statistics for {} inputs", what,
             mean_abs.size(), cols);
  CALQ_CHECK(o.grid >= 1 && o.grid <= 1000, "--act-grid must be in 1..1000, got {}", o.grid);
  // α is searched with plain absmax RTN (as AWQ searches its scales before clipping); the clip
  // search, when on, runs once for the chosen α and is kept only if it lowers the output error.
  auto evaluate = [&](const std::vector<float>& s, const RtnOptions& rtn, std::vector<QuantizedWeight>& qs) {
    double err = 0;
    for (auto& m : mods) {
      QuantizedWeight q = scaled_rtn(m, cols, s, f, rtn, what, &diag);
      std::vector<float> back = q.dequantize();
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t j = 0; j < cols; ++j) back[r * cols + j] /= s[j];
      err += error(m.w, back, m.rows);
      qs.push_back(std::move(q));
    }
    return err;
  };
  RtnOptions absmax = o.rtn;
  absmax.clip_search = false;
  ActScaleResult best;
  best.error = INFINITY;
  for (int gi = 0; gi < o.grid; ++gi) {
    const double alpha = static_cast<double>(gi) / o.grid;
    std::vector<float> s = act_scales(mean_abs, alpha);
    std::vector<QuantizedWeight> qs;
    const double err = evaluate(s, group_rtn_options(mods, cols, s, f, absmax), qs);
    if (gi == 0) best.error_plain = err;
    if (err < best.error) {  // strict: ties keep the smaller α (plain RTN first)
      best.error = err;
      best.alpha = alpha;
      best.scales = s;
      best.q = std::move(qs);
    }
  }
  if (o.rtn.clip_search) {
    std::vector<QuantizedWeight> qs;
    const double err = evaluate(best.scales, group_rtn_options(mods, cols, best.scales, f, o.rtn), qs);
    if (err < best.error) {
      best.error = err;
      best.q = std::move(qs);
      best.clipped = true;
    }
  }
  return best;
}

}  // namespace

std::vector<double> moment_diagonal(const InputMoment& h, int64_t cols) {
  std::vector<double> d(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) d[j] = h.diagonal ? h.h.at(j) : h.h.at(j * cols + j);
  return d;
}

std::vector<float> act_scales(const std::vector<double>& mean_abs, double alpha) {
  const size_t cols = mean_abs.size();
  // Channels never active get a floor, so that their weights are not blown up.
  double floor_v = 0;
  for (double v : mean_abs) floor_v = std::max(floor_v, v);
  floor_v *= 1e-6;
  std::vector<double> ls(cols);
  double lmin = INFINITY, lmax = -INFINITY;
  for (size_t j = 0; j < cols; ++j) {
    ls[j] = alpha * std::log(std::max(mean_abs[j], floor_v) + 1e-30);
    lmin = std::min(lmin, ls[j]);
    lmax = std::max(lmax, ls[j]);
  }
  const double mid = 0.5 * (lmin + lmax);
  std::vector<float> s(cols);
  for (size_t j = 0; j < cols; ++j) s[j] = static_cast<float>(std::exp(ls[j] - mid));
  return s;
}

RtnOptions group_rtn_options(const std::vector<ActScaleModule>& mods, int64_t cols, const std::vector<float>& s,
                             const Format& f, const RtnOptions& rtn) {
  RtnOptions o = rtn;
  if (f.family != Family::NVFP4 || mods.size() < 2 || o.global_scale) return o;
  float amax = 0;
  for (auto& m : mods)
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t j = 0; j < cols; ++j) amax = std::max(amax, std::fabs(m.w[r * cols + j] * s[j]));
  o.global_scale = nvfp4_global_scale(amax);
  return o;
}

QuantizedWeight scaled_rtn(const ActScaleModule& m, int64_t cols, const std::vector<float>& s, const Format& f,
                           const RtnOptions& rtn, const std::string& what, const std::vector<double>* diag) {
  CALQ_CHECK(static_cast<int64_t>(s.size()) == cols, "{}: {} scales for {} inputs", what, s.size(), cols);
  std::vector<float> ws(m.w, m.w + m.rows * cols);
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t j = 0; j < cols; ++j) ws[r * cols + j] *= s[j];
  RtnOptions o = rtn;
  std::vector<float> cw;
  if (diag && o.clip_search) {
    // The scaled weight reads x/s: its channels' mean squares are diag(H)/s².
    CALQ_CHECK(static_cast<int64_t>(diag->size()) == cols, "{}: {} channel moments for {} inputs", what,
               diag->size(), cols);
    cw.resize(static_cast<size_t>(cols));
    for (int64_t j = 0; j < cols; ++j) cw[j] = static_cast<float>((*diag)[j] / (static_cast<double>(s[j]) * s[j]));
    o.col_weight = cw.data();
  }
  return rtn_quantize(ws.data(), m.rows, cols, f, o, what);
}

double moment_error(const float* w, const std::vector<float>& w_hat, int64_t rows, int64_t cols, const InputMoment& h) {
  std::vector<float> d(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < d.size(); ++i) d[i] = w[i] - w_hat[i];
  double s = 0;
  if (h.diagonal) {
    CALQ_CHECK(static_cast<int64_t>(h.h.size()) == cols, "input moment: {} values for {} inputs", h.h.size(), cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) s += static_cast<double>(h.h[j]) * d[r * cols + j] * d[r * cols + j];
    return s;
  }
  CALQ_CHECK(static_cast<int64_t>(h.h.size()) == cols * cols, "input moment: {} values for {}×{}", h.h.size(), cols,
             cols);
  // tr(D H Dᵀ) = Σ_r d_r · (H d_r): one GEMM D·H, then a row-wise dot product.
  std::vector<float> dh(d.size());
  cblas_ssymm(CblasRowMajor, CblasRight, CblasUpper, static_cast<int>(rows), static_cast<int>(cols), 1.f, h.h.data(),
              static_cast<int>(cols), d.data(), static_cast<int>(cols), 0.f, dh.data(), static_cast<int>(cols));
  for (size_t i = 0; i < d.size(); ++i) s += static_cast<double>(d[i]) * dh[i];
  return s;
}

ActScaleResult act_scale_search(const std::vector<ActScaleModule>& mods, int64_t cols, const float* x, int64_t tokens,
                                const std::vector<double>& mean_abs, const Format& f, const ActScaleOptions& o,
                                const std::string& what) {
  CALQ_CHECK(tokens > 0, "{}: activation-aware scaling needs calibration inputs", what);
  std::vector<double> diag(static_cast<size_t>(cols), 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < cols; ++j) diag[j] += static_cast<double>(x[t * cols + j]) * x[t * cols + j];
  return search(mods, cols, mean_abs, diag, f, o, what, [&](const float* w, const std::vector<float>& w_hat, int64_t rows) {
    return output_error(x, tokens, cols, w, w_hat, rows);
  });
}

ActScaleResult act_scale_search(const std::vector<ActScaleModule>& mods, int64_t cols, const InputMoment& h,
                                const std::vector<double>& mean_abs, const Format& f, const ActScaleOptions& o,
                                const std::string& what) {
  return search(mods, cols, mean_abs, moment_diagonal(h, cols), f, o, what, [&](const float* w, const std::vector<float>& w_hat, int64_t rows) {
    return moment_error(w, w_hat, rows, cols, h);
  });
}

}  // namespace calq::quant
