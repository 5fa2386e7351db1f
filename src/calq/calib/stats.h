// Activation statistics of linear-module inputs, collected during calibration, and the files
// made from them: activation_ranges.json (the seed's schema, extended), ranges_minmax.json, and a
// llama.cpp importance matrix (imatrix GGUF).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/io/config.h"

namespace calq::calib {

// Statistics of one input (shared by the modules that read it: q/k/v, gate/up).
struct InputStats {
  int64_t features = 0;
  int64_t tokens = 0;
  double min = 0, max = 0, absmax = 0;
  std::vector<double> ch_absmax, ch_sum_abs, ch_sum_sq;  // per input channel
  // Histogram of |x| over every element: bin 0 holds exact zeros; bin b >= 1 holds
  // |x| in [2^((b-1)/64 - 64), 2^(b/64 - 64)), i.e. 64 bins per octave from 2^-64 to 2^64.
  std::vector<uint64_t> hist;

  explicit InputStats(int64_t features = 0);
  // Adds the rows of x (rows × features) whose mask entry is non-zero (mask null: all).
  void add(const float* x, int64_t rows, const uint8_t* mask = nullptr);
  void merge(const InputStats& o);
  // The p-th percentile (0..100) of |x| over all elements, from the histogram: the upper edge of
  // the bin holding it (relative resolution 2^(1/64) − 1 ≈ 1.1%), capped at absmax.
  double abs_percentile(double p) const;
};

class StatsCollector {
 public:
  // Records one observed input for the given modules (HF module paths, sharing that input).
  void add(const std::vector<std::string>& modules, const float* x, int64_t rows, int64_t features,
           const uint8_t* mask = nullptr);
  // Statistics by module (modules sharing an input point to equal values).
  const InputStats& of(const std::string& module) const;
  std::vector<std::string> modules() const;  // sorted
  bool empty() const { return by_module_.empty(); }

  // {"layer_ranges": {module: [min, max]}, "percentile": p, "smooth_factor": s,
  //  "detailed_stats": {module: {min, max, absmax, fp4_scale, int4_scale, tokens,
  //   percentile_absmax, channel_absmax: [...], channel_mean_abs: [...]}}, "percentile_method": ...}
  nlohmann::json activation_ranges(double percentile, double smooth_factor) const;
  nlohmann::json ranges_minmax() const;  // {module: {"min", "max"}}
  // llama.cpp's imatrix GGUF: per weight (GGUF name), "<name>.in_sum2" [features, n_mat] and
  // "<name>.counts" [1, n_mat]; experts of a MoE layer stack into one matrix (n_mat = experts).
  void write_imatrix(const std::filesystem::path& file, const io::ModelConfig& cfg,
                     const std::vector<std::string>& datasets, int64_t chunk_count, int64_t chunk_size) const;

 private:
  std::vector<InputStats> inputs_;
  std::map<std::string, size_t> by_module_;
};

// The GGUF tensor name llama.cpp gives a HF weight ("model.layers.3.self_attn.q_proj.weight" ->
// "blk.3.attn_q.weight"); for per-expert weights also the expert index (stacked tensors).
// Empty name when llama.cpp has no such tensor.
struct GgufName {
  std::string name;
  int64_t expert = -1;
};
GgufName gguf_tensor_name(const std::string& hf_weight, io::Arch arch);

}  // namespace calq::calib
