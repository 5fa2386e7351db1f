// Round-to-nearest quantization with the optional clip search of docs/format.md §2.
#include "calq/quant/rtn.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "calq/core/error.h"

// The clip-search errors must match the spec's arithmetic: the library is compiled with
// -ffp-contract=off (CMakeLists.txt), so no a*b+c is fused into an FMA.

namespace calq::quant {

namespace {

// 4-lane vectors (GCC vector extensions; SSE2 at the x86-64 baseline): -O2 builds do not
// auto-vectorise these reductions, and they read every weight.
using vf = float __attribute__((vector_size(16)));
using vi = int32_t __attribute__((vector_size(16)));

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Largest |w| of a row as fp32 bits with the sign cleared. For non-negative floats the bit
// patterns order like the values (and fit a signed int32), and Inf/NaN patterns
// (>= 0x7F800000) exceed every finite one, so one integer max both finds the absmax and detects
// non-finite weights.
uint32_t row_max_abs_bits(const float* x, int64_t n) {
  vi m = vi{};
  const vi absmask = vi{} + 0x7FFFFFFF;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const vi b = reinterpret_cast<vi>(loadv(x + i)) & absmask;
    m = b > m ? b : m;
  }
  int32_t r = 0;
  for (int k = 0; k < 4; ++k) r = std::max(r, m[k]);
  for (; i < n; ++i)
    r = std::max(r, static_cast<int32_t>(std::bit_cast<uint32_t>(x[i]) & 0x7FFFFFFFu));
  return static_cast<uint32_t>(r);
}

// min(0, min x) and max(0, max x) of a group (all the scale rules need).
void group_range(const float* x, int64_t n, float& mn, float& mx) {
  vf vmn = vf{}, vmx = vf{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const vf v = loadv(x + i);
    vmn = v < vmn ? v : vmn;
    vmx = v > vmx ? v : vmx;
  }
  mn = 0.f;
  mx = 0.f;
  for (int k = 0; k < 4; ++k) {
    mn = vmn[k] < mn ? vmn[k] : mn;
    mx = vmx[k] > mx ? vmx[k] : mx;
  }
  for (; i < n; ++i) {
    mn = x[i] < mn ? x[i] : mn;
    mx = x[i] > mx ? x[i] : mx;
  }
}

constexpr uint32_t kNonFiniteBits = 0x7F800000u;

// Σ_i c_i |x_i − deq(q(x_i))|^norm over a group, in double.
double weighted_group_error(const Format& f, const float* x, const float* c, int64_t n, const GroupParams& p,
                            float global, float norm, uint8_t* codes) {
  quantize_group(f, x, n, p, global, codes);
  double e = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(x[i]) - dequantize_element(f, codes[i], p, global));
    e += static_cast<double>(c[i]) * (norm == 2.f ? d * d : std::pow(d, norm));
  }
  return e;
}

}  // namespace

