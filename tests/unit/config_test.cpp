// config.json parsing: every supported architecture (inline configs, so nothing depends on
// ../shared), transformers' defaults, both RoPE spellings, MoE keys, validation errors, and the
// real configs under ../shared when present.
#include "calq/io/config.h"

#include <gtest/gtest.h>

#include "calq/core/error.h"
#include "support.h"

using namespace calq;
using namespace calq::io;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "wanted '" << (needle) << "' in: " << (haystack)

json dense(const std::string& type) {
  return {{"model_type", type},     {"hidden_size", 64},        {"intermediate_size", 128},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
          {"vocab_size", 100}};
}

json gpt2() {
  return {
      {"model_type", "gpt2"}, {"n_embd", 64}, {"n_layer", 2}, {"n_head", 4}, {"vocab_size", 50}};
}

json qwen3_moe() {
  json j = dense("qwen3_moe");
  j["num_experts"] = 8;
  j["num_experts_per_tok"] = 2;
  j["moe_intermediate_size"] = 32;
  return j;
}

// The error message of parse_config(j), or "" when it parses.
std::string error_of(const json& j) {
  try {
    parse_config(j, "my/config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, EveryArchitectureInline) {
  for (const char* t : {"llama", "mistral", "qwen2", "qwen3"}) {
    SCOPED_TRACE(t);
    auto c = parse_config(dense(t));
    EXPECT_EQ(c.model_type, t);
    EXPECT_EQ(arch_name(c.arch), t);
    EXPECT_EQ(c.hidden_size, 64);
    EXPECT_EQ(c.intermediate_size, 128);
    EXPECT_EQ(c.num_hidden_layers, 2);
    EXPECT_EQ(c.num_attention_heads, 4);
    EXPECT_EQ(c.num_key_value_heads, 2);
    EXPECT_EQ(c.vocab_size, 100);
    EXPECT_FALSE(c.is_moe());
    EXPECT_FALSE(c.layer_is_sparse(0));
    EXPECT_FALSE(c.tie_word_embeddings);  // every one of these config classes defaults to False
    EXPECT_EQ(c.hidden_act, "silu");
    EXPECT_EQ(c.raw, dense(t));
  }
  EXPECT_EQ(parse_config(dense("llama")).head_dim, 16);
  EXPECT_EQ(parse_config(dense("qwen3")).head_dim, 128);  // Qwen3Config's default, not derived
  EXPECT_TRUE(parse_config(dense("qwen3")).qk_norm);
  EXPECT_FALSE(parse_config(dense("llama")).qk_norm);

  auto m = parse_config(qwen3_moe());
  EXPECT_EQ(m.arch, Arch::Qwen3Moe);
  EXPECT_TRUE(m.qk_norm);
  EXPECT_EQ(m.head_dim, 16);  // Qwen3MoeConfig has no head_dim default: derived

  json x = dense("mixtral");
  x["num_local_experts"] = 4;
  auto cx = parse_config(x);
  EXPECT_EQ(cx.arch, Arch::Mixtral);
  EXPECT_EQ(cx.num_experts, 4);
  EXPECT_EQ(cx.num_experts_per_tok, 2);  // MixtralConfig default
  EXPECT_EQ(cx.moe_intermediate_size, 128);
  EXPECT_EQ(cx.rms_norm_eps, 1e-5);
  EXPECT_EQ(cx.rope_theta, 1e6);

  auto g = parse_config(gpt2());
  EXPECT_EQ(g.arch, Arch::Gpt2);
  EXPECT_EQ(g.hidden_size, 64);
  EXPECT_EQ(g.num_hidden_layers, 2);
  EXPECT_EQ(g.num_attention_heads, 4);
  EXPECT_EQ(g.num_key_value_heads, 4);
  EXPECT_EQ(g.head_dim, 16);
  EXPECT_EQ(g.intermediate_size, 256);  // n_inner absent -> 4 * n_embd
  EXPECT_EQ(g.max_position_embeddings, 1024);
  EXPECT_EQ(g.rms_norm_eps, 1e-5);
  EXPECT_EQ(g.hidden_act, "gelu_new");
  EXPECT_TRUE(g.tie_word_embeddings);
  EXPECT_TRUE(g.attention_bias);
  EXPECT_TRUE(g.mlp_bias);
  json g2 = gpt2();
  g2["n_inner"] = nullptr;
  g2["n_positions"] = 128;
  g2["layer_norm_epsilon"] = 1e-6;
  g2["activation_function"] = "gelu";
  g2["tie_word_embeddings"] = false;
  auto c2 = parse_config(g2);
  EXPECT_EQ(c2.intermediate_size, 256);
  EXPECT_EQ(c2.max_position_embeddings, 128);
  EXPECT_EQ(c2.rms_norm_eps, 1e-6);
  EXPECT_EQ(c2.hidden_act, "gelu");
  EXPECT_FALSE(c2.tie_word_embeddings);
  g2["n_inner"] = 100;
  EXPECT_EQ(parse_config(g2).intermediate_size, 100);
}

TEST(Config, TransformersDefaults) {
  // num_key_value_heads: absent -> the class default; null -> num_attention_heads.
  for (auto [type, kv] :
       std::vector<std::pair<std::string, int64_t>>{{"llama", 4}, {"mistral", 8}, {"qwen3", 32}}) {
    json j = dense(type);
    j["num_attention_heads"] = type == "llama" ? 4 : 32;
    j["hidden_size"] = type == "llama" ? 64 : 512;
    j.erase("num_key_value_heads");
    EXPECT_EQ(parse_config(j).num_key_value_heads, kv) << type;
    j["num_key_value_heads"] = nullptr;
    EXPECT_EQ(parse_config(j).num_key_value_heads, j["num_attention_heads"].get<int64_t>()) << type;
  }
  // An absent kv count that does not divide the heads says where the number came from.
  json q = dense("qwen3");
  q.erase("num_key_value_heads");
  EXPECT_HAS(error_of(q), "num_key_value_heads is absent; 32 is transformers' default for qwen3");

  // head_dim: explicit; null -> derived; absent -> derived except qwen3 (128).
  json h = dense("qwen3");
  h["head_dim"] = 32;
  EXPECT_EQ(parse_config(h).head_dim, 32);
  h["head_dim"] = nullptr;
  EXPECT_EQ(parse_config(h).head_dim, 16);
  json l = dense("llama");
  l["head_dim"] = 8;  // explicit head_dim need not divide hidden_size
  l["hidden_size"] = 60;
  EXPECT_EQ(parse_config(l).head_dim, 8);

  // Biases as the modeling code builds them.
  json b = dense("qwen2");
  b["attention_bias"] = false;
  EXPECT_TRUE(parse_config(b).attention_bias);  // Qwen2 always has q/k/v biases
  b = dense("mistral");
  b["attention_bias"] = true;
  EXPECT_FALSE(parse_config(b).attention_bias);  // Mistral has none, whatever the key says
  b = dense("llama");
  b["attention_bias"] = true;
  b["mlp_bias"] = true;
  EXPECT_TRUE(parse_config(b).attention_bias);
  EXPECT_TRUE(parse_config(b).mlp_bias);
  b = dense("qwen3");
  b["mlp_bias"] = true;  // not a Qwen3 option
  EXPECT_FALSE(parse_config(b).mlp_bias);

  // Norm epsilon, positions and RoPE base defaults.
  EXPECT_EQ(parse_config(dense("llama")).rms_norm_eps, 1e-6);
  EXPECT_EQ(parse_config(dense("llama")).max_position_embeddings, 2048);
  EXPECT_EQ(parse_config(dense("mistral")).max_position_embeddings, 131072);
  EXPECT_EQ(parse_config(dense("qwen2")).rope_theta, 10000.0);

  // Sliding windows.
  EXPECT_EQ(parse_config(dense("mistral")).sliding_window, 4096);  // MistralConfig default
  json s = dense("mistral");
  s["sliding_window"] = nullptr;
  EXPECT_FALSE(parse_config(s).sliding_window.has_value());
  s = dense("qwen2");
  s["sliding_window"] = 1024;
  EXPECT_FALSE(parse_config(s).sliding_window.has_value());  // use_sliding_window defaults to false
  s["use_sliding_window"] = true;
  EXPECT_EQ(parse_config(s).sliding_window, 1024);
  EXPECT_FALSE(parse_config(dense("llama")).sliding_window.has_value());

  // dtype (transformers 5) or torch_dtype; token ids.
  json d = dense("llama");
  d["torch_dtype"] = "float16";
  EXPECT_EQ(parse_config(d).torch_dtype, "float16");
  d["dtype"] = "bfloat16";
  EXPECT_EQ(parse_config(d).torch_dtype, "bfloat16");
  d["bos_token_id"] = 1;
  d["eos_token_id"] = json::array({2, 3});
  EXPECT_EQ(parse_config(d).bos_token_id, 1);
  EXPECT_FALSE(parse_config(d).eos_token_id.has_value());  // a list: see raw
  d["architectures"] = {"LlamaForCausalLM"};
  EXPECT_EQ(parse_config(d).architectures, std::vector<std::string>{"LlamaForCausalLM"});
  // Integral floats are integers.
  d["hidden_size"] = 64.0;
  EXPECT_EQ(parse_config(d).hidden_size, 64);
}

TEST(Config, RopeSpellings) {
  json a = dense("llama");
  a["rope_theta"] = 500000.0;
  a["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto c = parse_config(a);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);

  // transformers 5: rope_parameters holds rope_theta and the scaling.
  json b = dense("qwen3");
  b["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
  auto d = parse_config(b);
  EXPECT_EQ(d.rope_theta, 1e6);
  EXPECT_EQ(d.rope_scaling.type, "");
  b["rope_parameters"] = {{"rope_theta", 5e5},       {"rope_type", "llama3"},
                          {"factor", 32.0},          {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  d = parse_config(b);
  EXPECT_EQ(d.rope_theta, 5e5);
  EXPECT_EQ(d.rope_scaling.type, "llama3");
  EXPECT_EQ(d.rope_scaling.factor, 32.0);

  json y = dense("qwen2");
  y["rope_scaling"] = {{"type", "yarn"},
                       {"factor", 4.0},
                       {"beta_fast", 32},
                       {"original_max_position_embeddings", 4096}};
  auto e = parse_config(y);
  EXPECT_EQ(e.rope_scaling.type, "yarn");
  EXPECT_EQ(e.rope_scaling.factor, 4.0);
  EXPECT_EQ(e.rope_scaling.raw["beta_fast"], 32);  // kept as given
  json lin = dense("llama");
  lin["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_EQ(parse_config(lin).rope_scaling.type, "linear");
  EXPECT_EQ(parse_config(lin).rope_scaling.factor, 2.0);
  json none = dense("llama");
  none["rope_scaling"] = nullptr;
  EXPECT_EQ(parse_config(none).rope_scaling.type, "");

  // Incomplete or nonsensical scaling.
  json bad = a;
  bad["rope_scaling"].erase("low_freq_factor");
  EXPECT_HAS(error_of(bad), "rope_scaling: llama3 scaling needs 'low_freq_factor'");
  bad = a;
  bad["rope_scaling"]["high_freq_factor"] = 0.5;
  EXPECT_HAS(error_of(bad), "high_freq_factor");
  bad = lin;
  bad["rope_scaling"].erase("factor");
  EXPECT_HAS(error_of(bad), "linear scaling needs 'factor'");
  bad = lin;
  bad["rope_scaling"] = "linear";
  EXPECT_HAS(error_of(bad), "'rope_scaling' must be an object");
  bad = dense("qwen3");
  bad["rope_parameters"] = 1e6;
  EXPECT_HAS(error_of(bad), "'rope_parameters' must be an object");
  bad = dense("llama");
  bad["rope_theta"] = -1;
  EXPECT_HAS(error_of(bad), "rope_theta must be positive");
}

TEST(Config, MoeKeys) {
  json m = qwen3_moe();
  m["norm_topk_prob"] = true;
  m["decoder_sparse_step"] = 2;
  m["mlp_only_layers"] = {3};
  m["num_hidden_layers"] = 4;
  auto c = parse_config(m);
  EXPECT_TRUE(c.is_moe());
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_EQ(c.decoder_sparse_step, 2);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.layer_is_sparse(0));
  EXPECT_TRUE(c.layer_is_sparse(1));
  EXPECT_FALSE(c.layer_is_sparse(2));
  EXPECT_FALSE(c.layer_is_sparse(3));  // (3+1) % 2 == 0, but listed in mlp_only_layers
  EXPECT_FALSE(c.layer_is_sparse(-1));
  EXPECT_FALSE(c.layer_is_sparse(4));

  // Qwen3MoeConfig defaults: norm_topk_prob false, 8 experts per token, every layer sparse.
  json d = qwen3_moe();
  d.erase("num_experts_per_tok");
  d["num_experts"] = 16;
  auto cd = parse_config(d);
  EXPECT_FALSE(cd.norm_topk_prob);
  EXPECT_EQ(cd.num_experts_per_tok, 8);
  EXPECT_EQ(cd.decoder_sparse_step, 1);
  EXPECT_TRUE(cd.layer_is_sparse(0) && cd.layer_is_sparse(1));
  // All layers sparse: intermediate_size is not needed.
  d.erase("intermediate_size");
  EXPECT_EQ(parse_config(d).intermediate_size, 0);
  // ... but it is as soon as one layer is dense.
  d["mlp_only_layers"] = {0};
  EXPECT_HAS(error_of(d), "missing required key 'intermediate_size'");
  d["mlp_only_layers"] = nullptr;  // null -> []
  EXPECT_EQ(error_of(d), "");
  // The other spelling of the expert count (transformers 5 maps the two onto each other).
  json alt = qwen3_moe();
  alt.erase("num_experts");
  alt["num_local_experts"] = 6;
  EXPECT_EQ(parse_config(alt).num_experts, 6);
  json mx = dense("mixtral");
  mx["num_experts"] = 4;
  mx["norm_topk_prob"] = false;  // not a Mixtral option: it always renormalises
  auto cm = parse_config(mx);
  EXPECT_EQ(cm.num_experts, 4);
  EXPECT_TRUE(cm.norm_topk_prob);
  EXPECT_TRUE(cm.layer_is_sparse(0) && cm.layer_is_sparse(1));
  json sh = qwen3_moe();
  sh["shared_expert_intermediate_size"] = 48;
  EXPECT_EQ(parse_config(sh).shared_expert_intermediate_size, 48);

  // Errors.
  json e = qwen3_moe();
  e["num_experts_per_tok"] = 9;
  EXPECT_HAS(error_of(e), "num_experts_per_tok 9 exceeds the number of experts 8");
  e = qwen3_moe();
  e.erase("num_experts");
  EXPECT_HAS(error_of(e), "missing required key 'num_experts'");
  e = qwen3_moe();
  e.erase("moe_intermediate_size");
  EXPECT_HAS(error_of(e), "missing required key 'moe_intermediate_size'");
  e = qwen3_moe();
  e["mlp_only_layers"] = {7};
  EXPECT_HAS(error_of(e), "mlp_only_layers entry 7 is not a layer index");
  e = qwen3_moe();
  e["decoder_sparse_step"] = 0;
  EXPECT_HAS(error_of(e), "'decoder_sparse_step' must be positive");
  e = dense("mixtral");
  EXPECT_HAS(error_of(e), "missing required key 'num_local_experts'");
  e["num_local_experts"] = 0;
  EXPECT_HAS(error_of(e), "'num_local_experts' must be positive");
}

TEST(Config, Errors) {
  struct Case {
    std::string what;
    json j;
    std::string needle;
  };
  auto without = [](json j, const char* k) {
    j.erase(k);
    return j;
  };
  auto with = [](json j, const char* k, json v) {
    j[k] = std::move(v);
    return j;
  };
  const std::vector<Case> cases = {
      {"not an object", json::array(), "not a JSON object"},
      {"unknown type", with(dense("llama"), "model_type", "deepseek_v3"),
       "unsupported model_type 'deepseek_v3' (supported: llama, mistral, qwen2, qwen3, qwen3_moe, "
       "mixtral, gpt2)"},
      {"no type", without(dense("llama"), "model_type"), "missing 'model_type' (supported: llama"},
      {"type not string", with(dense("llama"), "model_type", 3), "'model_type' must be a string"},
      {"no hidden_size", without(dense("llama"), "hidden_size"),
       "missing required key 'hidden_size'"},
      {"no vocab", without(dense("qwen3"), "vocab_size"), "missing required key 'vocab_size'"},
      {"no layers", without(dense("qwen2"), "num_hidden_layers"),
       "missing required key 'num_hidden_layers'"},
      {"no heads", without(dense("mistral"), "num_attention_heads"),
       "missing required key 'num_attention_heads'"},
      {"no intermediate", without(dense("llama"), "intermediate_size"),
       "missing required key 'intermediate_size'"},
      {"null hidden", with(dense("llama"), "hidden_size", nullptr),
       "missing required key 'hidden_size'"},
      {"no n_embd", without(gpt2(), "n_embd"), "missing required key 'n_embd'"},
      {"zero vocab", with(dense("llama"), "vocab_size", 0), "'vocab_size' must be positive, got 0"},
      {"negative layers", with(dense("llama"), "num_hidden_layers", -2),
       "'num_hidden_layers' must be positive"},
      {"zero kv", with(dense("llama"), "num_key_value_heads", 0),
       "'num_key_value_heads' must be positive"},
      {"zero head_dim", with(dense("qwen3"), "head_dim", 0), "'head_dim' must be positive"},
      {"huge hidden", with(dense("llama"), "hidden_size", int64_t{1} << 40), "implausibly large"},
      {"above int64", with(dense("llama"), "hidden_size", ~uint64_t{0}), "out of range"},
      {"heads not dividing", with(dense("llama"), "num_attention_heads", 5),
       "hidden_size 64 is not divisible by num_attention_heads 5"},
      {"gpt2 heads not dividing", with(gpt2(), "n_head", 5),
       "n_embd 64 is not divisible by n_head 5"},
      {"kv not dividing", with(dense("llama"), "num_key_value_heads", 3),
       "num_key_value_heads 3 must divide num_attention_heads 4"},
      {"string size", with(dense("llama"), "hidden_size", "big"),
       "'hidden_size' must be an integer"},
      {"fractional size", with(dense("llama"), "hidden_size", 64.5),
       "'hidden_size' must be an integer"},
      {"bool not bool", with(dense("llama"), "tie_word_embeddings", "yes"),
       "'tie_word_embeddings' must be true or false"},
      {"eps not number", with(dense("llama"), "rms_norm_eps", "1e-6"),
       "'rms_norm_eps' must be a number"},
      {"eps zero", with(dense("llama"), "rms_norm_eps", 0.0), "epsilon must be positive"},
      {"act not string", with(dense("llama"), "hidden_act", 1), "'hidden_act' must be a string"},
      {"architectures", with(dense("llama"), "architectures", "Llama"),
       "'architectures' must be a list"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    std::string e = error_of(c.j);
    ASSERT_FALSE(e.empty()) << "accepted: " << c.j.dump();
    EXPECT_HAS(e, c.needle);
    EXPECT_HAS(e, "my/config.json");
  }
}

TEST(Config, LoadFromFiles) {
  calq_test::TempDir tmp;
  calq_test::write_file(tmp / "config.json", dense("qwen2").dump());
  EXPECT_EQ(load_config(tmp.path()).arch, Arch::Qwen2);
  EXPECT_EQ(load_config(tmp / "config.json").arch, Arch::Qwen2);
  EXPECT_EQ(load_config(tmp / "model.safetensors").arch, Arch::Qwen2);  // its directory's config
  calq_test::write_file(tmp / "config.json", "{\"model_type\": ");
  try {
    load_config(tmp.path());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), (tmp / "config.json").string());
    EXPECT_HAS(e.what(), "not valid JSON");
  }
  calq_test::write_file(tmp / "config.json", dense("falcon").dump());
  try {
    load_config(tmp.path());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), (tmp / "config.json").string() + ": unsupported model_type 'falcon'");
  }
  fs::remove(tmp / "config.json");
  try {
    load_config(tmp.path());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), (tmp / "config.json").string());
  }
  EXPECT_THROW(load_config_json(tmp.path()), Error);  // a directory
  // The tiny configs committed with the tests.
  const fs::path data = calq_test::source_dir() / "tests/data/configs";
  auto q = parse_config(load_config_json(data / "tiny-qwen3.json"));
  EXPECT_EQ(q.arch, Arch::Qwen3);
  EXPECT_EQ(q.head_dim, 64);
  EXPECT_TRUE(q.tie_word_embeddings);
  auto g = parse_config(load_config_json(data / "tiny-gpt2.json"));
  EXPECT_EQ(g.arch, Arch::Gpt2);
  EXPECT_EQ(g.intermediate_size, 512);
  EXPECT_EQ(g.max_position_embeddings, 256);
}

TEST(Config, RealConfigs) {
  const fs::path dir = calq_test::shared_file("data/configs");
  if (dir.empty()) GTEST_SKIP() << "missing " << calq_test::shared_dir() / "data/configs";
  struct Want {
    std::string name;
    Arch arch;
    int64_t layers, hidden, inter, heads, kv, head_dim, vocab, experts, per_tok;
    bool tied;
    double theta;
  };
  const std::vector<Want> want = {
      {"Qwen3-0.6B", Arch::Qwen3, 28, 1024, 3072, 16, 8, 128, 151936, 0, 0, true, 1e6},
      {"Qwen3-1.7B", Arch::Qwen3, 28, 2048, 6144, 16, 8, 128, 151936, 0, 0, true, 1e6},
      {"Qwen3-8B", Arch::Qwen3, 36, 4096, 12288, 32, 8, 128, 151936, 0, 0, false, 1e6},
      {"Qwen3-30B-A3B", Arch::Qwen3Moe, 48, 2048, 6144, 32, 4, 128, 151936, 128, 8, false, 1e6},
      {"Qwen3-235B-A22B", Arch::Qwen3Moe, 94, 4096, 12288, 64, 4, 128, 151936, 128, 8, false, 5e6},
      {"Llama-3.1-8B", Arch::Llama, 32, 4096, 14336, 32, 8, 128, 128256, 0, 0, false, 5e5},
      {"Llama-3.2-1B", Arch::Llama, 16, 2048, 8192, 32, 8, 64, 128256, 0, 0, true, 5e5},
      {"Mixtral-8x7B-v0.1", Arch::Mixtral, 32, 4096, 14336, 32, 8, 128, 32000, 8, 2, false, 1e6},
      {"gpt2", Arch::Gpt2, 12, 768, 3072, 12, 12, 64, 50257, 0, 0, true, 10000.0},
  };
  for (const auto& w : want) {
    SCOPED_TRACE(w.name);
    const fs::path p = dir / w.name;
    if (!fs::exists(p / "config.json")) {
      ADD_FAILURE() << "missing " << p / "config.json";
      continue;
    }
    auto c = load_config(p);
    EXPECT_EQ(c.arch, w.arch);
    EXPECT_EQ(c.num_hidden_layers, w.layers);
    EXPECT_EQ(c.hidden_size, w.hidden);
    EXPECT_EQ(c.intermediate_size, w.inter);
    EXPECT_EQ(c.num_attention_heads, w.heads);
    EXPECT_EQ(c.num_key_value_heads, w.kv);
    EXPECT_EQ(c.head_dim, w.head_dim);
    EXPECT_EQ(c.vocab_size, w.vocab);
    EXPECT_EQ(c.num_experts, w.experts);
    EXPECT_EQ(c.num_experts_per_tok, w.per_tok);
    EXPECT_EQ(c.tie_word_embeddings, w.tied);
    EXPECT_EQ(c.rope_theta, w.theta);
    EXPECT_EQ(c.qk_norm, w.arch == Arch::Qwen3 || w.arch == Arch::Qwen3Moe);
    EXPECT_EQ(c.torch_dtype, w.arch == Arch::Gpt2 ? "float32" : "bfloat16");
    EXPECT_FALSE(c.sliding_window.has_value());
    EXPECT_FALSE(c.architectures.empty());
  }
  auto moe = load_config(dir / "Qwen3-30B-A3B");
  EXPECT_EQ(moe.moe_intermediate_size, 768);
  EXPECT_TRUE(moe.norm_topk_prob);
  for (int64_t l = 0; l < moe.num_hidden_layers; ++l) EXPECT_TRUE(moe.layer_is_sparse(l)) << l;
  auto mx = load_config(dir / "Mixtral-8x7B-v0.1");
  EXPECT_TRUE(mx.norm_topk_prob);
  EXPECT_EQ(mx.rms_norm_eps, 1e-5);
  auto l31 = load_config(dir / "Llama-3.1-8B");
  EXPECT_EQ(l31.rope_scaling.type, "llama3");
  EXPECT_EQ(l31.rope_scaling.factor, 8.0);
  EXPECT_EQ(l31.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(l31.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(l31.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(l31.max_position_embeddings, 131072);
  EXPECT_EQ(load_config(dir / "Llama-3.2-1B").rope_scaling.factor, 32.0);
  EXPECT_EQ(load_config(dir / "gpt2").hidden_act, "gelu_new");
  if (fs::exists(dir / "DeepSeek-V3/config.json")) {
    try {
      load_config(dir / "DeepSeek-V3");
      ADD_FAILURE() << "DeepSeek-V3 accepted";
    } catch (const Error& e) {
      EXPECT_HAS(e.what(),
                 "DeepSeek-V3/config.json: unsupported model_type 'deepseek_v3' (supported: llama");
    }
  }
}

TEST(Config, SharedModelConfigs) {
  const fs::path dir = calq_test::shared_file("data/models");
  if (dir.empty()) GTEST_SKIP() << "missing " << calq_test::shared_dir() / "data/models";
  for (const char* name : {"bench-qwen3-16m", "bench-qwen3-28m", "stories260K-hf"})
    if (!fs::exists(dir / name / "config.json"))
      GTEST_SKIP() << "missing " << dir / name / "config.json";
  // Written by transformers 5: rope_parameters and dtype.
  auto b16 = load_config(dir / "bench-qwen3-16m");
  EXPECT_EQ(b16.arch, Arch::Qwen3);
  EXPECT_EQ(b16.rope_theta, 1e6);
  EXPECT_EQ(b16.rope_scaling.type, "");
  EXPECT_EQ(b16.torch_dtype, "bfloat16");
  EXPECT_TRUE(b16.tie_word_embeddings);
  EXPECT_EQ(b16.num_attention_heads, 6);
  EXPECT_EQ(b16.num_key_value_heads, 2);
  EXPECT_EQ(b16.head_dim, 64);
  auto b28 = load_config(dir / "bench-qwen3-28m");
  EXPECT_EQ(b28.hidden_size, 512);
  EXPECT_EQ(b28.intermediate_size, 1536);
  auto st = load_config(dir / "stories260K-hf");
  EXPECT_EQ(st.arch, Arch::Llama);
  EXPECT_EQ(st.num_hidden_layers, 5);
  EXPECT_EQ(st.head_dim, 8);
  EXPECT_EQ(st.intermediate_size, 172);
  EXPECT_EQ(st.rms_norm_eps, 1e-5);
  EXPECT_EQ(st.torch_dtype, "float32");
}

}  // namespace
