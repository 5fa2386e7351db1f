#include "calq/quant/hessian.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "calq/core/error.h"
#include "calq/engine/gemm.h"

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
  // tmp = bufᵀ buf on and above the diagonal (row-major), fp32 over at most block_ rows: one GEMM
  // per strip of kStrip features, from the diagonal to the last column (A = the rows' transpose,
  // B = the rows themselves), the strips spread over the threads, each GEMM on one thread.
  const int64_t n = n_, k = pending_;
  bt_.resize(static_cast<size_t>(n * k));
  constexpr int64_t kTile = 32;  // transposed in tiles that stay in cache
#pragma omp parallel for schedule(static) if (n * k >= (int64_t{1} << 18))
  for (int64_t j0 = 0; j0 < n; j0 += kTile)
    for (int64_t r0 = 0; r0 < k; r0 += kTile)
      for (int64_t j = j0; j < std::min(n, j0 + kTile); ++j)
        for (int64_t r = r0; r < std::min(k, r0 + kTile); ++r)
          bt_[static_cast<size_t>(j * k + r)] = buf_[static_cast<size_t>(r * n + j)];
  constexpr int64_t kStrip = 96;  // a multiple of both kernels' tile rows (12 and 6)
  const int64_t strips = (n + kStrip - 1) / kStrip;
#pragma omp parallel for schedule(dynamic, 1) if (strips > 1 && n * n * k >= (int64_t{1} << 22))
  for (int64_t t = 0; t < strips; ++t) {
    const int64_t i0 = t * kStrip;
    engine::GemmArgs g;
    g.M = std::min(kStrip, n - i0);
    g.N = n - i0;
    g.K = k;
    g.A = bt_.data() + i0 * k;
    g.lda = k;
    g.B = buf_.data() + i0;
    g.b_layout = engine::GemmB::Normal;
    g.ldb = n;
    g.C = tmp_.data() + i0 * n + i0;
    g.ldc = n;
    engine::gemm(g);
  }
#pragma omp parallel for schedule(static) if (n * n >= (int64_t{1} << 20))
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) sum_[static_cast<size_t>(i * n + j)] += static_cast<double>(tmp_[static_cast<size_t>(i * n + j)]);
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
