// H = XᵀX / n for the inputs X (tokens × features) of a linear module, accumulated in fp64 from
// blocked fp32 products (the upper triangle of bᵀb per block b of at most `block` rows, added into
// fp64), so that 10⁶ tokens lose nothing measurable against a pure fp64 sum
// (tests/unit/gptq_test.cpp measures it). The block products run on calq's own GEMM kernels
// (engine/gemm.h) in strips of features: each element is the same sum of fp32 FMAs over the
// block's rows in order whatever the strips, the thread count or the vector width, so the
// Hessians, and GPTQ's codes, are the same on every CPU with AVX2 (OpenBLAS's ssyrk, used before,
// sums in an order that depends on the kernels it picks for the CPU: bench/code_agreement.sh).
#pragma once

#include <cstdint>
#include <vector>

namespace calq::quant {

class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t features, int64_t block = 512);
  // Adds the rows of x (rows × features, row-major) whose mask is non-zero (mask may be null:
  // every row). Padding rows must be masked out.
  void add(const float* x, int64_t rows, const uint8_t* mask = nullptr);
  // Weighted: row r counts with weight[r]² (its values scaled by weight[r] >= 0), so hessian()
  // becomes Σ w² x xᵀ / Σ w² (MoE: an expert's output is scaled by the token's routing weight,
  // so that token's output error is too).
  void add_weighted(const float* x, int64_t rows, const uint8_t* mask, const float* weight);
  // Adds another accumulator's sums (same features).
  void merge(const HessianAccumulator& other);
  int64_t features() const { return n_; }
  int64_t tokens() const { return tokens_; }
  double weight() const { return weight_; }  // Σ w² (tokens() when only add() was used)
  // XᵀX / weight() (full symmetric, row-major). Zero matrix when no token was added.
  std::vector<double> hessian() const;
  // Σ xᵀx without the division (upper triangle; call hessian() first for the full matrix).
  const std::vector<double>& sum() const { return sum_; }

 private:
  void flush();
  int64_t n_, block_;
  int64_t tokens_ = 0;
  double weight_ = 0;
  std::vector<double> sum_;   // upper triangle valid until hessian() mirrors it
  std::vector<float> buf_;    // pending rows (≤ block_)
  int64_t pending_ = 0;
  std::vector<float> tmp_;    // the block product (upper triangle panels)
  std::vector<float> bt_;     // the pending rows transposed (features × rows)
};

}  // namespace calq::quant
