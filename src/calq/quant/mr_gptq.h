// MR-GPTQ (Egiazarian et al. 2025, "Bridging the Gap Between Promise and Performance for
// Microscaling FP4 Quantization"): a Hadamard rotation of the input dimension, a search of the
// group scale (shrink factors of the absmax scale minimising ‖w − q(w)‖_p with the scale rounded
// to its storage type), and GPTQ with act-order and static groups, all on the rotated problem:
// W' = W·R, H' = RᵀHR. The engine applies the same R to the activations (x' = x·R), so
// x'·W'ᵀ = x·Wᵀ up to the quantization error.
#pragma once

#include <optional>

#include "calq/quant/gptq.h"
#include "calq/quant/hadamard.h"

namespace calq::quant {

struct MrGptqOptions {
  GptqOptions gptq;              // act_order and static_groups default to true here
  bool rotate = true;
  int64_t hadamard_block = 128;  // 0: full width
  uint64_t seed = 0;
  double scale_search_p = 2.4;
  int scale_grid = 100;          // candidates from 1.0 down to scale_min
  float scale_min = 0.2f;
  MrGptqOptions() {
    gptq.act_order = true;
    gptq.static_groups = true;
  }
};

struct MrGptqResult {
  GptqResult gptq;                  // quantized W·R
  std::optional<Rotation> rotation; // none when not rotated
};

MrGptqResult mr_gptq_quantize(const float* w, int64_t rows, int64_t cols, const std::vector<double>& h,
                              const Format& f, const MrGptqOptions& opt, const std::string& what = "weight");

// The dequantized weight in the original basis: Ŵ = Q·Rᵀ (for checks and dense exports).
std::vector<float> mr_gptq_dequantize(const MrGptqResult& r);

}  // namespace calq::quant
