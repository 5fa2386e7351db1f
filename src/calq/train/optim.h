// AdamW (decoupled weight decay, bias-corrected moments, as torch.optim.AdamW), a cosine learning
// rate with linear warm-up, and global gradient-norm clipping.
#pragma once

#include <cstdint>
#include <vector>

#include "calq/train/model.h"

namespace calq::train {

struct AdamWOptions {
  double lr = 2e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};

class AdamW {
 public:
  AdamW(std::vector<Param*> params, AdamWOptions o);
  // One update at learning rate lr with every param's current grad; weight decay only on params
  // whose `decay` is set.
  void step(double lr);
  int64_t steps() const { return t_; }
  // Moments, for checkpoints: m then v of every param in order.
  std::vector<std::vector<float>>& m() { return m_; }
  std::vector<std::vector<float>>& v() { return v_; }
  void set_steps(int64_t t) { t_ = t; }

 private:
  std::vector<Param*> p_;
  AdamWOptions o_;
  std::vector<std::vector<float>> m_, v_;
  int64_t t_ = 0;
};

// lr at optimizer step `step` (0-based) of `total`: linear warm-up from lr/warmup to lr over
// `warmup` steps, then cosine decay to min_lr at the last step.
double cosine_lr(int64_t step, int64_t total, int64_t warmup, double lr, double min_lr);

// Scales all gradients so that their global L2 norm is at most max_norm (max_norm <= 0: no
// clipping). Returns the norm before clipping.
double clip_grad_norm(const std::vector<Param*>& params, double max_norm);

}  // namespace calq::train
