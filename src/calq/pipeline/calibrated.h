// Calibration-driven work on a model: running calibration text through the engine layer by
// layer, collecting activation statistics / Hessians / the imatrix (calq calibrate), and the
// layer-wise GPTQ and activation-aware RTN quantizers that calq quantize plugs in.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/data/dataset.h"
#include "calq/engine/engine.h"
#include "calq/pipeline/module_quant.h"
#include "calq/pipeline/quantize.h"
#include "calq/quant/act_scale.h"
#include "calq/quant/gptq.h"
#include "calq/pipeline/work_dir.h"

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

// Where a layer-wise calibrated run keeps its state (docs/cli.md, "Long runs").
struct RunStorage {
  std::filesystem::path work_dir;  // required: per-layer checkpoints and spilled activations
  uint64_t max_memory = 0;         // bytes of calibration activations kept in RAM (0: no limit)
  bool resume = false;             // continue the run recorded in work_dir
  bool overwrite = false;          // discard an existing work_dir instead of refusing
  bool layerwise = false;          // never cache fp32 weights: read each layer from the checkpoint
  bool keep = false;               // keep work_dir after success (default: removed by the caller)
  // --activation-precision bf16: the calibration activations between decoder layers are rounded
  // to bf16 (nearest even) at every layer boundary, wherever they are kept; GPU-resident ones are
  // then stored in 2 bytes instead of 4 (engine::Options::bf16_slots). GPTQ / MR-GPTQ layer loops.
  bool bf16_activations = false;
  // --layer-cache-memory: memory for the layers' intermediate states kept between the passes of a
  // true-sequential layer (engine::LayerCache, CPU engine with host-held activations): 0 disables
  // them; unset, a quarter of the available memory at each layer. The output does not depend on it.
  std::optional<uint64_t> layer_cache_memory;
  bool layer_cache = false;  // set by the method: its layer function runs several passes per layer
};

// The outputs of a finished layer-wise run, read back from its work directory on demand.
class CalibratedResults {
 public:
  explicit CalibratedResults(std::shared_ptr<WorkDir> wd, std::vector<TensorPlan> plan);
  std::optional<quant::QuantizedWeight> weight(const TensorPlan& p) const;
  std::optional<Tensor> replaced(const std::string& tensor) const;
  // The rotations of rotated modules (MR-GPTQ), by module.
  std::map<std::string, quant::Rotation> rotations_by_module() const;
  size_t weights() const { return weights_.size(); }
  // Whether weight(p) carries g_idx (act-order without static groups), without loading it.
  bool has_g_idx(const TensorPlan& p) const;
  WorkDir& work_dir() { return *wd_; }

 private:
  std::shared_ptr<WorkDir> wd_;
  std::map<std::string, int64_t> weights_, replaced_;
};

// How the experts of a mixture-of-experts layer get their Hessians (docs/moe.md).
struct MoeCalibOptions {
  // routed: an expert's statistics come from the tokens its router sends it; all-experts: every
  // token of the layer is also fed through every expert for statistics only (the layer's output
  // still follows the router), so each expert's Hessian sees every token.
  enum class Calibration { Routed, AllExperts } calibration = Calibration::Routed;
  // per-expert: one Hessian per expert input; shared: one per layer and input position (all
  // experts' gate/up share the pooled Hessian of their inputs, all downs theirs) -- the baseline
  // of tools that hook experts by module pattern.
  enum class Hessian { PerExpert, Shared } hessian = Hessian::PerExpert;
  // routing (default): a routed token counts with its routing weight squared (the expert's
  // output, and so its error, is scaled by that weight); uniform: every routed token counts once.
  // Routed statistics only (docs/moe.md has the measurement behind the default).
  enum class TokenWeight { Uniform, Routing } token_weight = TokenWeight::Routing;
  // An expert input that saw n < N routed tokens gets H = (n·H_routed + (N−n)·H_all) / N, H_all
  // being its Hessian over every token of the layer (an extra statistics-only pass). -1: N is the
  // input's width (below it the routed XᵀX is singular); 0: blend only experts
  // that no token was routed to (they have no routed Hessian at all).
  int64_t min_tokens = -1;
  // Bytes the expert Hessians of one step may take (0: a quarter of the available memory); above
  // it the experts are processed in batches, one calibration pass of the layer each.
  uint64_t hessian_memory = 0;
  int threads = 0;  // experts quantized at once (0: OpenMP's thread count)
};

