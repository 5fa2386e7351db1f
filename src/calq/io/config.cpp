#include "calq/io/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "calq/core/error.h"

namespace calq::io {

using nlohmann::json;

std::string_view arch_name(Arch a) {
  switch (a) {
    case Arch::Llama: return "llama";
    case Arch::Mistral: return "mistral";
    case Arch::Qwen2: return "qwen2";
    case Arch::Qwen3: return "qwen3";
    case Arch::Qwen3Moe: return "qwen3_moe";
    case Arch::Mixtral: return "mixtral";
    case Arch::Gpt2: return "gpt2";
  }
  return "?";
}

namespace {

// Reads an integer key; `required` keys must be present and non-null.
int64_t get_int(const json& j, const std::string& key, const std::string& label, std::optional<int64_t> dflt) {
  if (!j.contains(key) || j[key].is_null()) {
    CALQ_CHECK(dflt.has_value(), "{}: missing required key '{}'", label, key);
    return *dflt;
  }
  const auto& v = j[key];
  CALQ_CHECK(v.is_number_integer() || (v.is_number_float() && v.get<double>() == std::floor(v.get<double>())),
             "{}: '{}' must be an integer, got {}", label, key, v.dump());
  return v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(v.get<double>());
}

double get_num(const json& j, const std::string& key, const std::string& label, double dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  CALQ_CHECK(j[key].is_number(), "{}: '{}' must be a number, got {}", label, key, j[key].dump());
  return j[key].get<double>();
}

bool get_bool(const json& j, const std::string& key, const std::string& label, bool dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  CALQ_CHECK(j[key].is_boolean(), "{}: '{}' must be true or false, got {}", label, key, j[key].dump());
  return j[key].get<bool>();
}

std::optional<int64_t> get_opt_int(const json& j, const std::string& key, const std::string& label) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  if (j[key].is_array()) return std::nullopt;  // e.g. several eos ids: not needed here
  return get_int(j, key, label, std::nullopt);
}

void parse_rope_scaling(const json& rs, RopeScaling& out, const std::string& label) {
  if (rs.is_null()) return;
  CALQ_CHECK(rs.is_object(), "{}: rope scaling must be an object", label);
  out.raw = rs;
  std::string type = rs.value("rope_type", rs.value("type", std::string()));
  if (type == "default") type.clear();
  out.type = type;
  out.factor = get_num(rs, "factor", label, 1.0);
  out.low_freq_factor = get_num(rs, "low_freq_factor", label, 1.0);
  out.high_freq_factor = get_num(rs, "high_freq_factor", label, 4.0);
  out.original_max_position_embeddings = get_int(rs, "original_max_position_embeddings", label, 0);
  if (type == "llama3")
    CALQ_CHECK(out.factor > 0 && out.original_max_position_embeddings > 0 && out.high_freq_factor > out.low_freq_factor,
               "{}: llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 and "
               "high_freq_factor > low_freq_factor", label);
}

}  // namespace

