// Random-weight checkpoints of any supported config, written tensor by tensor (memory stays at
// one tensor however large the model), for tests, demos and benchmarks at real model shapes.
#pragma once

#include <filesystem>

#include "calq/core/dtype.h"
#include "calq/io/config.h"

namespace calq::model {

struct SynthOptions {
  DType dtype = DType::BF16;
  uint64_t seed = 0;
  float std = 0.02f;           // weights ~ N(0, std^2); norms 1, biases 0
  float outlier_rate = 0.0f;   // fraction of input channels scaled by outlier_scale (per matrix)
  float outlier_scale = 10.f;
  uint64_t max_shard_bytes = 5000000000ULL;
  bool overwrite = false;
};

// Writes config.json (cfg.raw with "torch_dtype" set) and the weights. Deterministic for a seed,
// independent of the thread count.
void write_random_model(const io::ModelConfig& cfg, const std::filesystem::path& out,
                        const SynthOptions& opt);

}  // namespace calq::model
