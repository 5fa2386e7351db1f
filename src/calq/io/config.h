// Hugging Face config.json of the architectures calq runs.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace calq::io {

enum class Arch { Llama, Mistral, Qwen2, Qwen3, Qwen3Moe, Mixtral, Gpt2 };
std::string_view arch_name(Arch a);  // the HF model_type: "llama", "qwen3_moe", ...

struct RopeScaling {
  std::string type;            // "" when absent; "llama3", "linear", "yarn", "dynamic", ...
  double factor = 1.0;
  double low_freq_factor = 1.0;            // llama3
  double high_freq_factor = 4.0;           // llama3
  int64_t original_max_position_embeddings = 0;
  nlohmann::json raw;          // every field as given (yarn's beta_fast etc. preserved)
};

struct ModelConfig {
  Arch arch = Arch::Llama;
  std::string model_type;
  std::vector<std::string> architectures;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // dense MLP; 0 for a qwen3_moe without dense layers that omits it
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // absent: the transformers class default; null: = heads
  // head_dim: explicit; null or absent: hidden/heads (but absent for qwen3: 128, as transformers)
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;   // layer_norm_epsilon for gpt2
  double rope_theta = 10000.0;  // from rope_theta or rope_parameters.rope_theta
  RopeScaling rope_scaling;     // from rope_scaling or rope_parameters
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // qkv bias (qwen2 always true)
  bool mlp_bias = false;
  bool qk_norm = false;         // qwen3, qwen3_moe
  std::string hidden_act = "silu";
  std::optional<int64_t> sliding_window;
  std::optional<int64_t> bos_token_id, eos_token_id;
  std::string torch_dtype;      // "bfloat16", ... ("dtype" in transformers 5)
  // MoE
  int64_t num_experts = 0;          // num_experts or num_local_experts; 0 for dense
  int64_t num_experts_per_tok = 0;
  bool norm_topk_prob = false;
  int64_t moe_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  int64_t shared_expert_intermediate_size = 0;
  nlohmann::json raw;               // the whole file, written back unchanged

  bool is_moe() const { return num_experts > 0; }
  bool layer_is_sparse(int64_t layer) const;  // MoE layer per decoder_sparse_step/mlp_only_layers
};

// Parses and validates (positive sizes, heads dividing hidden, kv heads dividing heads, ...).
// Errors name the file and the key. Optional keys take the defaults of the transformers config
// class of the model_type; keys that fix tensor shapes are required.
ModelConfig parse_config(const nlohmann::json& j, const std::string& label = "config.json");
ModelConfig load_config(const std::filesystem::path& model_dir);
// Reads a JSON file (errors name the file).
nlohmann::json load_config_json(const std::filesystem::path& file);

}  // namespace calq::io
