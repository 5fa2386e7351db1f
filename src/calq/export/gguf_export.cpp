#include "calq/export/gguf_export.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <map>

#include "calq/calib/stats.h"
#include "calq/core/dtype.h"
#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/export/native.h"

namespace calq::gguf_export {

namespace fs = std::filesystem;
using nlohmann::json;
using io::GgufValue;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  CALQ_CHECK(in, "cannot open {}", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", p.string(), e.what());
  }
}

// The pre-tokenizer regexes of the tokenizers llama.cpp knows, as tokenizer.json spells them.
const char* kQwen2Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
const char* kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

std::string token_id_of(const json& tok_json, const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return {};
}

}  // namespace

std::string detect_pre_tokenizer(const fs::path& tj) {
  const json t = read_json(tj);
  const json& pre = t.value("pre_tokenizer", json());
  if (!pre.is_object()) return {};
  const std::string type = pre.value("type", "");
  if (type == "ByteLevel" && pre.value("use_regex", true)) return "gpt-2";
  if (type == "Sequence" && pre.contains("pretokenizers") && pre["pretokenizers"].is_array()) {
    for (auto& p : pre["pretokenizers"]) {
      if (p.value("type", "") != "Split" || !p.contains("pattern")) continue;
      const std::string rx = p["pattern"].value("Regex", "");
      if (rx == kQwen2Regex) return "qwen2";
      if (rx == kLlama3Regex) return "llama-bpe";
    }
  }
  return {};
}

