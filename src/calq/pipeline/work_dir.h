// The state of a layer-wise calibrated quantization (GPTQ, activation-aware RTN) outside RAM:
// calibration activations kept in memory up to a budget and spilled to disk beyond it, and the
// work directory whose per-layer checkpoints let `calq quantize --resume` continue after a kill
// and produce the same bytes as an uninterrupted run (docs/cli.md, "Long runs").
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/core/tensor.h"
#include "calq/engine/engine.h"
#include "calq/io/safetensors.h"
#include "calq/pipeline/plan.h"
#include "calq/quant/format.h"
#include "calq/quant/hadamard.h"

namespace calq::pipeline {

// Calibration activations (one engine::Activations per chunk of sequences). Chunks stay in RAM
// while the bytes held there stay within `budget` (0: no limit); the others live in files
// `chunk_NNNNN.bin` under `dir`. persist() writes the in-memory chunks there too, so that the
// directory alone holds the complete state (a checkpoint).
class ActivationStore {
 public:
  ActivationStore(std::filesystem::path dir, uint64_t budget, size_t chunks);
  // Reopens a persisted directory (every chunk file present and well-formed, else an error).
  static ActivationStore open(const std::filesystem::path& dir, uint64_t budget);

  size_t size() const { return slots_.size(); }
  engine::Activations get(size_t i) const;
  void put(size_t i, engine::Activations a);
  void persist();
  const std::filesystem::path& dir() const { return dir_; }
  uint64_t bytes_in_memory() const { return in_memory_; }
  uint64_t bytes_on_disk() const { return on_disk_; }
  size_t chunks_on_disk() const;

  static void write_chunk(const std::filesystem::path& file, const engine::Activations& a);
  static engine::Activations read_chunk(const std::filesystem::path& file);

 private:
  struct Slot {
    std::optional<engine::Activations> mem;
    bool on_disk = false;
    uint64_t bytes = 0;
  };
  std::filesystem::path file(size_t i) const;
  std::filesystem::path dir_;
  uint64_t budget_ = 0, in_memory_ = 0, on_disk_ = 0;
  std::vector<Slot> slots_;
};

// What one finished layer produced: quantized weights by tensor name, tensors replaced in their
// own dtype (norm weights and biases that absorbed activation scales), and its report rows.
struct LayerOutput {
  std::map<std::string, quant::QuantizedWeight> weights;
  std::map<std::string, Tensor> replaced;
  std::map<std::string, quant::Rotation> rotations;  // by tensor name: weights stored as Q(W·R)
  nlohmann::json report = nlohmann::json::array();
};

// The work directory:
//   manifest.json              what the run is (model fingerprint, method, options, calibration)
//   state.json                 {"completed_layers": N}, written atomically after each layer
//   layer_NNNNN/               the layer's output (model.safetensors + layer.json)
//   acts_NNNNN/                the activations entering layer NNNNN (spill files; complete for
//                              the layer that state.json names)
class WorkDir {
 public:
  // A fresh run needs `dir` absent (or `overwrite`); a resumed run needs the same manifest, else
  // it is refused with the list of differences.
  WorkDir(std::filesystem::path dir, const nlohmann::json& manifest, bool resume, bool overwrite);
  int64_t completed_layers() const { return completed_; }
  const std::filesystem::path& path() const { return dir_; }
  std::filesystem::path acts_dir(int64_t layer) const;

  // Saves layer `layer`'s output, then (once `next` is persisted) records it as completed and
  // removes the activations of the layer before. next = null: nothing is persisted for layer + 1
  // (GPU-resident activations, or a method without calibration passes; a resumed run recomputes
  // what it needs).
  void finish_layer(int64_t layer, const LayerOutput& out, ActivationStore* next);
  // Reading finished layers back: which layer holds each tensor, and the tensors themselves.
  std::map<std::string, int64_t> weight_index() const;
  std::map<std::string, int64_t> replaced_index() const;
  nlohmann::json layer_report(int64_t layer) const;
  // Whether the stored weight `name` of a finished layer carries g_idx (groups in processing order).
  bool weight_has_g_idx(int64_t layer, const std::string& name) const;
  quant::QuantizedWeight load_weight(int64_t layer, const std::string& name, const quant::Format& f) const;
  // Rotations of the finished layers' weights (of layer `layer` only when >= 0), by tensor name
  // (rebuilt from dim, block and seed).
  std::map<std::string, quant::Rotation> rotations(int64_t layer = -1) const;
  Tensor load_replaced(int64_t layer, const std::string& name) const;
  void remove();

 private:
  // A finished layer's layer.json, parsed once (weight_index, rotations and load_weight read it
  // for every tensor).
  const nlohmann::json& layer_json(int64_t layer) const;
  const io::Checkpoint& layer_file(int64_t layer) const;
  std::filesystem::path dir_;
  int64_t completed_ = 0;
  mutable std::map<int64_t, io::Checkpoint> open_;
  mutable std::map<int64_t, nlohmann::json> layer_json_;
};

// The differences between two manifests, as "key: old -> new" lines (empty: equal).
std::vector<std::string> manifest_differences(const nlohmann::json& saved, const nlohmann::json& now);

// A fingerprint of a checkpoint: config.json's SHA-256 and a SHA-256 over every tensor's name,
// dtype, shape and bytes' length (reading the tensor bytes of a large model would take minutes).
nlohmann::json model_fingerprint(const std::filesystem::path& model_dir);

}  // namespace calq::pipeline
