// GPTQ's permuted fp64 working copies, element by element, for the host (gptq_prepare) and the
// CUDA path (gptq_kernel.cu builds them on the GPU with the same functions).
#pragma once

#include <cstdint>

#include "calq/quant/element.h"

namespace calq::quant::detail {

// Wp[r][k] and Hp[k][l] from the inputs (dead columns: weight 0, H_jj = 1).
template <typename Index>
CALQ_HD inline double permuted_weight(const float* w, const uint8_t* dead, const Index* perm, int64_t cols, int64_t r,
                                      int64_t k) {
  const int64_t j = perm[k];
  return dead[j] ? 0.0 : static_cast<double>(w[r * cols + j]);
}
template <typename Index>
CALQ_HD inline double permuted_hessian(const double* h, const uint8_t* dead, const Index* perm, int64_t cols, int64_t k,
                                       int64_t l) {
  const int64_t a = perm[k], b = perm[l];
  return a == b && dead[a] ? 1.0 : h[a * cols + b];
}

}  // namespace calq::quant::detail