void export_model(const fs::path& dir, const fs::path& out, const Options& o) {
  auto m = native::Model::open(dir);
  const io::ModelConfig& c = m.config();
  std::string arch;
  bool permute_qk = false;
  switch (c.arch) {
    case io::Arch::Llama: arch = "llama"; permute_qk = true; break;
    case io::Arch::Mistral: arch = "llama"; permute_qk = true; break;
    case io::Arch::Qwen2: arch = "qwen2"; break;
    case io::Arch::Qwen3: arch = "qwen3"; break;
    default: fail("GGUF export supports llama, mistral, qwen2 and qwen3 models; {} is not supported yet", c.model_type);
  }
  CALQ_CHECK(c.rope_scaling.type.empty() || c.rope_scaling.type == "default" || c.rope_scaling.type == "linear",
             "GGUF export: rope scaling '{}' is not supported yet", c.rope_scaling.type);
  CALQ_CHECK(o.outtype == io::GgmlType::F32 || o.outtype == io::GgmlType::F16 || o.outtype == io::GgmlType::BF16,
             "GGUF export writes F32, F16 or BF16 weights");
  const fs::path tj = dir / "tokenizer.json";
  CALQ_CHECK(fs::exists(tj), "GGUF export needs {} (a byte-level BPE tokenizer.json)", tj.string());
  const json tok = read_json(tj);
  CALQ_CHECK(tok.contains("model") && tok["model"].value("type", "") == "BPE",
             "{}: GGUF export supports BPE tokenizers (model.type BPE) only", tj.string());
  std::string pre = o.pre.empty() ? detect_pre_tokenizer(tj) : o.pre;
  CALQ_CHECK(!pre.empty(),
             "{}: calq does not recognise this pre-tokenizer; pass --pre with the llama.cpp name (qwen2, llama-bpe, "
             "gpt-2, ...)",
             tj.string());

  // Vocabulary in id order; ids without a token become [PAD<i>] (UNUSED), as llama.cpp pads.
  const int64_t V = c.vocab_size;
  std::vector<std::string> tokens(static_cast<size_t>(V));
  std::vector<int32_t> types(static_cast<size_t>(V), 0);
  std::map<std::string, int64_t> id_of;
  for (auto& [s, id] : tok["model"]["vocab"].items()) {
    const int64_t i = id.get<int64_t>();
    CALQ_CHECK(i >= 0 && i < V, "{}: token id {} outside vocab_size {}", tj.string(), i, V);
    tokens[static_cast<size_t>(i)] = s;
    types[static_cast<size_t>(i)] = 1;  // NORMAL
    id_of[s] = i;
  }
  for (auto& a : tok.value("added_tokens", json::array())) {
    const int64_t i = a.at("id").get<int64_t>();
    CALQ_CHECK(i >= 0 && i < V, "{}: added token id {} outside vocab_size {}", tj.string(), i, V);
    tokens[static_cast<size_t>(i)] = a.at("content").get<std::string>();
    types[static_cast<size_t>(i)] = a.value("special", false) ? 3 : 4;  // CONTROL or USER_DEFINED
    id_of[tokens[static_cast<size_t>(i)]] = i;
  }
  for (int64_t i = 0; i < V; ++i)
    if (types[static_cast<size_t>(i)] == 0) {
      tokens[static_cast<size_t>(i)] = "[PAD" + std::to_string(i) + "]";
      types[static_cast<size_t>(i)] = 5;  // UNUSED
    }
  std::vector<std::string> merges;
  for (auto& mg : tok["model"].value("merges", json::array())) {
    if (mg.is_string()) merges.push_back(mg.get<std::string>());
    else if (mg.is_array() && mg.size() == 2) merges.push_back(mg[0].get<std::string>() + " " + mg[1].get<std::string>());
    else fail("{}: a merges entry is neither \"a b\" nor [a, b]", tj.string());
  }

  io::GgufWriter w;
  w.set("general.architecture", GgufValue::str(arch));
  w.set("general.type", GgufValue::str("model"));
  w.set("general.name", GgufValue::str(fs::absolute(dir).filename().string()));
  w.set("general.file_type", GgufValue::u32(o.outtype == io::GgmlType::F32 ? 0 : o.outtype == io::GgmlType::F16 ? 1 : 32));
  w.set("general.quantization_version", GgufValue::u32(2));
  const std::string A = arch + ".";
  w.set(A + "block_count", GgufValue::u32(static_cast<uint32_t>(c.num_hidden_layers)));
  w.set(A + "context_length", GgufValue::u32(static_cast<uint32_t>(c.max_position_embeddings)));
  w.set(A + "embedding_length", GgufValue::u32(static_cast<uint32_t>(c.hidden_size)));
  w.set(A + "feed_forward_length", GgufValue::u32(static_cast<uint32_t>(c.intermediate_size)));
  w.set(A + "attention.head_count", GgufValue::u32(static_cast<uint32_t>(c.num_attention_heads)));
  w.set(A + "attention.head_count_kv", GgufValue::u32(static_cast<uint32_t>(c.num_key_value_heads)));
  w.set(A + "rope.freq_base", GgufValue::f32(static_cast<float>(c.rope_theta)));
  w.set(A + "attention.layer_norm_rms_epsilon", GgufValue::f32(static_cast<float>(c.rms_norm_eps)));
  w.set(A + "attention.key_length", GgufValue::u32(static_cast<uint32_t>(c.head_dim)));
  w.set(A + "attention.value_length", GgufValue::u32(static_cast<uint32_t>(c.head_dim)));
  if (permute_qk) w.set(A + "rope.dimension_count", GgufValue::u32(static_cast<uint32_t>(c.head_dim)));
  if (c.rope_scaling.type == "linear") {
    w.set(A + "rope.scaling.type", GgufValue::str("linear"));
    w.set(A + "rope.scaling.factor", GgufValue::f32(static_cast<float>(c.rope_scaling.factor)));
  }
  w.set("tokenizer.ggml.model", GgufValue::str("gpt2"));
  w.set("tokenizer.ggml.pre", GgufValue::str(pre));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array(tokens));
  w.set("tokenizer.ggml.token_type", GgufValue::i32_array(types));
  w.set("tokenizer.ggml.merges", GgufValue::str_array(merges));
  // Special tokens: tokenizer_config.json first, then config.json's *_token_id.
  json tc = fs::exists(dir / "tokenizer_config.json") ? read_json(dir / "tokenizer_config.json") : json::object();
  for (const char* kind : {"bos", "eos", "pad", "unk"}) {
    int64_t id = -1;
    const std::string key = std::string(kind) + "_token";
    if (tc.contains(key)) {
      const std::string s = token_id_of(tok, tc[key]);
      if (!s.empty() && id_of.count(s)) id = id_of[s];
    }
    if (id < 0 && c.raw.contains(key + "_id") && c.raw[key + "_id"].is_number_integer())
      id = c.raw[key + "_id"].get<int64_t>();
    if (id >= 0 && id < V)
      w.set(std::string("tokenizer.ggml.") + (std::string(kind) == "pad" ? "padding" : kind) + "_token_id",
            GgufValue::u32(static_cast<uint32_t>(id)));
  }
  if (tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean())
    w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(tc["add_bos_token"].get<bool>()));
  if (tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean())
    w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(tc["add_eos_token"].get<bool>()));
  if (tc.contains("chat_template") && tc["chat_template"].is_string())
    w.set("tokenizer.chat_template", GgufValue::str(tc["chat_template"].get<std::string>()));

  // Tensors, in the checkpoint's order of names (layers by index).
  std::vector<const native::Entry*> order;
  for (auto& e : m.entries()) order.push_back(&e);
  uint64_t total_bytes = 0;
  for (auto* e : order) {
    const auto g = calib::gguf_tensor_name(e->name, c.arch);
    CALQ_CHECK(!g.name.empty() && g.expert < 0, "GGUF export: no llama.cpp tensor for {}", e->name);
    const bool vec = e->shape.size() == 1;
    const io::GgmlType t = vec ? io::GgmlType::F32 : o.outtype;
    std::vector<int64_t> ne(e->shape.rbegin(), e->shape.rend());
    int64_t heads = 0;
    if (permute_qk && e->name.find("self_attn.q_proj.") != std::string::npos) heads = c.num_attention_heads;
    if (permute_qk && e->name.find("self_attn.k_proj.") != std::string::npos) heads = c.num_key_value_heads;
    total_bytes += io::ggml_nbytes(t, static_cast<uint64_t>(shape_numel(e->shape)));
    const std::string name = e->name;
    w.add_tensor(g.name, ne, t, [&m, name, t, heads, shape = e->shape](std::vector<char>& b) {
      std::vector<float> v = m.load_f32_unrotated(name);  // rotated modules: Ŵ = Q·Rᵀ
      if (heads > 0) {
        // llama.cpp's LLaMA rope pairs (i, i + d/2) of each head as adjacent rows: row
        // h·d + a·d/2 + j moves to h·d + 2j + a.
        const int64_t rows = shape[0], cols = shape.size() > 1 ? shape[1] : 1, d = rows / heads;
        std::vector<float> p(v.size());
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t a = 0; a < 2; ++a)
            for (int64_t j = 0; j < d / 2; ++j) {
              const int64_t src = h * d + a * (d / 2) + j, dst = h * d + 2 * j + a;
              std::copy(v.begin() + src * cols, v.begin() + (src + 1) * cols, p.begin() + dst * cols);
            }
        v.swap(p);
      }
      if (t == io::GgmlType::F32) {
        b.assign(reinterpret_cast<const char*>(v.data()), reinterpret_cast<const char*>(v.data() + v.size()));
      } else {
        b.resize(v.size() * 2);
        from_f32(v.data(), t == io::GgmlType::F16 ? DType::F16 : DType::BF16, b.data(), v.size());
      }
    });
  }
  log_info("writing {} ({} tensors, {}; pre-tokenizer {})", out.string(), order.size(),
           format_bytes(static_cast<double>(total_bytes)), pre);
  w.write(out);
}

}  // namespace calq::gguf_export
