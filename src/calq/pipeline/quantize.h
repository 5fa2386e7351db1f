// Model-level quantization driver: checkpoint in, calq native directory out (docs/format.md).
// Tensors are streamed one at a time from the mmapped input; the output is built in a temporary
// directory and renamed into place only when everything succeeded.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "calq/pipeline/plan.h"
#include "calq/quant/hadamard.h"
#include "calq/quant/rtn.h"

namespace calq::pipeline {

struct QuantizeOptions {
  std::filesystem::path input, output;
  std::string method = "rtn";
  PlanOptions plan;
  quant::RtnOptions rtn;
  bool validate = false;
  bool overwrite = false;
  bool dry_run = false;                  // print the plan, write nothing
  uint64_t max_shard_bytes = 5000000000ULL;
  std::string command_line;              // recorded in the report
  // When set, called for every tensor the plan quantizes; a returned weight is written instead
  // of RTN's (calibrated methods: GPTQ, MR-GPTQ, activation-aware RTN). nullopt: RTN.
  std::function<std::optional<quant::QuantizedWeight>(const TensorPlan&)> quantizer;
  // Whether `quantizer`'s weight for a tensor carries g_idx (act-order with groups in processing
  // order), asked when the output's tensors are declared, before any is written. Null: none does.
  std::function<bool(const TensorPlan&)> with_g_idx;
  // When set, called for every tensor the plan keeps; a returned tensor (same dtype and shape) is
  // written instead of the input's (norm weights that absorbed activation scales).
  std::function<std::optional<Tensor>(const TensorPlan&)> replace;
  // RTN + rotation: every quantized module's weight is rotated, W·R (Hadamard of this block size,
  // 0: full width; signs from rotate_seed), before RTN; the output records R (docs/format.md).
  std::optional<int64_t> rotate_block;
  uint64_t rotate_seed = 0;
  // The rotations of weights that `quantizer` returns in the rotated basis (MR-GPTQ), by module.
  std::map<std::string, quant::Rotation> rotations;
  nlohmann::json report_extra = nlohmann::json::object();  // merged into calq_report.json
  nlohmann::json config_extra = nlohmann::json::object();  // merged into quantization_config.calq
};

struct TensorResult {
  std::string name;
  std::string format;  // "" when kept
  double bits_per_weight = 0;
  double seconds = 0;
  bool validated = false;
  int64_t saturated_scales = 0;  // groups whose scale was clamped to its storage type's maximum
  quant::WeightError error;
  nlohmann::json rotation;  // null, or the rotation recorded for this tensor (docs/format.md)
};

struct QuantizeResult {
  std::vector<TensorPlan> plan;
  std::vector<TensorResult> tensors;
  nlohmann::json report;  // the calq_report.json written
  double seconds = 0;
};

QuantizeResult quantize_model(const QuantizeOptions& opt);

// Files copied from the input directory to every output (tokenizer and generation files).
bool is_passthrough_file(const std::string& filename);

}  // namespace calq::pipeline
