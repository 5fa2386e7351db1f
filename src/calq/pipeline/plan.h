// Which tensors of a checkpoint are quantized, and how: tensor classification by HF module
// names, mixed-precision presets, --keep and --override rules. Pure functions over names and
// shapes, so the plan can be printed, tested and reported before any weight is read.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "calq/core/tensor.h"
#include "calq/io/config.h"
#include "calq/quant/format.h"

namespace calq::pipeline {

enum class TensorKind {
  Embedding, LmHead, Norm, Bias, Router, SharedExpertGate,
  AttnQKV, AttnOut, MlpGateUp, MlpDown, ExpertGateUp, ExpertDown, SharedExpert,
  FusedExperts,  // 3-D expert banks ([E, out, in])
  OtherLinear,   // a 2-D *.weight not recognised as any of the above
  Other,         // anything else (buffers, 1-D, ...)
};
std::string_view kind_name(TensorKind k);
// Classifies a tensor by its HF name and rank. `conv1d` is set for GPT-2 Conv1D weights, which
// are stored [in, out] (the transpose of a Linear weight).
TensorKind classify_tensor(const std::string& name, size_t rank, io::Arch arch, bool* conv1d = nullptr);

struct Override {
  std::string pattern;  // ECMAScript regex, searched in the module name
  quant::Format format;
};
// Parses "REGEX=FORMAT[:GROUP]" (GROUP -1 = per-channel); the format inherits `symmetric`.
Override parse_override(const std::string& spec, bool symmetric);

enum class OnIndivisible { Error, Keep };

struct PlanOptions {
  quant::Format format;                // --format / --group-size / --symmetric
  bool group_size_explicit = false;    // --group-size given
  std::string preset;                  // "", dense, moe, quality, speed
  std::vector<std::string> keep;       // --keep regexes
  std::vector<Override> overrides;     // --override, first match wins
  OnIndivisible on_indivisible = OnIndivisible::Error;
};

struct TensorPlan {
  std::string name;    // tensor name, e.g. model.layers.0.self_attn.q_proj.weight
  std::string module;  // name without ".weight"
  TensorKind kind = TensorKind::Other;
  Shape shape;
  DType dtype = DType::F32;
  bool conv1d = false;                 // stored [in, out]; quantized as its transpose
  std::optional<quant::Format> format; // nullopt: kept in its dtype
  std::string reason;                  // why kept, or which rule chose the format
  std::string fuse_group;              // modules engines fuse (q/k/v, gate/up) share this key
  int64_t rows() const;                // out-features
  int64_t cols() const;                // in-features
};

struct TensorDesc {
  std::string name;
  DType dtype;
  Shape shape;
};

// Builds the plan for every tensor. Throws calq::Error for unknown presets, bad regexes, and (with
// OnIndivisible::Error) for modules whose in-features the chosen group size does not divide,
// listing every such module at once.
std::vector<TensorPlan> make_plan(const std::vector<TensorDesc>& tensors, const io::ModelConfig& cfg,
                                  const PlanOptions& opt);

// The group size a preset gives a kind, or nullopt when the preset leaves the kind at the base
// format's group size. Presets (docs/cli.md): dense/moe: attention 64, MLP and experts 128,
// shared experts 64; quality: attention 32, MLP 128, experts 64, shared experts 32, other 64;
// speed: attention 128, MLP/experts 256, shared experts 128, other 256.
std::optional<int> preset_group(const std::string& preset, TensorKind kind);
bool is_known_preset(const std::string& preset);

}  // namespace calq::pipeline
