// calq inspect: what a model directory holds.
#include <fmt/format.h>

#include <iostream>
#include <map>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/export/native.h"
#include "calq/pipeline/plan.h"
#include "commands.h"

namespace calq::cli {

namespace {

std::string kind_group(pipeline::TensorKind k) {
  using K = pipeline::TensorKind;
  switch (k) {
    case K::Embedding: return "embedding";
    case K::LmHead: return "lm_head";
    case K::Norm: return "norm";
    case K::Bias: return "bias";
    case K::Router: case K::SharedExpertGate: return "router";
    case K::AttnQKV: case K::AttnOut: return "attention";
    case K::MlpGateUp: case K::MlpDown: return "mlp";
    case K::ExpertGateUp: case K::ExpertDown: case K::FusedExperts: return "experts";
    case K::SharedExpert: return "shared_expert";
    default: return "other";
  }
}

}  // namespace

nlohmann::json inspect_json(const native::Model& m) {
  const auto& c = m.config();
  nlohmann::json j;
  j["path"] = m.dir().string();
  j["architecture"] = c.architectures.empty() ? c.model_type : c.architectures.front();
  j["model_type"] = c.model_type;
  j["layers"] = c.num_hidden_layers;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["attention_heads"] = c.num_attention_heads;
  j["kv_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rope_theta"] = c.rope_theta;
  if (!c.rope_scaling.type.empty()) j["rope_scaling"] = c.rope_scaling.raw;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["qk_norm"] = c.qk_norm;
  j["attention_bias"] = c.attention_bias;
  if (c.is_moe()) {
    j["num_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["moe_intermediate_size"] = c.moe_intermediate_size;
  }
  auto rotation_of = [&](const std::string& name) -> nlohmann::json {
    const auto* r = name.size() > 7 ? m.rotation(name.substr(0, name.size() - 7)) : nullptr;
    return r ? nlohmann::json(r->describe()) : nlohmann::json(nullptr);
  };
  std::map<std::string, uint64_t> by_kind, dtypes;
  uint64_t total = 0, qparams = 0;
  double qbits = 0;
  nlohmann::json qt = nlohmann::json::array();
  for (const auto& e : m.entries()) {
    auto n = static_cast<uint64_t>(shape_numel(e.shape));
    total += n;
    by_kind[kind_group(pipeline::classify_tensor(e.name, e.shape.size(), c.arch))] += n;
    if (e.format) {
      qparams += n;
      qbits += e.format->bits_per_weight() * static_cast<double>(n);
      dtypes[e.format->name()] += n;
      qt.push_back({{"name", e.name}, {"shape", e.shape}, {"format", e.format->name()},
                    {"symmetric", e.format->symmetric}, {"group_size", e.format->group_size},
                    {"bits_per_weight", e.format->bits_per_weight()}, {"rotation", rotation_of(e.name)},
                    {"stored_bytes", e.stored_bytes}});
    } else {
      dtypes[std::string(dtype_name(e.dtype))] += n;
    }
  }
  j["parameters"] = total;
  j["parameters_by_kind"] = by_kind;
  j["parameters_by_dtype"] = dtypes;
  j["tensors"] = m.entries().size();
  nlohmann::json shards = nlohmann::json::array();
  for (const auto& p : m.checkpoint().shard_paths())
    shards.push_back({{"file", p.filename().string()}, {"bytes", std::filesystem::file_size(p)}});
  j["shards"] = shards;
  j["quantized"] = m.quantized();
  nlohmann::json rots = nlohmann::json::object();
  for (const auto& [mod, r] : m.rotations()) rots[mod] = r.describe();
  j["rotations"] = rots;
  if (m.quantized()) {
    j["quant_method"] = m.quantization_config().value("quant_method", "");
    j["quantized_parameters"] = qparams;
    j["bits_per_weight_quantized"] = qparams ? qbits / static_cast<double>(qparams) : 0.0;
    j["quantized_tensors"] = qt;
  }
  return j;
}

Command add_inspect(CLI::App& app) {
  auto* sub = app.add_subcommand("inspect", "Show a model's architecture, tensors, dtypes, shards and quantization");
  auto model = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto all = std::make_shared<bool>(false);
  sub->add_option("model", *model, "Model directory (HF checkpoint or calq output)")->required();
  sub->add_flag("--json", *json, "Print machine-readable JSON");
  sub->add_flag("--tensors", *all, "List every tensor");
  auto run = [model, json, all]() -> int {
    auto m = native::Model::open(*model);
    auto j = inspect_json(m);
    if (*all) {
      nlohmann::json list = nlohmann::json::array();
      for (const auto& e : m.entries())
        list.push_back({{"name", e.name}, {"shape", e.shape}, {"dtype", dtype_name(e.dtype)},
                        {"format", e.format ? nlohmann::json(e.format->describe()) : nlohmann::json(nullptr)},
                        {"stored_bytes", e.stored_bytes}});
      j["tensor_list"] = list;
    }
    if (*json) {
      std::cout << j.dump(2) << "\n";
      return 0;
    }
    fmt::print("model        {}\n", j["path"].get<std::string>());
    fmt::print("architecture {} ({})\n", j["architecture"].get<std::string>(), j["model_type"].get<std::string>());
    fmt::print("layers       {}   hidden {}   intermediate {}   heads {} / kv {} (head_dim {})\n",
               j["layers"].get<int64_t>(), j["hidden_size"].get<int64_t>(), j["intermediate_size"].get<int64_t>(),
               j["attention_heads"].get<int64_t>(), j["kv_heads"].get<int64_t>(), j["head_dim"].get<int64_t>());
    fmt::print("vocab        {}   max positions {}   rope theta {}{}   tied embeddings {}   qk-norm {}\n",
               j["vocab_size"].get<int64_t>(), j["max_position_embeddings"].get<int64_t>(),
               j["rope_theta"].get<double>(), j.contains("rope_scaling") ? " (scaled: " + j["rope_scaling"].dump() + ")" : "",
               j["tie_word_embeddings"].get<bool>() ? "yes" : "no", j["qk_norm"].get<bool>() ? "yes" : "no");
    if (j.contains("num_experts"))
      fmt::print("experts      {} (top-{}, norm_topk_prob {}, expert intermediate {})\n",
                 j["num_experts"].get<int64_t>(), j["num_experts_per_tok"].get<int64_t>(),
                 j["norm_topk_prob"].get<bool>(), j["moe_intermediate_size"].get<int64_t>());
    fmt::print("parameters   {} in {} tensors\n", j["parameters"].get<uint64_t>(), j["tensors"].get<size_t>());
    for (auto& [k, v] : j["parameters_by_kind"].items())
      fmt::print("  {:<14} {:>14}\n", k, v.get<uint64_t>());
    fmt::print("dtypes / formats (parameters)\n");
    for (auto& [k, v] : j["parameters_by_dtype"].items()) fmt::print("  {:<14} {:>14}\n", k, v.get<uint64_t>());
    fmt::print("shards\n");
    for (auto& s : j["shards"])
      fmt::print("  {:<40} {}\n", s["file"].get<std::string>(), format_bytes(s["bytes"].get<double>()));
    if (m.quantized()) {
      fmt::print("quantization {} — {} parameters quantized, {:.3f} bits/weight on average\n",
                 j["quant_method"].get<std::string>(), j["quantized_parameters"].get<uint64_t>(),
                 j["bits_per_weight_quantized"].get<double>());
      fmt::print("  {:<56} {:<14} {:>6} {:>6} {:>9} {}\n", "tensor", "shape", "format", "group", "bits/w", "rotation");
      for (auto& t : j["quantized_tensors"])
        fmt::print("  {:<56} {:<14} {:>6} {:>6} {:>9.3f} {}\n", t["name"].get<std::string>(),
                   shape_str(t["shape"].get<Shape>()), t["format"].get<std::string>() + (t["symmetric"].get<bool>() ? "" : "a"),
                   t["group_size"].get<int>(), t["bits_per_weight"].get<double>(),
                   t["rotation"].is_null() ? std::string("none") : t["rotation"].get<std::string>());
    }
    {
      size_t kept_rotated = 0;
      for (const auto& [mod, r] : m.rotations())
        if (!m.entry(mod + ".weight").format) ++kept_rotated;
      if (kept_rotated)
        fmt::print("rotations    {} unquantized module(s) stored in a rotated basis (W·R)\n", kept_rotated);
    }
    if (*all) {
      fmt::print("tensors\n");
      for (auto& t : j["tensor_list"])
        fmt::print("  {:<60} {:<16} {:<6} {}\n", t["name"].get<std::string>(), shape_str(t["shape"].get<Shape>()),
                   t["dtype"].get<std::string>(), t["format"].is_null() ? "" : t["format"].get<std::string>());
    }
    return 0;
  };
  return {sub, run};
}

}  // namespace calq::cli