QuantizedWeight rtn_quantize(const float* w, int64_t rows, int64_t cols, const Format& f,
                             const RtnOptions& opt, const std::string& what) {
  f.check_shape(rows, cols, what);
  if (opt.clip_search) {
    CALQ_CHECK(opt.clip_grid >= 1 && opt.clip_grid <= 10000,
               "--clip-grid must be between 1 and 10000, got {}", opt.clip_grid);
    CALQ_CHECK(opt.clip_min > 0 && opt.clip_min <= 1, "--clip-min must be in (0, 1], got {}",
               opt.clip_min);
    CALQ_CHECK(opt.clip_norm > 0 && std::isfinite(opt.clip_norm),
               "--clip-norm must be a positive number, got {}", opt.clip_norm);
  }
  const int64_t n = rows * cols;
  const bool parallel = n >= (int64_t{1} << 16);

  // One pass: absmax (nvfp4's global scale) and the NaN/Inf check.
  std::vector<uint32_t> row_max(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; ++r) row_max[r] = row_max_abs_bits(w + r * cols, cols);
  const uint32_t max_bits = *std::max_element(row_max.begin(), row_max.end());
  if (max_bits >= kNonFiniteBits) {
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(w[i]))
        fail("{}: weight [{}, {}] is {}; cannot quantize a tensor holding NaN or Inf", what,
             i / cols, i % cols,
             std::isnan(w[i]) ? "NaN"
             : w[i] > 0       ? "+Inf"
                              : "-Inf");
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
      CALQ_CHECK(std::isfinite(*opt.global_scale) && *opt.global_scale > 0,
                 "{}: nvfp4 global scale {} must be positive and finite", what, *opt.global_scale);
      q.global_scale = *opt.global_scale;
    } else {
      q.global_scale = nvfp4_global_scale(std::bit_cast<float>(max_bits));
    }
  }
  const float global = q.global_scale;

  // Shrink factors f_i = fp32(1 - i (1 - f_min) / (N - 1)), evaluated in double (docs/format.md).
  std::vector<float> shrink{1.f};
  if (opt.clip_search)
    for (int i = 1; i < opt.clip_grid; ++i)
      shrink.push_back(static_cast<float>(1.0 - i * (1.0 - static_cast<double>(opt.clip_min)) /
                                                    (opt.clip_grid - 1)));

  int64_t saturated = 0;
#pragma omp parallel for schedule(static) reduction(+ : saturated) if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<uint8_t> scratch(opt.col_weight ? static_cast<size_t>(len) : 0);
    for (int64_t g = 0; g < G; ++g) {
      const float* x = w + r * cols + g * len;
      const float* cw = opt.col_weight ? opt.col_weight + g * len : nullptr;
      auto err = [&](const GroupParams& p) {
        return cw ? weighted_group_error(f, x, cw, len, p, global, opt.clip_norm, scratch.data())
                  : group_error(f, x, len, p, global, opt.clip_norm);
      };
      float mn, mx;
      group_range(x, len, mn, mx);
      bool sat = false;
      GroupParams best = group_params_from_range(f, mn, mx, 1.f, global, &sat);
      if (shrink.size() > 1) {
        double best_err = err(best);
        GroupParams prev = best;
        for (size_t i = 1; i < shrink.size(); ++i) {
          bool cand_sat = false;
          GroupParams cand = group_params_from_range(f, mn, mx, shrink[i], global, &cand_sat);
          // Equal stored parameters give an equal error and cannot win the strict comparison;
          // for mxfp4 this leaves only the grid's distinct exponents.
          if (cand.scale == prev.scale && cand.zero == prev.zero) continue;
          prev = cand;
          double e = err(cand);
          if (e < best_err) {  // strict: ties keep the earlier, larger range
            best_err = e;
            best = cand;
            sat = cand_sat;
          }
        }
      }
      quantize_group(f, x, len, best, global, q.codes.data() + r * cols + g * len);
      q.params[r * G + g] = best;
      saturated += sat;
    }
  }
  q.saturated_scales = saturated;
  return q;
}

WeightError weight_error(const float* w, const float* w_hat, int64_t n) {
  double se = 0, sw = 0, mx = 0;
#pragma omp parallel for schedule(static) reduction(+ : se, sw) reduction(max : mx) \
    if (n >= (int64_t{1} << 18))
  for (int64_t i = 0; i < n; ++i) {
    double d = static_cast<double>(w[i]) - w_hat[i];
    se += d * d;
    sw += static_cast<double>(w[i]) * w[i];
    mx = std::max(mx, std::fabs(d));
  }
  WeightError e;
  e.rmse = n > 0 ? std::sqrt(se / static_cast<double>(n)) : 0;
  e.rel_fro = sw > 0 ? std::sqrt(se / sw) : (se > 0 ? INFINITY : 0);
  e.max_abs = mx;
  return e;
}

}  // namespace calq::quant
