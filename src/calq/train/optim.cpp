#include "calq/train/optim.h"

#include <cmath>

#include "calq/core/error.h"

namespace calq::train {

AdamW::AdamW(std::vector<Param*> params, AdamWOptions o) : p_(std::move(params)), o_(o) {
  CALQ_CHECK(o.lr > 0, "--lr must be positive, got {}", o.lr);
  for (Param* p : p_) {
    m_.emplace_back(p->value.size(), 0.0f);
    v_.emplace_back(p->value.size(), 0.0f);
  }
}

void AdamW::step(double lr) {
  ++t_;
  const double bc1 = 1.0 - std::pow(o_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(o_.beta2, static_cast<double>(t_));
  for (size_t k = 0; k < p_.size(); ++k) {
    Param& p = *p_[k];
    std::vector<float>& m = m_[k];
    std::vector<float>& v = v_[k];
    const double decay = p.decay ? lr * o_.weight_decay : 0.0;
    const int64_t n = p.numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
    for (int64_t i = 0; i < n; ++i) {
      const double g = p.grad[i];
      const double mi = o_.beta1 * m[i] + (1 - o_.beta1) * g;
      const double vi = o_.beta2 * v[i] + (1 - o_.beta2) * g * g;
      m[i] = static_cast<float>(mi);
      v[i] = static_cast<float>(vi);
      double w = p.value[i];
      w -= decay * w;
      w -= lr * (mi / bc1) / (std::sqrt(vi / bc2) + o_.eps);
      p.value[i] = static_cast<float>(w);
    }
  }
}

double cosine_lr(int64_t step, int64_t total, int64_t warmup, double lr, double min_lr) {
  if (warmup > 0 && step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t span = total - warmup;
  if (span <= 1) return lr;
  const double progress = static_cast<double>(step - warmup) / static_cast<double>(span - 1);
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

double clip_grad_norm(const std::vector<Param*>& params, double max_norm) {
  double ss = 0;
  for (const Param* p : params)
    for (float g : p->grad) ss += static_cast<double>(g) * g;
  const double norm = std::sqrt(ss);
  if (max_norm > 0 && norm > max_norm) {
    const float s = static_cast<float>(max_norm / (norm + 1e-6));
    for (Param* p : params)
      for (float& g : p->grad) g *= s;
  }
  return norm;
}

}  // namespace calq::train
