// calq's native output directory (docs/format.md): HF config.json with a compressed-tensors style
// `quantization_config`, safetensors shards holding packed weights next to unquantized tensors,
// tokenizer files, calq_report.json. This file has the two halves: describing quantized modules
// in quantization_config, and reading any model directory (plain HF or calq output) back as
// fp32 tensors with their HF names.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "calq/io/config.h"
#include "calq/io/safetensors.h"
#include "calq/quant/format.h"
#include "calq/quant/hadamard.h"

namespace calq::native {

// A quantized module as recorded in quantization_config.
struct QuantizedModule {
  std::string module;      // HF module path, e.g. model.layers.0.mlp.down_proj
  quant::Format format;
  bool conv1d = false;     // GPT-2 Conv1D: the HF tensor is [in, out]; packed as its transpose
};

// Builds config.json's `quantization_config` for these modules and the kept modules.
// quant_method is "compressed-tensors" when every format has a compressed-tensors layout,
// otherwise "calq" (same structure; engines that only know compressed-tensors refuse it instead
// of misreading it).
nlohmann::json make_quantization_config(const std::vector<QuantizedModule>& modules,
                                        const std::vector<std::string>& ignored_modules,
                                        const nlohmann::json& calq_extra);
// compressed-tensors QuantizationArgs and format name of a calq format; `ct_compatible` says
// whether vLLM's compressed-tensors loader knows this layout.
nlohmann::json weights_args(const quant::Format& f);
std::string ct_format_name(const quant::Format& f, bool* ct_compatible = nullptr);
// Inverse: the calq format that a config group's weights args + format name describe.
quant::Format format_from_args(const nlohmann::json& weights, const std::string& format_name,
                               const std::string& what);

// A logical tensor of a model, with its HF name and shape.
struct Entry {
  std::string name;
  Shape shape;                          // the HF shape (e.g. [out, in], or [in, out] for Conv1D)
  DType dtype = DType::F32;             // stored dtype for kept tensors; original for quantized
  std::optional<quant::Format> format;  // set when stored quantized
  bool conv1d = false;
  uint64_t stored_bytes = 0;            // bytes on disk (packed tensors + scales + ...)
};

// Any model directory: a plain HF checkpoint, or a calq output.
class Model {
 public:
  static Model open(const std::filesystem::path& dir);
  const std::filesystem::path& dir() const { return dir_; }
  const io::ModelConfig& config() const { return config_; }
  const io::Checkpoint& checkpoint() const { return ckpt_; }
  bool quantized() const { return quantized_; }
  const nlohmann::json& quantization_config() const { return qcfg_; }
  const std::vector<Entry>& entries() const { return entries_; }  // sorted by name
  const Entry& entry(const std::string& name) const;
  bool contains(const std::string& name) const;
  // The tensor as fp32 in its HF layout (dequantized when stored quantized).
  std::vector<float> load_f32(const std::string& name) const;
  // The unpacked quantized weight (codes and scales) of a quantized entry.
  quant::QuantizedWeight load_quantized(const std::string& name) const;
  // Input rotations (MR-GPTQ, docs/format.md "Rotations"): module -> R. A rotated module's stored
  // weight is W·R (in the rotated basis); its input must be rotated (x·R) before the matmul.
  const std::map<std::string, quant::Rotation>& rotations() const { return rotations_; }
  const quant::Rotation* rotation(const std::string& module) const;
  // A linear weight in the original basis, [out, in] (Conv1D: its HF [in, out] layout is
  // refused for rotated modules): load_f32, then ·Rᵀ when the module is rotated.
  std::vector<float> load_f32_unrotated(const std::string& name) const;

 private:
  std::filesystem::path dir_;
  io::ModelConfig config_;
  io::Checkpoint ckpt_;
  bool quantized_ = false;
  nlohmann::json qcfg_;
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, quant::Rotation> rotations_;
};

// Metadata of one rotation for quantization_config.calq.rotations (docs/format.md).
nlohmann::json rotation_json(const quant::Rotation& r, const std::string& module);
// The name of the tensor holding a rotated module's sign vector.
std::string rotation_signs_name(const std::string& module);

}  // namespace calq::native
