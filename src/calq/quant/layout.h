// The names, dtypes and shapes of the tensors pack() produces for a format and weight shape,
// known before any weight is quantized (the safetensors writer plans its layout up front).
// tests/unit/layout_test.cpp checks this against pack() for every format.
#pragma once

#include <string>
#include <vector>

#include "calq/quant/format.h"

namespace calq::quant {

struct PackedTensorDesc {
  std::string suffix;  // "weight_packed", "weight_scale", ...
  DType dtype;
  Shape shape;
};

std::vector<PackedTensorDesc> packed_layout(const Format& f, int64_t rows, int64_t cols,
                                            bool with_g_idx = false);

}  // namespace calq::quant
