// config.json parsing. Defaults follow the transformers configuration classes of each model_type
// (configuration_llama.py, ..._mistral, ..._qwen2, ..._qwen3, ..._qwen3_moe, ..._mixtral,
// ..._gpt2), so a config means here what it means when transformers loads it. Keys that fix tensor
// shapes (sizes, layer and expert counts) are required instead: a config without them is not a
// checkpoint's config, and guessing would only move the error to a confusing shape mismatch.
#include "calq/io/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "calq/core/error.h"

namespace calq::io {

using nlohmann::json;

std::string_view arch_name(Arch a) {
  switch (a) {
    case Arch::Llama:
      return "llama";
    case Arch::Mistral:
      return "mistral";
    case Arch::Qwen2:
      return "qwen2";
    case Arch::Qwen3:
      return "qwen3";
    case Arch::Qwen3Moe:
      return "qwen3_moe";
    case Arch::Mixtral:
      return "mixtral";
    case Arch::Gpt2:
      return "gpt2";
  }
  return "?";
}

namespace {

constexpr Arch kArchs[] = {Arch::Llama,    Arch::Mistral, Arch::Qwen2, Arch::Qwen3,
                           Arch::Qwen3Moe, Arch::Mixtral, Arch::Gpt2};

std::string supported_list() {
  std::string s;
  for (Arch a : kArchs) s += (s.empty() ? "" : ", ") + std::string(arch_name(a));
  return s;
}

// Upper bounds on sizes. Far beyond any real model, but small enough that products of two tensor
// dimensions, and expert count x two dimensions, stay well inside int64 for the code downstream.
constexpr int64_t kMaxDim = int64_t{1} << 21;    // hidden, intermediate, vocab, heads, head_dim
constexpr int64_t kMaxCount = int64_t{1} << 16;  // layers, experts
constexpr int64_t kMaxPositions = int64_t{1} << 40;

// The transformers defaults that differ between the architectures.
struct ArchDefaults {
  int64_t kv_heads;  // 0: = num_attention_heads
  int64_t head_dim;  // 0: hidden_size / num_attention_heads
  int64_t max_positions;
  double eps;
  double rope_theta;
};

ArchDefaults defaults_of(Arch a) {
  switch (a) {
    case Arch::Llama:
      return {0, 0, 2048, 1e-6, 10000.0};
    case Arch::Mistral:
      return {8, 0, 4096 * 32, 1e-6, 10000.0};
    case Arch::Qwen2:
      return {32, 0, 32768, 1e-6, 10000.0};
    case Arch::Qwen3:
      return {32, 128, 32768, 1e-6, 10000.0};  // Qwen3Config: head_dim=128
    case Arch::Qwen3Moe:
      return {4, 0, 32768, 1e-6, 10000.0};
    case Arch::Mixtral:
      return {8, 0, 4096 * 32, 1e-5, 1e6};
    case Arch::Gpt2:
      return {0, 0, 1024, 1e-5, 10000.0};
  }
  return {0, 0, 2048, 1e-6, 10000.0};
}

// Typed access to one JSON object, with errors that name the file (and section) and the key.
// A key whose value is null counts as absent, as in transformers (None -> default).
class Keys {
 public:
  Keys(const json& j, std::string label) : j_(j), label_(std::move(label)) {}
  const std::string& label() const { return label_; }

  const json* get(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const char* key) const { return get(key) != nullptr; }
  bool present(const char* key) const { return j_.contains(key); }  // even when null

  int64_t integer(const char* key, std::optional<int64_t> dflt) const {
    const json* v = get(key);
    if (!v) {
      CALQ_CHECK(dflt.has_value(), "{}: missing required key '{}'", label_, key);
      return *dflt;
    }
    if (v->is_number_unsigned()) {
      CALQ_CHECK(v->get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max()),
                 "{}: '{}' is out of range: {}", label_, key, v->dump());
      return static_cast<int64_t>(v->get<uint64_t>());
    }
    if (v->is_number_integer()) return v->get<int64_t>();
    // Some exporters write 4096.0; accept floats that hold an exact, modest integer.
    if (v->is_number_float()) {
      double d = v->get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.007199254740992e15)
        return static_cast<int64_t>(d);
    }
    fail("{}: '{}' must be an integer, got {}", label_, key, v->dump());
  }

  // A positive integer no larger than `max`.
  int64_t size(const char* key, std::optional<int64_t> dflt, int64_t max) const {
    int64_t v = integer(key, dflt);
    CALQ_CHECK(v > 0, "{}: '{}' must be positive, got {}", label_, key, v);
    CALQ_CHECK(v <= max, "{}: '{}' = {} is implausibly large (limit {})", label_, key, v, max);
    return v;
  }

