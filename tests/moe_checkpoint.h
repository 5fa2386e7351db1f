// Test helpers for mixture-of-experts checkpoint layouts: read a per-expert checkpoint into
// memory, fuse its experts into transformers 5's 3-D banks, damage it, and write it back.
#pragma once

#include <cstring>
#include <filesystem>
#include <map>
#include <string>

#include "calq/core/tensor.h"
#include "calq/io/config.h"
#include "calq/io/safetensors.h"

namespace calq_test {

using Tensors = std::map<std::string, calq::Tensor>;

// Every tensor of a model directory, copied out of the mmap. Read with SafetensorsFile (not
// Checkpoint) so that the test sees the stored names, whatever Checkpoint exposes.
inline Tensors read_stored(const std::filesystem::path& dir) {
  Tensors out;
  auto f = calq::io::SafetensorsFile::open(dir / "model.safetensors");
  for (const auto& t : f->tensors()) {
    auto v = f->view(t.name);
    calq::Tensor x(v.dtype, v.shape);
    std::memcpy(x.bytes.data(), v.data, v.nbytes);
    out[t.name] = std::move(x);
  }
  return out;
}

// Writes `tensors` as DIR/model.safetensors and copies config.json from `config_from` (if given).
inline void write_model(const std::filesystem::path& dir, const Tensors& tensors,
                        const std::filesystem::path& config_from = {}) {
  std::filesystem::create_directories(dir);
  calq::io::SafetensorsWriter w(dir, 1ull << 40, {{"format", "pt"}});
  for (const auto& [n, t] : tensors) w.declare(n, t.dtype, t.shape);
  for (const auto& [n, t] : tensors) w.write(n, t);
  w.finish();
  if (!config_from.empty())
    std::filesystem::copy_file(config_from / "config.json", dir / "config.json",
                               std::filesystem::copy_options::overwrite_existing);
}

struct FuseOptions {
  std::string suffix;        // "" (transformers 5 parameter names) or ".weight"
  bool mixtral_mlp = false;  // Mixtral: name the block mlp. (transformers 5), router included
};

// The per-expert MoE tensors of every sparse layer replaced by gate_up_proj [E, 2I, H] (each
// expert's gate rows, then its up rows) and down_proj [E, H, I], built by stacking bytes.
inline Tensors fuse_experts(const Tensors& in, const calq::io::ModelConfig& c, const FuseOptions& o = {}) {
  const bool mixtral = c.arch == calq::io::Arch::Mixtral;
  const std::string gate = mixtral ? "w1" : "gate_proj", up = mixtral ? "w3" : "up_proj",
                    down = mixtral ? "w2" : "down_proj";
  Tensors out = in;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.layer_is_sparse(l)) continue;
    const std::string block = "model.layers." + std::to_string(l) + (mixtral ? ".block_sparse_moe." : ".mlp.");
    const std::string to = "model.layers." + std::to_string(l) + (mixtral && !o.mixtral_mlp ? ".block_sparse_moe." : ".mlp.");
    const auto& g0 = in.at(block + "experts.0." + gate + ".weight");
    const auto& d0 = in.at(block + "experts.0." + down + ".weight");
    const int64_t E = c.num_experts, I = g0.shape[0], H = g0.shape[1];
    calq::Tensor gu(g0.dtype, {E, 2 * I, H}), dn(d0.dtype, {E, H, I});
    const size_t gs = g0.bytes.size(), ds = d0.bytes.size();
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = block + "experts." + std::to_string(e) + ".";
      std::memcpy(gu.bytes.data() + (2 * e) * gs, in.at(ep + gate + ".weight").bytes.data(), gs);
      std::memcpy(gu.bytes.data() + (2 * e + 1) * gs, in.at(ep + up + ".weight").bytes.data(), gs);
      std::memcpy(dn.bytes.data() + e * ds, in.at(ep + down + ".weight").bytes.data(), ds);
      for (const auto& p : {gate, up, down}) out.erase(ep + p + ".weight");
    }
    if (to != block) {
      auto r = out.extract(block + "gate.weight");
      r.key() = to + "gate.weight";
      out.insert(std::move(r));
    }
    out[to + "experts.gate_up_proj" + o.suffix] = std::move(gu);
    out[to + "experts.down_proj" + o.suffix] = std::move(dn);
  }
  return out;
}

}  // namespace calq_test
