// MoE routing of one token row, compiled by the host compiler for the CPU engine and by nvcc for
// the GPU engine (route_topk), so that both choose the same experts with the same weights, bit for
// bit: transformers' Qwen3MoeTopKRouter / MixtralTopKRouter — a softmax over all E router logits
// in fp32, the top K probabilities, divided by their fp32 sum when `renorm` (Mixtral always,
// Qwen3-MoE with norm_topk_prob).
//
// router_exp(x) is exp for float evaluated in fp64 by this file's own operations (argument
// reduction by ln2 in two parts, a degree-13 Taylor polynomial, relative error below 1e-15) and
// rounded once to float: the correctly rounded expf except when the exact value lies within about
// 1e-15 of a rounding boundary, and the same bits on both compilers (every operation is one IEEE
// rounding: -ffp-contract=off on the host, --fmad=false for CUDA). Library exp functions (glibc's,
// CUDA's) differ from each other in rare last bits, which would flip near-tied routing choices.
#pragma once

#include <cmath>
#include <cstdint>

#include "calq/engine/fast_exp.h"  // CALQ_HOST_DEVICE, double_from_bits

namespace calq::engine {

CALQ_HOST_DEVICE inline float router_exp(float x) {
  if (x != x) return x;
  if (x < -110.0f) return 0.0f;  // below half the smallest subnormal (exp(-103.97))
  if (x > 89.0f) return INFINITY;
  const double xd = x;
  constexpr double kInvLn2 = 0x1.71547652b82fep+0;
  constexpr double kLn2Hi = 0x1.62e42fee00000p-1;   // ln2 with 32 trailing zero bits: n·kLn2Hi is exact
  constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;  // ln2 - kLn2Hi
  constexpr double kRound = 0x1.8p+52;
  const double n = (xd * kInvLn2 + kRound) - kRound;  // round(x / ln2), |n| <= 159
  const double r = (xd - n * kLn2Hi) - n * kLn2Lo;    // |r| <= ln2 / 2 (+ a rounding)
  // exp(r) = Σ r^k / k!, k = 0..13 (the first omitted term is below 4e-18 relative).
  double p = 0x1.6124613a86d09p-33;  // 1/13!
  p = p * r + 0x1.1eed8eff8d898p-29;  // 1/12!
  p = p * r + 0x1.ae64567f544e4p-26;  // 1/11!
  p = p * r + 0x1.27e4fb7789f5cp-22;  // 1/10!
  p = p * r + 0x1.71de3a556c734p-19;  // 1/9!
  p = p * r + 0x1.a01a01a01a01ap-16;  // 1/8!
  p = p * r + 0x1.a01a01a01a01ap-13;  // 1/7!
  p = p * r + 0x1.6c16c16c16c17p-10;  // 1/6!
  p = p * r + 0x1.1111111111111p-7;  // 1/5!
  p = p * r + 0x1.5555555555555p-5;  // 1/4!
  p = p * r + 0x1.5555555555555p-3;  // 1/3!
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;  // 2^n, n in [-159, 129]
  return static_cast<float>(p * double_from_bits(bits));
}

// Routes row `lg` (E logits): sel[0..K) = the experts by decreasing probability (ties: the lower
// index first, the order of a partial sort with that comparator), wts[0..K) = their probabilities
// (renormalised by their fp32 sum when renorm). A row without a pick (NaN logits) gets expert -1
// from that pick on, which callers must treat as an error. No arrays: the j-th pick is the
// largest probability that comes after the (j-1)-th in that order, each recomputed from the logit.
CALQ_HOST_DEVICE inline void route_row(const float* lg, int E, int K, bool renorm, int32_t* sel, float* wts) {
  float mx = lg[0];
  for (int e = 1; e < E; ++e) mx = lg[e] > mx ? lg[e] : mx;  // std::max_element: the first maximum
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += static_cast<double>(router_exp(lg[e] - mx));
  float prev_p = 0.0f, s = 0.0f;
  int prev_i = -1;
  for (int j = 0; j < K; ++j) {
    int best = -1;
    float best_p = 0.0f;
    for (int e = 0; e < E; ++e) {
      const float pe = static_cast<float>(static_cast<double>(router_exp(lg[e] - mx)) / sum);
      const bool after_prev = prev_i < 0 || pe < prev_p || (pe == prev_p && e > prev_i);
      if (!after_prev) continue;
      if (best < 0 || pe > best_p) {  // ties keep the lower index (scanned first)
        best = e;
        best_p = pe;
      }
    }
    sel[j] = best;
    wts[j] = best_p;
    if (best < 0) {
      for (int jj = j; jj < K; ++jj) sel[jj] = -1;
      return;
    }
    s += best_p;
    prev_p = best_p;
    prev_i = best;
  }
  if (renorm)
    for (int j = 0; j < K; ++j) wts[j] = wts[j] / s;
}

}  // namespace calq::engine