  double number(const char* key, double dflt) const {
    const json* v = get(key);
    if (!v) return dflt;
    CALQ_CHECK(v->is_number(), "{}: '{}' must be a number, got {}", label_, key, v->dump());
    double d = v->get<double>();
    CALQ_CHECK(std::isfinite(d), "{}: '{}' must be finite, got {}", label_, key, v->dump());
    return d;
  }

  bool boolean(const char* key, bool dflt) const {
    const json* v = get(key);
    if (!v) return dflt;
    CALQ_CHECK(v->is_boolean(), "{}: '{}' must be true or false, got {}", label_, key, v->dump());
    return v->get<bool>();
  }

  std::string string(const char* key, std::string dflt) const {
    const json* v = get(key);
    if (!v) return dflt;
    CALQ_CHECK(v->is_string(), "{}: '{}' must be a string, got {}", label_, key, v->dump());
    return v->get<std::string>();
  }

  // An id that may also be a list (eos_token_id of Llama 3 instruct models): nullopt for a list.
  std::optional<int64_t> token_id(const char* key) const {
    const json* v = get(key);
    if (!v || v->is_array()) return std::nullopt;
    return integer(key, std::nullopt);
  }

 private:
  const json& j_;
  std::string label_;
};

// rope_scaling (transformers <= 4) or rope_parameters (transformers 5); both carry the scaling
// type as "rope_type" (older files: "type") and its parameters.
void parse_rope(const Keys& k, const json& obj, RopeScaling& out) {
  out.raw = obj;
  std::string type = k.string("rope_type", k.string("type", ""));
  if (type == "default") type.clear();
  out.type = type;
  out.factor = k.number("factor", 1.0);
  out.low_freq_factor = k.number("low_freq_factor", 1.0);
  out.high_freq_factor = k.number("high_freq_factor", 4.0);
  if (k.has("original_max_position_embeddings"))
    out.original_max_position_embeddings =
        k.size("original_max_position_embeddings", std::nullopt, kMaxPositions);
  if (type == "linear" || type == "dynamic" || type == "yarn" || type == "llama3" ||
      type == "longrope") {
    CALQ_CHECK(type == "longrope" || k.has("factor"), "{}: {} scaling needs 'factor'", k.label(),
               type);
    CALQ_CHECK(out.factor > 0, "{}: 'factor' must be positive, got {}", k.label(), out.factor);
  }
  if (type == "llama3") {
    // transformers rejects llama3 scaling without these; defaults would silently change the model.
    for (const char* key :
         {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      CALQ_CHECK(k.has(key), "{}: llama3 scaling needs '{}'", k.label(), key);
    CALQ_CHECK(out.high_freq_factor > out.low_freq_factor,
               "{}: llama3 scaling needs high_freq_factor ({}) > low_freq_factor ({})", k.label(),
               out.high_freq_factor, out.low_freq_factor);
  }
}

}  // namespace

bool ModelConfig::layer_is_sparse(int64_t layer) const {
  if (!is_moe() || layer < 0 || layer >= num_hidden_layers) return false;
  if (arch == Arch::Mixtral) return true;
  // parse_config keeps mlp_only_layers sorted and unique.
  if (std::binary_search(mlp_only_layers.begin(), mlp_only_layers.end(), layer)) return false;
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

ModelConfig parse_config(const json& j, const std::string& label) {
  CALQ_CHECK(j.is_object(), "{}: not a JSON object", label);
  const Keys k(j, label);
  ModelConfig c;
  c.raw = j;
  CALQ_CHECK(k.has("model_type"), "{}: missing 'model_type' (supported: {})", label,
             supported_list());
  c.model_type = k.string("model_type", "");
  bool known = false;
  for (Arch a : kArchs)
    if (c.model_type == arch_name(a)) {
      c.arch = a;
      known = true;
    }
  CALQ_CHECK(known, "{}: unsupported model_type '{}' (supported: {})", label, c.model_type,
             supported_list());
  const ArchDefaults def = defaults_of(c.arch);

  if (const json* a = k.get("architectures")) {
    CALQ_CHECK(a->is_array(), "{}: 'architectures' must be a list of strings", label);
    for (const auto& s : *a) {
      CALQ_CHECK(s.is_string(), "{}: 'architectures' must be a list of strings", label);
      c.architectures.push_back(s.get<std::string>());
    }
  }
  // transformers 5 writes "dtype"; older versions "torch_dtype".
  c.torch_dtype = k.string("dtype", k.string("torch_dtype", ""));
  c.bos_token_id = k.token_id("bos_token_id");
  c.eos_token_id = k.token_id("eos_token_id");

  if (c.arch == Arch::Gpt2) {
    c.vocab_size = k.size("vocab_size", std::nullopt, kMaxDim);
    c.hidden_size = k.size("n_embd", std::nullopt, kMaxDim);
    c.num_hidden_layers = k.size("n_layer", std::nullopt, kMaxCount);
    c.num_attention_heads = k.size("n_head", std::nullopt, kMaxDim);
    c.num_key_value_heads = c.num_attention_heads;
    // n_positions is a tensor dimension here (the wpe table), so it gets the tensor limit.
    c.max_position_embeddings = k.size("n_positions", def.max_positions, kMaxDim);
    c.intermediate_size = k.size("n_inner", 4 * c.hidden_size, kMaxDim);  // null -> 4 * n_embd
    c.rms_norm_eps = k.number("layer_norm_epsilon", def.eps);
    c.hidden_act = k.string("activation_function", "gelu_new");
    c.tie_word_embeddings = k.boolean("tie_word_embeddings", true);  // PretrainedConfig default
    c.attention_bias = true;  // GPT-2 has biases on every projection
    c.mlp_bias = true;
    CALQ_CHECK(c.hidden_size % c.num_attention_heads == 0,
               "{}: n_embd {} is not divisible by n_head {}", label, c.hidden_size,
               c.num_attention_heads);
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    c.vocab_size = k.size("vocab_size", std::nullopt, kMaxDim);
    c.hidden_size = k.size("hidden_size", std::nullopt, kMaxDim);
    c.num_hidden_layers = k.size("num_hidden_layers", std::nullopt, kMaxCount);
    c.num_attention_heads = k.size("num_attention_heads", std::nullopt, kMaxDim);
    // Absent -> the class default (which is not always "= heads"); explicit null -> heads.
    const int64_t kv_default = k.present("num_key_value_heads") || def.kv_heads == 0
                                   ? c.num_attention_heads
                                   : def.kv_heads;
    c.num_key_value_heads = k.size("num_key_value_heads", kv_default, kMaxDim);
    // head_dim: explicit; or, when null (or absent where the class has no default), derived.
    if (k.has("head_dim")) {
      c.head_dim = k.size("head_dim", std::nullopt, kMaxDim);
    } else if (!k.present("head_dim") && def.head_dim > 0) {
      c.head_dim = def.head_dim;
    } else {
      CALQ_CHECK(c.hidden_size % c.num_attention_heads == 0,
                 "{}: hidden_size {} is not divisible by num_attention_heads {} (and no head_dim "
                 "is given)",
                 label, c.hidden_size, c.num_attention_heads);
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    c.max_position_embeddings = k.size("max_position_embeddings", def.max_positions, kMaxPositions);
    c.rms_norm_eps = k.number("rms_norm_eps", def.eps);
    c.hidden_act = k.string("hidden_act", "silu");
    c.tie_word_embeddings = k.boolean("tie_word_embeddings", false);
    // Which projections have biases, as the transformers modeling code builds them.
    switch (c.arch) {
      case Arch::Qwen2:
        c.attention_bias = true;
        break;  // q/k/v biases regardless of the key
      case Arch::Mistral:
      case Arch::Mixtral:
        c.attention_bias = false;
        break;  // key ignored there
      default:
        c.attention_bias = k.boolean("attention_bias", false);
        break;
    }
    c.mlp_bias = c.arch == Arch::Llama && k.boolean("mlp_bias", false);
    c.qk_norm = c.arch == Arch::Qwen3 || c.arch == Arch::Qwen3Moe;

    // RoPE: rope_theta (+ rope_scaling) in transformers <= 4, rope_parameters in transformers 5.
    c.rope_theta = k.number("rope_theta", def.rope_theta);
    if (const json* rp = k.get("rope_parameters")) {
      CALQ_CHECK(rp->is_object(), "{}: 'rope_parameters' must be an object", label);
      const Keys rk(*rp, label + ": rope_parameters");
      c.rope_theta = rk.number("rope_theta", c.rope_theta);
      parse_rope(rk, *rp, c.rope_scaling);
    }
    if (const json* rs = k.get("rope_scaling")) {
      CALQ_CHECK(rs->is_object(), "{}: 'rope_scaling' must be an object", label);
      parse_rope(Keys(*rs, label + ": rope_scaling"), *rs, c.rope_scaling);
    }
    CALQ_CHECK(c.rope_theta > 0, "{}: rope_theta must be positive, got {}", label, c.rope_theta);

    // Sliding-window attention, as each config class resolves it.
    std::optional<int64_t> window;
    if (c.arch == Arch::Mistral) {
      window = k.present("sliding_window") ? std::optional<int64_t>() : 4096;  // absent -> 4096
      if (k.has("sliding_window")) window = k.size("sliding_window", std::nullopt, kMaxPositions);
    } else if (c.arch == Arch::Mixtral) {
      if (k.has("sliding_window")) window = k.size("sliding_window", std::nullopt, kMaxPositions);
    } else if (c.arch != Arch::Llama && k.boolean("use_sliding_window", false)) {
      if (k.has("sliding_window"))
        window = k.size("sliding_window", std::nullopt, kMaxPositions);
      else if (!k.present("sliding_window"))
        window = 4096;  // the class default; null stays off
    }
    c.sliding_window = window;

    if (c.arch == Arch::Qwen3Moe || c.arch == Arch::Mixtral) {
      const bool mixtral = c.arch == Arch::Mixtral;
      // transformers 5 maps num_experts <-> num_local_experts (attribute_map), so a config saved
      // by it may use the other spelling; accept both for both architectures.
      const char* primary = mixtral ? "num_local_experts" : "num_experts";
      const char* other = mixtral ? "num_experts" : "num_local_experts";
      c.num_experts =
          k.size(k.has(primary) || !k.has(other) ? primary : other, std::nullopt, kMaxCount);
      c.num_experts_per_tok = k.size("num_experts_per_tok", mixtral ? 2 : 8, kMaxCount);
      CALQ_CHECK(c.num_experts_per_tok <= c.num_experts,
                 "{}: num_experts_per_tok {} exceeds the number of experts {}", label,
                 c.num_experts_per_tok, c.num_experts);
      // Mixtral always renormalises the top-k routing weights; Qwen3-MoE only with the flag.
      c.norm_topk_prob = mixtral || k.boolean("norm_topk_prob", false);
      if (mixtral) {
        c.intermediate_size = k.size("intermediate_size", std::nullopt, kMaxDim);
        c.moe_intermediate_size = c.intermediate_size;
      } else {
        c.moe_intermediate_size = k.size("moe_intermediate_size", std::nullopt, kMaxDim);
        c.decoder_sparse_step = k.size("decoder_sparse_step", 1, kMaxCount);
        if (const json* m = k.get("mlp_only_layers")) {
          CALQ_CHECK(m->is_array(), "{}: 'mlp_only_layers' must be a list of layer indices", label);
          for (const auto& l : *m) {
            CALQ_CHECK(
                l.is_number_integer() && l.get<int64_t>() >= 0 &&
                    l.get<int64_t>() < c.num_hidden_layers,
                "{}: mlp_only_layers entry {} is not a layer index (the model has {} layers)",
                label, l.dump(), c.num_hidden_layers);
            c.mlp_only_layers.push_back(l.get<int64_t>());
          }
          std::sort(c.mlp_only_layers.begin(), c.mlp_only_layers.end());
          c.mlp_only_layers.erase(std::unique(c.mlp_only_layers.begin(), c.mlp_only_layers.end()),
                                  c.mlp_only_layers.end());
        }
        const int64_t shared = k.integer("shared_expert_intermediate_size", 0);
        CALQ_CHECK(shared >= 0 && shared <= kMaxDim,
                   "{}: 'shared_expert_intermediate_size' is out of range: {}", label, shared);
        c.shared_expert_intermediate_size = shared;
        // intermediate_size only shapes the dense layers; require it only when there are some.
        bool any_dense = false;
        for (int64_t l = 0; l < c.num_hidden_layers && !any_dense; ++l)
          any_dense = !c.layer_is_sparse(l);
        if (any_dense || k.has("intermediate_size"))
          c.intermediate_size = k.size("intermediate_size", std::nullopt, kMaxDim);
      }
    } else {
      c.intermediate_size = k.size("intermediate_size", std::nullopt, kMaxDim);
    }
  }

  CALQ_CHECK(c.rms_norm_eps > 0, "{}: the norm epsilon must be positive, got {}", label,
             c.rms_norm_eps);
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    fail("{}: num_key_value_heads {} must divide num_attention_heads {}{}", label,
         c.num_key_value_heads, c.num_attention_heads,
         k.present("num_key_value_heads")
             ? ""
             : fmt::format(" (num_key_value_heads is absent; {} is transformers' default for {})",
                           c.num_key_value_heads, c.model_type));
  }
  return c;
}

json load_config_json(const std::filesystem::path& file) {
  std::error_code ec;
  CALQ_CHECK(!std::filesystem::is_directory(file, ec), "{}: is a directory, not a JSON file",
             file.string());
  std::ifstream in(file, std::ios::binary);
  CALQ_CHECK(in.good(), "{}: cannot open (is this a model directory with a config.json?)",
             file.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", file.string(), e.what());
  }
}

ModelConfig load_config(const std::filesystem::path& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file;
  if (fs::is_directory(model_dir, ec))
    file = model_dir / "config.json";
  else if (model_dir.extension() == ".json")
    file = model_dir;  // the config file itself
  else
    file = model_dir.parent_path() / "config.json";  // e.g. a .safetensors path
  return parse_config(load_config_json(file), file.string());
}

}  // namespace calq::io
