#include "calq/quant/hessian.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "calq/core/error.h"

namespace calq::quant {

HessianAccumulator::HessianAccumulator(int64_t features, int64_t block)
    : n_(features), block_(block), sum_(static_cast<size_t>(features * features), 0.0) {
  CALQ_CHECK(features > 0 && block > 0, "Hessian of {} features, block {}", features, block);
  buf_.resize(static_cast<size_t>(block_ * n_));
  tmp_.resize(static_cast<size_t>(n_ * n_));
}

void HessianAccumulator::add(const float* x, int64_t rows, const uint8_t* mask) {
  for (int64_t r = 0; r < rows; ++r) {
    if (mask && !mask[r]) continue;
    std::memcpy(buf_.data() + pending_ * n_, x + r * n_, static_cast<size_t>(n_) * sizeof(float));
    ++tokens_;
    weight_ += 1;
    if (++pending_ == block_) flush();
  }
}

void HessianAccumulator::add_weighted(const float* x, int64_t rows, const uint8_t* mask, const float* weight) {
  for (int64_t r = 0; r < rows; ++r) {
    if (mask && !mask[r]) continue;
    const float w = weight[r];
    CALQ_CHECK(std::isfinite(w) && w >= 0, "Hessian: token weight {} is not a finite non-negative number", w);
    float* dst = buf_.data() + pending_ * n_;
    for (int64_t j = 0; j < n_; ++j) dst[j] = x[r * n_ + j] * w;
    ++tokens_;
    weight_ += static_cast<double>(w) * w;
    if (++pending_ == block_) flush();
  }
}

void HessianAccumulator::flush() {
  if (pending_ == 0) return;
  // tmp = bufᵀ buf (upper triangle, row-major), fp32 over at most block_ rows.
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(n_), static_cast<int>(pending_), 1.0f,
              buf_.data(), static_cast<int>(n_), 0.0f, tmp_.data(), static_cast<int>(n_));
  for (int64_t i = 0; i < n_; ++i)
    for (int64_t j = i; j < n_; ++j) sum_[i * n_ + j] += static_cast<double>(tmp_[i * n_ + j]);
  pending_ = 0;
}

void HessianAccumulator::merge(const HessianAccumulator& o) {
  CALQ_CHECK(o.n_ == n_, "merging Hessians of {} and {} features", n_, o.n_);
  flush();
  const_cast<HessianAccumulator&>(o).flush();
  for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += o.sum_[i];
  tokens_ += o.tokens_;
  weight_ += o.weight_;
}

std::vector<double> HessianAccumulator::hessian() const {
  const_cast<HessianAccumulator*>(this)->flush();
  std::vector<double> h(sum_.size(), 0.0);
  if (tokens_ == 0 || !(weight_ > 0)) return h;
  const double inv = 1.0 / weight_;
  for (int64_t i = 0; i < n_; ++i)
    for (int64_t j = i; j < n_; ++j) h[i * n_ + j] = h[j * n_ + i] = sum_[i * n_ + j] * inv;
  return h;
}

}  // namespace calq::quant
