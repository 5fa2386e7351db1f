// Round-to-nearest quantization of a weight matrix, with an optional per-group clipping search.
#pragma once

#include <optional>

#include "calq/quant/format.h"

namespace calq::quant {

struct RtnOptions {
  // Clipping search: for each group try shrink factors s_i = 1 - i*(1-clip_min)/(clip_grid-1),
  // i = 0..clip_grid-1, and keep the one minimising sum |w - q(w)|^clip_norm. The scale is rounded
  // to its storage type for every candidate, so the error is the error of what is stored. Ties
  // keep the earlier (larger) candidate, so the result is never worse than plain absmax. A
  // candidate whose stored parameters repeat the previous one's is skipped; for mxfp4 (power-of-two
  // scales) that leaves only the grid's distinct exponents: with clip_min 0.5, E0 and E0 - 1.
  bool clip_search = false;
  int clip_grid = 20;
  float clip_min = 0.5f;
  float clip_norm = 2.0f;
  // Clip search: when set (length cols), the error of column c is weighted by col_weight[c] (an
  // input channel's mean square, so the search minimises the output error of a diagonal
  // second moment rather than the weight error).
  const float* col_weight = nullptr;
  // nvfp4: use this global scale instead of the tensor's own (for modules that engines fuse).
  std::optional<float> global_scale;
};

// w: rows*cols fp32, row-major [out, in]. Throws calq::Error on NaN/Inf weights or bad shapes,
// naming `what`.
QuantizedWeight rtn_quantize(const float* w, int64_t rows, int64_t cols, const Format& f,
                             const RtnOptions& opt, const std::string& what = "weight");

// Weight error of a quantization (for --validate).
struct WeightError {
  double rmse = 0, rel_fro = 0, max_abs = 0;
};
WeightError weight_error(const float* w, const float* w_hat, int64_t n);

}  // namespace calq::quant
