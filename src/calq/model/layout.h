// The tensors (HF names, shapes) that a checkpoint of a given config holds.
#pragma once

#include <string>
#include <vector>

#include "calq/core/tensor.h"
#include "calq/io/config.h"

namespace calq::model {

struct ExpectedTensor {
  std::string name;
  Shape shape;
  bool is_norm = false;  // initialised to 1 by the generator (0 for biases)
  bool is_bias = false;
};

// In the order HF's state_dict lists them (embeddings, layers, final norm, head). MoE experts are
// listed as separate per-expert tensors (experts.N.gate_proj ...). Tied heads are omitted.
std::vector<ExpectedTensor> expected_tensors(const io::ModelConfig& cfg);

}  // namespace calq::model