// The GPTQ pass: every module the plan quantizes gets its Hessian from the layer's real inputs
// (true-sequential: the modules of a layer are quantized in execution order, each seeing inputs
// that the already quantized modules before it produced) and is quantized with GPTQ.
struct GptqPipelineOptions {
  CalibrationSpec calib;
  quant::GptqOptions gptq;
  bool true_sequential = true;
  bool quantized_inputs = true;  // layer i sees the outputs of the quantized layers < i
  int64_t min_tokens = 16;       // a module seeing fewer calibration tokens is an error
  RunStorage storage;
  MrPipelineOptions mr;          // --method mr-gptq
  MoeCalibOptions moe;
  // Calibration forward passes on the GPU engine (engine::Options::device = Cuda, fp32), dense and
  // MoE models. --forward-device.
  bool forward_cuda = false;
  engine::Precision forward_precision = engine::Precision::F32;  // --forward-precision
  // Decoder layers whose weights the GPU engine holds at once (engine::Options::
  // gpu_resident_layers; 0: all). The results do not depend on it. --gpu-layers.
  int64_t gpu_layers = 1;
  // With gptq.cuda: the GPUs that quantize modules, one worker per entry (an ordinal may repeat);
  // the forward pass and the Hessians run on the first. Empty: {gptq.device}. --devices.
  std::vector<int> devices;
  // With forward_cuda on a dense model, the Hessians accumulate on the GPU from the engine's
  // device inputs (backend::GpuHessian) with this input precision (--hessian-precision); the
  // environment variable CALQ_CUDA_HOST_HESSIANS=1 makes them host-side as before (fp32 only).
  backend::HessianPrecision hessian_precision = backend::HessianPrecision::F32;
};
// Runs calibration + GPTQ (or MR-GPTQ) for `plan`, layer by layer with a checkpoint after each, and returns the
// quantized weights (from the work directory), with a report (per module: proxy loss, seconds,
// tokens, damping, dead inputs; MR-GPTQ: kurtosis and rotation decision; rotated modules' weights
// are Q(W·R), see CalibratedResults::rotations). `identity`: what must match for --resume.
CalibratedResults run_gptq(const std::filesystem::path& model_dir, const std::vector<TensorPlan>& plan,
                           const GptqPipelineOptions& opt, const nlohmann::json& identity, nlohmann::json& report);

// Activation-aware RTN (docs/algorithms.md): per input shared by modules, input-channel scales
// s = mean|x|^α with α searched to minimise the modules' output error, folded exactly into the
// op that produces the input (RMSNorm/LayerNorm weight before q/k/v and gate/up; v_proj rows
// before o_proj when heads = kv heads; up_proj rows before down_proj). Inputs with nothing to fold
// into get plain RTN. Statistics come from calibration text (full second moment H = XᵀX/n of the
// real inputs, layer by layer with quantized earlier layers) or from an activation_ranges.json
// written by `calq calibrate` (per-channel mean |x| and mean x²: the error uses diag(H)).
struct ActRtnOptions {
  CalibrationSpec calib;             // used when stats_file is empty
  std::filesystem::path stats_file;  // activation_ranges.json
  quant::ActScaleOptions act;
  int64_t min_tokens = 16;
  RunStorage storage;
};
CalibratedResults run_act_rtn(const std::filesystem::path& model_dir, const std::vector<TensorPlan>& plan,
                              const ActRtnOptions& opt, const nlohmann::json& identity, nlohmann::json& report);

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
