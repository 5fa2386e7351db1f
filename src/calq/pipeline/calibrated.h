// Calibration-driven work on a model: running calibration text through the engine layer by
// layer, collecting activation statistics / Hessians / the imatrix (calq calibrate), and the
// layer-wise GPTQ and activation-aware RTN quantizers that calq quantize plugs in.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/data/dataset.h"
#include "calq/pipeline/module_quant.h"
#include "calq/pipeline/quantize.h"
#include "calq/quant/act_scale.h"
#include "calq/quant/gptq.h"

namespace calq::pipeline {

struct CalibrationSpec {
  std::string source = "bartowski-v3";  // named source or file (docs/datasets.md)
  data::SelectOptions select;           // samples, seq_len, seed, packing, BOS
  data::LoadOptions load;
  int64_t batch = 8;                    // sequences per forward pass
  CalibrationSpec() {
    load.wikitext_default_split = "train";
  }
};

// The calibration token sequences of a model, and their provenance (source, files and their
// SHA-256, samples, tokens) for reports.
struct CalibrationInputs {
  data::CalibrationSet set;
  nlohmann::json provenance;
};
CalibrationInputs load_calibration(const std::filesystem::path& model_dir, const CalibrationSpec& spec);

// calq calibrate
struct CalibrateOptions {
  std::filesystem::path input, output;
  CalibrationSpec calib;
  double percentile = 99.9;
  double smooth_factor = 0.8;
  bool hessians = false;              // write hessians.safetensors (one per distinct input)
  std::filesystem::path imatrix;      // write llama.cpp imatrix GGUF here when set
  bool overwrite = false;
  std::string command_line;
};
nlohmann::json calibrate_model(const CalibrateOptions& opt);

// The GPTQ pass: every module the plan quantizes gets its Hessian from the layer's real inputs
// (true-sequential: the modules of a layer are quantized in execution order, each seeing inputs
// that the already quantized modules before it produced) and is quantized with GPTQ.
struct GptqPipelineOptions {
  CalibrationSpec calib;
  quant::GptqOptions gptq;
  bool true_sequential = true;
  bool quantized_inputs = true;  // layer i sees the outputs of the quantized layers < i
  int64_t min_tokens = 16;       // a module seeing fewer calibration tokens is an error
  MrPipelineOptions mr;          // --method mr-gptq
};
// Runs calibration + GPTQ for `plan` and returns the quantized weights by tensor name, with a
// report (per module: proxy loss, seconds, tokens, damping, dead inputs; MR-GPTQ: kurtosis and
// rotation decision). With MR-GPTQ the weights of rotated modules are Q(W·R), and `rotations`
// receives R by module.
std::map<std::string, quant::QuantizedWeight> run_gptq(const std::filesystem::path& model_dir,
                                                       const std::vector<TensorPlan>& plan,
                                                       const GptqPipelineOptions& opt, nlohmann::json& report,
                                                       std::map<std::string, quant::Rotation>* rotations = nullptr);

// Per linear module of a quantized model: ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ over the real calibration tokens,
// X being the module's input in the base model (so each module's own error is measured).
struct LayerErrorRow {
  std::string module;
  double rel_error = 0;
  int64_t tokens = 0;
};
std::vector<LayerErrorRow> layer_error(const std::filesystem::path& quantized, const std::filesystem::path& base,
                                       const CalibrationSpec& spec);

}  // namespace calq::pipeline