bool ModelConfig::layer_is_sparse(int64_t layer) const {
  if (!is_moe()) return false;
  if (arch == Arch::Mixtral) return true;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

ModelConfig parse_config(const json& j, const std::string& label) {
  CALQ_CHECK(j.is_object(), "{}: not a JSON object", label);
  ModelConfig c;
  c.raw = j;
  CALQ_CHECK(j.contains("model_type") && j["model_type"].is_string(),
             "{}: missing 'model_type' (supported: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gpt2)", label);
  c.model_type = j["model_type"].get<std::string>();
  static const std::pair<const char*, Arch> kArchs[] = {
      {"llama", Arch::Llama}, {"mistral", Arch::Mistral}, {"qwen2", Arch::Qwen2},  {"qwen3", Arch::Qwen3},
      {"qwen3_moe", Arch::Qwen3Moe}, {"mixtral", Arch::Mixtral}, {"gpt2", Arch::Gpt2}};
  bool known = false;
  for (const auto& [n, a] : kArchs)
    if (c.model_type == n) {
      c.arch = a;
      known = true;
    }
  CALQ_CHECK(known, "{}: unsupported model_type '{}' (supported: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gpt2)",
             label, c.model_type);
  if (j.contains("architectures") && j["architectures"].is_array())
    for (const auto& a : j["architectures"])
      if (a.is_string()) c.architectures.push_back(a.get<std::string>());
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) c.torch_dtype = j["torch_dtype"];
  else if (j.contains("dtype") && j["dtype"].is_string()) c.torch_dtype = j["dtype"];
  c.bos_token_id = get_opt_int(j, "bos_token_id", label);
  c.eos_token_id = get_opt_int(j, "eos_token_id", label);

  if (c.arch == Arch::Gpt2) {
    c.vocab_size = get_int(j, "vocab_size", label, std::nullopt);
    c.hidden_size = get_int(j, "n_embd", label, std::nullopt);
    c.num_hidden_layers = get_int(j, "n_layer", label, std::nullopt);
    c.num_attention_heads = get_int(j, "n_head", label, std::nullopt);
    c.num_key_value_heads = c.num_attention_heads;
    c.max_position_embeddings = get_int(j, "n_positions", label, 1024);
    c.intermediate_size = get_int(j, "n_inner", label, 4 * c.hidden_size);
    c.rms_norm_eps = get_num(j, "layer_norm_epsilon", label, 1e-5);
    c.hidden_act = j.value("activation_function", std::string("gelu_new"));
    c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", label, true);
    c.attention_bias = true;
    c.mlp_bias = true;
    CALQ_CHECK(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0,
               "{}: n_embd {} is not divisible by n_head {}", label, c.hidden_size, c.num_attention_heads);
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    c.vocab_size = get_int(j, "vocab_size", label, std::nullopt);
    c.hidden_size = get_int(j, "hidden_size", label, std::nullopt);
    c.num_hidden_layers = get_int(j, "num_hidden_layers", label, std::nullopt);
    c.num_attention_heads = get_int(j, "num_attention_heads", label, std::nullopt);
    c.num_key_value_heads = get_int(j, "num_key_value_heads", label, c.num_attention_heads);
    c.intermediate_size = get_int(j, "intermediate_size", label, c.arch == Arch::Qwen3Moe ? 0 : std::optional<int64_t>());
    c.max_position_embeddings = get_int(j, "max_position_embeddings", label, 2048);
    c.rms_norm_eps = get_num(j, "rms_norm_eps", label, 1e-6);
    c.hidden_act = j.value("hidden_act", std::string("silu"));
    c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", label, false);
    c.attention_bias = get_bool(j, "attention_bias", label, false);
    if (c.arch == Arch::Qwen2) c.attention_bias = true;  // Qwen2 always has q/k/v biases
    c.mlp_bias = get_bool(j, "mlp_bias", label, false);
    c.qk_norm = c.arch == Arch::Qwen3 || c.arch == Arch::Qwen3Moe;
    CALQ_CHECK(c.num_attention_heads > 0, "{}: num_attention_heads must be positive", label);
    if (j.contains("head_dim") && !j["head_dim"].is_null()) {
      c.head_dim = get_int(j, "head_dim", label, std::nullopt);
    } else {
      CALQ_CHECK(c.hidden_size % c.num_attention_heads == 0,
                 "{}: hidden_size {} is not divisible by num_attention_heads {} (and no head_dim is given)", label,
                 c.hidden_size, c.num_attention_heads);
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    // RoPE: transformers <= 4 (rope_theta + rope_scaling) or 5 (rope_parameters).
    c.rope_theta = get_num(j, "rope_theta", label, 10000.0);
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
      const auto& rp = j["rope_parameters"];
      c.rope_theta = get_num(rp, "rope_theta", label + ": rope_parameters", c.rope_theta);
      parse_rope_scaling(rp, c.rope_scaling, label + ": rope_parameters");
    }
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
      parse_rope_scaling(j["rope_scaling"], c.rope_scaling, label + ": rope_scaling");
    if (j.contains("sliding_window") && j["sliding_window"].is_number_integer() &&
        get_bool(j, "use_sliding_window", label, c.arch == Arch::Mistral || c.arch == Arch::Mixtral))
      c.sliding_window = j["sliding_window"].get<int64_t>();
    if (c.arch == Arch::Qwen3Moe || c.arch == Arch::Mixtral) {
      c.num_experts = c.arch == Arch::Mixtral ? get_int(j, "num_local_experts", label, std::nullopt)
                                              : get_int(j, "num_experts", label, std::nullopt);
      c.num_experts_per_tok = get_int(j, "num_experts_per_tok", label, 2);
      c.norm_topk_prob = c.arch == Arch::Mixtral ? true : get_bool(j, "norm_topk_prob", label, false);
      c.moe_intermediate_size = c.arch == Arch::Mixtral ? c.intermediate_size
                                                        : get_int(j, "moe_intermediate_size", label, std::nullopt);
      c.decoder_sparse_step = get_int(j, "decoder_sparse_step", label, 1);
      if (j.contains("mlp_only_layers") && j["mlp_only_layers"].is_array())
        for (const auto& l : j["mlp_only_layers"]) {
          CALQ_CHECK(l.is_number_integer(), "{}: mlp_only_layers must hold integers", label);
          c.mlp_only_layers.push_back(l.get<int64_t>());
        }
      c.shared_expert_intermediate_size = get_int(j, "shared_expert_intermediate_size", label, 0);
      CALQ_CHECK(c.num_experts > 0, "{}: the number of experts must be positive", label);
      CALQ_CHECK(c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.num_experts,
                 "{}: num_experts_per_tok {} must be between 1 and the number of experts {}", label,
                 c.num_experts_per_tok, c.num_experts);
      CALQ_CHECK(c.moe_intermediate_size > 0, "{}: moe_intermediate_size must be positive", label);
      CALQ_CHECK(c.decoder_sparse_step > 0, "{}: decoder_sparse_step must be positive", label);
    }
  }
  CALQ_CHECK(c.vocab_size > 0, "{}: vocab_size must be positive, got {}", label, c.vocab_size);
  CALQ_CHECK(c.hidden_size > 0, "{}: hidden size must be positive, got {}", label, c.hidden_size);
  CALQ_CHECK(c.num_hidden_layers > 0, "{}: number of layers must be positive, got {}", label, c.num_hidden_layers);
  CALQ_CHECK(c.head_dim > 0, "{}: head_dim must be positive", label);
  CALQ_CHECK(c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0,
             "{}: num_key_value_heads {} must divide num_attention_heads {}", label, c.num_key_value_heads,
             c.num_attention_heads);
  CALQ_CHECK(c.intermediate_size > 0 || c.is_moe(), "{}: intermediate_size must be positive", label);
  CALQ_CHECK(c.max_position_embeddings > 0, "{}: max_position_embeddings must be positive", label);
  return c;
}

json load_config_json(const std::filesystem::path& file) {
  std::ifstream in(file);
  CALQ_CHECK(in.good(), "{}: cannot open (is this a model directory with a config.json?)", file.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", file.string(), e.what());
  }
}

ModelConfig load_config(const std::filesystem::path& model_dir) {
  std::filesystem::path dir = std::filesystem::is_directory(model_dir) ? model_dir : model_dir.parent_path();
  std::filesystem::path file = dir / "config.json";
  return parse_config(load_config_json(file), file.string());
}

}  // namespace calq::io
