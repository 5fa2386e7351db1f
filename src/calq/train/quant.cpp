#include "calq/train/quant.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "calq/core/error.h"

namespace calq::train {

namespace {
constexpr float kLogFloor = 1e-30f;
}

QuantKind parse_quant_kind(const std::string& s) {
  if (s == "minmax") return QuantKind::MinMax;
  if (s == "log") return QuantKind::Log;
  fail("--quantizer '{}' is not known; use minmax or log", s);
}
std::string quant_kind_name(QuantKind k) { return k == QuantKind::MinMax ? "minmax" : "log"; }

void check_bits(int bits, const std::string& option) {
  CALQ_CHECK(bits >= kMinBits && bits <= kMaxBits, "{}: bit-width {} is outside {}..{}", option, bits, kMinBits,
             kMaxBits);
}

void FakeQuantizer::reset_stats() {
  observed_ = false;
  lo_.clear();
  hi_.clear();
}

void FakeQuantizer::observe(const float* x, int64_t rows, int64_t cols) {
  const int64_t ch = gran_ == Granularity::Tensor ? 1 : gran_ == Granularity::Row ? rows : cols;
  if (!observed_) {
    lo_.assign(static_cast<size_t>(ch), std::numeric_limits<float>::infinity());
    hi_.assign(static_cast<size_t>(ch), -std::numeric_limits<float>::infinity());
    observed_ = true;
  }
  CALQ_CHECK(static_cast<int64_t>(lo_.size()) == ch, "quantizer: observed a tensor with {} channels, expected {}", ch,
             lo_.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t k = static_cast<size_t>(gran_ == Granularity::Tensor ? 0 : gran_ == Granularity::Row ? r : c);
      float v = x[r * cols + c];
      if (kind_ == QuantKind::Log) {
        const float a = std::fabs(v);
        if (!(a >= kLogFloor) || !std::isfinite(a)) continue;
        v = std::log2(a);
      } else if (!std::isfinite(v)) {
        continue;
      }
      lo_[k] = std::min(lo_[k], v);
      hi_[k] = std::max(hi_[k], v);
    }
}

void FakeQuantizer::finish(int key, int levels) {
  const int bits = levels > 0 ? levels : key;
  check_bits(bits, "quantizer");
  CALQ_CHECK(observed_, "quantizer: finish({}) without any observed tensor", bits);
  QuantParams p;
  const size_t ch = lo_.size();
  p.a.resize(ch);
  if (kind_ == QuantKind::Log) p.b.resize(ch);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  for (size_t k = 0; k < ch; ++k) {
    const bool empty = lo_[k] > hi_[k];  // nothing seen (all zeros for log)
    if (kind_ == QuantKind::MinMax) {
      const float am = empty ? 0.0f : std::max(std::fabs(lo_[k]), std::fabs(hi_[k]));
      p.a[k] = am / qmax;  // 0: the channel is all zeros and stays zero
    } else {
      p.a[k] = empty ? std::numeric_limits<float>::quiet_NaN() : lo_[k];  // NaN zp: all-zero channel
      p.b[k] = empty ? 0.0f : hi_[k] - lo_[k];
    }
  }
  params_[key] = std::move(p);
}

const QuantParams& FakeQuantizer::params(int bits) const {
  auto it = params_.find(bits);
  CALQ_CHECK(it != params_.end(), "quantizer: {}-bit parameters were never calibrated", bits);
  return it->second;
}

float fq_minmax(float x, float scale, int bits) {
  if (!(scale > 0)) return 0.0f;
  const float q = static_cast<float>((1 << (bits - 1)) - 1);
  return std::clamp(std::nearbyint(x / scale), -q, q) * scale;
}

float fq_log(float x, float zp, float range, int bits) {
  if (std::isnan(zp)) return 0.0f;
  const float a = std::fabs(x);
  if (!(a > 0)) return 0.0f;
  const int L = (1 << (bits - 1)) - 1;
  const float l = std::log2(a);
  float level;
  if (L == 1 || range <= 0) {
    const float top = zp + range;
    if (l < top - 1.0f) return 0.0f;
    level = top;
  } else {
    const float step = range / static_cast<float>(L - 1);
    if (l < zp - 0.5f * step) return 0.0f;
    const float k = std::clamp(std::nearbyint((l - zp) / step), 0.0f, static_cast<float>(L - 1));
    level = zp + k * step;
  }
  const float m = std::exp2(level);
  return x < 0 ? -m : m;
}

void FakeQuantizer::apply(int key, const float* x, float* y, int64_t rows, int64_t cols, const std::string& what,
                          int levels) const {
  auto it = params_.find(key);
  CALQ_CHECK(it != params_.end(), "{}: {}-bit quantizer used before calibration (internal: calibrate every precision "
                                  "before use)", what, key);
  const int bits = levels > 0 ? levels : key;
  const QuantParams& p = it->second;
  const int64_t ch = static_cast<int64_t>(p.a.size());
  const int64_t want = gran_ == Granularity::Tensor ? 1 : gran_ == Granularity::Row ? rows : cols;
  CALQ_CHECK(ch == want, "{}: quantizer has {} channels, tensor needs {}", what, ch, want);
  const int64_t n = rows * cols;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t k = static_cast<size_t>(gran_ == Granularity::Tensor ? 0 : gran_ == Granularity::Row ? r : c);
      const float v = x[r * cols + c];
      y[r * cols + c] = kind_ == QuantKind::MinMax ? fq_minmax(v, p.a[k], bits) : fq_log(v, p.a[k], p.b[k], bits);
    }
}

void quantize_rows_dynamic(float* x, int64_t rows, int64_t cols, int bits) {
  const float q = static_cast<float>((1 << (bits - 1)) - 1);
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * cols;
    float am = 0;
    for (int64_t c = 0; c < cols; ++c) am = std::max(am, std::fabs(xr[c]));
    const float s = am / q;
    for (int64_t c = 0; c < cols; ++c) xr[c] = fq_minmax(xr[c], s, bits);
  }
}

}  // namespace calq::train
