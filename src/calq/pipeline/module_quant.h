// Per-module quantization for the calibrated pipeline (run_gptq): plain GPTQ, or MR-GPTQ
// (Hadamard rotation of the input dimension + storage-type scale search + act-order GPTQ on the
// rotated problem, quant/mr_gptq.h), optionally gated by the kurtosis of the module's inputs.
#pragma once

#include <map>
#include <mutex>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/engine/engine.h"
#include "calq/pipeline/plan.h"
#include "calq/quant/gptq.h"
#include "calq/quant/hadamard.h"

namespace calq::pipeline {

// Power sums of a module's input over every element of the real tokens (tokens × channels),
// in fp64. kurtosis() is Pearson's β₂ = m₄ / m₂² of that pooled sample, with central moments
// (Gaussian: 3; a few channels with large outliers make it large).
class MomentAccumulator {
 public:
  void add(const float* x, int64_t rows, int64_t cols, const uint8_t* mask);
  // Power sums computed elsewhere (backend::cuda_power_sums) over n elements.
  void add_sums(double s1, double s2, double s3, double s4, int64_t n) {
    s1_ += s1;
    s2_ += s2;
    s3_ += s3;
    s4_ += s4;
    n_ += n;
  }
  double kurtosis() const;  // 0 when nothing was seen or the variance is 0
  int64_t count() const { return n_; }

 private:
  double s1_ = 0, s2_ = 0, s3_ = 0, s4_ = 0;
  int64_t n_ = 0;
};

// MR-GPTQ options of the pipeline (`calq quantize --method mr-gptq`).
struct MrPipelineOptions {
  bool enabled = false;                      // --method mr-gptq
  bool rotate = true;                        // false: --no-hadamard
  int64_t hadamard_block = 128;              // 0: full width
  uint64_t seed = 0;                         // --hadamard-seed (one sign vector per input width)
  std::optional<double> kurtosis_threshold;  // rotate only inputs with kurtosis > K
  double scale_search_p = 2.4;
  int scale_grid = 100;
  float scale_min = 0.2f;
};

// Checks, before any work, that every quantized module of `plan` can be rotated with `block`
// (0: full): the block divides the input width, or the full-width Hadamard order exists. The
// error lists every offending module with its sizes and suggests what to use instead.
void check_rotation_plan(const std::vector<TensorPlan>& plan, int64_t block);

struct ModuleQuantResult {
  quant::QuantizedWeight q;               // in the rotated basis when `rotation` is set
  std::optional<quant::Rotation> rotation;
  std::vector<float> w_hat;               // the dequantized weight in the original basis (Q·Rᵀ)
  // Instead of w_hat, when GPTQ ran on the GPU from the GPU engine's weights: Ŵ on GPU
  // w_hat_device_ordinal (for engine::Model::set_weight_device) and the host copy's maker.
  std::shared_ptr<const float> w_hat_device;
  int w_hat_device_ordinal = -1;
  std::function<std::vector<float>()> w_hat_host;
  nlohmann::json report;                  // proxy_loss, seconds, damp, dead_inputs (+ kurtosis, rotation)
};

class ModuleQuantizer {
 public:
  ModuleQuantizer(const quant::GptqOptions& gptq, const MrPipelineOptions& mr, const std::vector<TensorPlan>& plan);
  // Quantizes module p (weight from m, not yet replaced) with Hessian H. `moments`: the module's
  // input moments (MR-GPTQ), `global_scale`: nvfp4's shared tensor scale of the unrotated group.
  // For a rotated nvfp4 module in a fused group, the shared scale is recomputed from the rotated
  // weights of every module of the group (they share the input, hence the rotation decision).
  // Safe to call from several threads at once for different modules (MoE experts); the engine is
  // only read here, under a lock. `device` >= 0: the GPU this call runs on (with GptqOptions::cuda;
  // --devices), else GptqOptions::device. `h_device` (GPTQ on the GPU, not MR-GPTQ): H is on GPU
  // 0 there (quant::GptqOptions::hessian_device) and `H` holds its diagonal only.
  ModuleQuantResult quantize(engine::Model& m, const TensorPlan& p, const std::vector<double>& H,
                             const MomentAccumulator* moments, std::optional<float> global_scale, int device = -1,
                             const double* h_device = nullptr);

 private:
  quant::GptqOptions gptq_;
  MrPipelineOptions mr_;
  const std::vector<TensorPlan>& plan_;
  std::map<std::string, float> rotated_global_;  // fuse group -> nvfp4 scale of the rotated weights
  std::mutex mu_;                                // guards rotated_global_ and reads of the engine
};

}  // namespace calq::pipeline
