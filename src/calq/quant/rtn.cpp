#include "calq/quant/rtn.h"

#include <cmath>

#include "calq/core/error.h"

namespace calq::quant {

namespace {

// Quantizes one group with the given parameters, returning sum |x - q(x)|^p (p = 0: skip).
double quantize_group(const Format& f, const float* x, int64_t n, const GroupParams& gp, float global,
                      uint8_t* codes, double p) {
  double err = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint8_t c = quantize_element(f, x[i], gp, global);
    if (codes) codes[i] = c;
    if (p > 0) {
      double e = std::fabs(static_cast<double>(x[i]) - dequantize_element(f, c, gp, global));
      err += p == 2.0 ? e * e : std::pow(e, p);
    }
  }
  return err;
}

}  // namespace

QuantizedWeight rtn_quantize(const float* w, int64_t rows, int64_t cols, const Format& f, const RtnOptions& opt,
                             const std::string& what) {
  f.check_shape(rows, cols, what);
  CALQ_CHECK(!opt.clip_search || (opt.clip_grid >= 2 && opt.clip_min > 0 && opt.clip_min <= 1 && opt.clip_norm > 0),
             "clip search needs clip_grid >= 2, 0 < clip_min <= 1, clip_norm > 0");
  const int64_t n = rows * cols;
  // NaN/Inf weights cannot be quantized meaningfully: name the first one.
  int64_t bad = -1;
#pragma omp parallel for schedule(static) reduction(max : bad) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(w[i])) bad = std::max(bad, n - i);  // max of n-i finds the first index
  if (bad >= 0) {
    int64_t i = n - bad;
    fail("{}: weight [{}, {}] is {} — cannot quantize a tensor holding NaN or Inf", what, i / cols, i % cols,
         std::isnan(w[i]) ? "NaN" : "Inf");
  }
  QuantizedWeight q;
  q.format = f;
  q.rows = rows;
  q.cols = cols;
  q.codes.resize(static_cast<size_t>(n));
  const int64_t G = f.groups_per_row(cols), len = f.group_len(cols);
  q.params.resize(static_cast<size_t>(rows * G));
  if (f.family == Family::NVFP4) {
    if (opt.global_scale) {
      q.global_scale = *opt.global_scale;
    } else {
      float amax = 0;
      for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(w[i]));
      q.global_scale = nvfp4_global_scale(amax);
    }
  }
  const float global = q.global_scale;
#pragma omp parallel for schedule(dynamic, 16) if (n > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* x = w + r * cols + g * len;
      uint8_t* codes = q.codes.data() + r * cols + g * len;
      GroupParams best = group_params(f, x, len, 1.f, global);
      if (opt.clip_search) {
        double best_err = quantize_group(f, x, len, best, global, nullptr, opt.clip_norm);
        for (int i = 1; i < opt.clip_grid; ++i) {
          float s = 1.f - static_cast<float>(i) * (1.f - opt.clip_min) / static_cast<float>(opt.clip_grid - 1);
          GroupParams cand = group_params(f, x, len, s, global);
          double e = quantize_group(f, x, len, cand, global, nullptr, opt.clip_norm);
          if (e < best_err) {  // strict: ties keep the larger range
            best_err = e;
            best = cand;
          }
        }
      }
      quantize_group(f, x, len, best, global, codes, 0);
      q.params[r * G + g] = best;
    }
  }
  return q;
}

WeightError weight_error(const float* w, const float* w_hat, int64_t n) {
  double se = 0, sw = 0, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    double d = static_cast<double>(w[i]) - w_hat[i];
    se += d * d;
    sw += static_cast<double>(w[i]) * w[i];
    mx = std::max(mx, std::fabs(d));
  }
  WeightError e;
  e.rmse = n ? std::sqrt(se / static_cast<double>(n)) : 0;
  e.rel_fro = sw > 0 ? std::sqrt(se / sw) : (se > 0 ? INFINITY : 0);
  e.max_abs = mx;
  return e;
}

}  // namespace calq::quant
