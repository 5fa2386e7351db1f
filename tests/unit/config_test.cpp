// config.json parsing of every supported architecture, both RoPE spellings, MoE keys, and errors.
#include <gtest/gtest.h>

#include "calq/core/error.h"
#include "calq/io/config.h"
#include "calq/model/layout.h"
#include "support.h"

using namespace calq;
using namespace calq::io;
using nlohmann::json;

namespace {

json base() {
  return {{"model_type", "llama"}, {"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 2},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 100}};
}

TEST(Config, RopeSpellings) {
  json a = base();
  a["rope_theta"] = 500000.0;
  a["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto c = parse_config(a);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  json b = base();
  b["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
  auto d = parse_config(b);
  EXPECT_EQ(d.rope_theta, 1e6);
  EXPECT_EQ(d.rope_scaling.type, "");
  json y = base();
  y["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"beta_fast", 32}, {"original_max_position_embeddings", 4096}};
  auto e = parse_config(y);
  EXPECT_EQ(e.rope_scaling.type, "yarn");
  EXPECT_EQ(e.rope_scaling.raw["beta_fast"], 32);  // preserved
  EXPECT_EQ(e.head_dim, 16);
  EXPECT_FALSE(e.tie_word_embeddings);
}

TEST(Config, ArchitectureDefaults) {
  json q2 = base();
  q2["model_type"] = "qwen2";
  EXPECT_TRUE(parse_config(q2).attention_bias);
  json q3 = base();
  q3["model_type"] = "qwen3";
  q3["head_dim"] = 32;
  auto c3 = parse_config(q3);
  EXPECT_TRUE(c3.qk_norm);
  EXPECT_EQ(c3.head_dim, 32);
  json g = {{"model_type", "gpt2"}, {"n_embd", 64}, {"n_layer", 2}, {"n_head", 4}, {"vocab_size", 50}, {"n_inner", nullptr}};
  auto cg = parse_config(g);
  EXPECT_EQ(cg.intermediate_size, 256);
  EXPECT_TRUE(cg.tie_word_embeddings);
  EXPECT_EQ(cg.max_position_embeddings, 1024);
  auto t = model::expected_tensors(cg);
  EXPECT_EQ(t.front().name, "transformer.wte.weight");
  EXPECT_EQ(t.size(), 2 + 2 * 12 + 2u);
}

TEST(Config, MoeKeys) {
  json m = base();
  m["model_type"] = "qwen3_moe";
  m["num_experts"] = 8;
  m["num_experts_per_tok"] = 2;
  m["moe_intermediate_size"] = 32;
  m["norm_topk_prob"] = true;
  m["decoder_sparse_step"] = 2;
  m["mlp_only_layers"] = {3};
  m["num_hidden_layers"] = 4;
  auto c = parse_config(m);
  EXPECT_TRUE(c.is_moe());
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.layer_is_sparse(0));
  EXPECT_TRUE(c.layer_is_sparse(1));
  EXPECT_FALSE(c.layer_is_sparse(2));
  EXPECT_FALSE(c.layer_is_sparse(3));  // mlp_only_layers
  auto t = model::expected_tensors(c);
  size_t experts = 0;
  for (const auto& e : t) experts += e.name.find(".experts.") != std::string::npos;
  EXPECT_EQ(experts, 8u * 3);  // one sparse layer
  json x = base();
  x["model_type"] = "mixtral";
  x["num_local_experts"] = 4;
  x["num_experts_per_tok"] = 2;
  auto cx = parse_config(x);
  EXPECT_EQ(cx.num_experts, 4);
  EXPECT_TRUE(cx.norm_topk_prob);
  EXPECT_TRUE(cx.layer_is_sparse(0));
  x["num_experts_per_tok"] = 5;
  EXPECT_THROW(parse_config(x), Error);
}

TEST(Config, Errors) {
  auto expect_err = [](json j, const std::string& needle) {
    try {
      parse_config(j, "my/config.json");
      ADD_FAILURE() << "no error for " << j.dump();
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find(needle), std::string::npos) << m;
      EXPECT_NE(m.find("my/config.json"), std::string::npos) << m;
    }
  };
  json j = base();
  j["model_type"] = "deepseek_v3";
  expect_err(j, "deepseek_v3");
  j = base();
  j.erase("model_type");
  expect_err(j, "model_type");
  j = base();
  j.erase("hidden_size");
  expect_err(j, "hidden_size");
  j = base();
  j["num_key_value_heads"] = 3;
  expect_err(j, "num_key_value_heads");
  j = base();
  j["num_attention_heads"] = 5;
  expect_err(j, "divisible");
  j = base();
  j["vocab_size"] = 0;
  expect_err(j, "vocab_size");
  j = base();
  j["hidden_size"] = "big";
  expect_err(j, "hidden_size");
}

TEST(Config, RealConfigs) {
  auto dir = calq_test::shared_file("data/configs");
  if (dir.empty()) GTEST_SKIP() << "../shared/data/configs not present";
  struct Want {
    std::string name;
    Arch arch;
    int64_t layers, hidden, head_dim, kv, experts;
    bool tied;
  };
  std::vector<Want> want = {
      {"Qwen3-0.6B", Arch::Qwen3, 28, 1024, 128, 8, 0, true},
      {"Qwen3-8B", Arch::Qwen3, 36, 4096, 128, 8, 0, false},
      {"Qwen3-30B-A3B", Arch::Qwen3Moe, 48, 2048, 128, 4, 128, false},
      {"Llama-3.1-8B", Arch::Llama, 32, 4096, 128, 8, 0, false},
      {"Llama-3.2-1B", Arch::Llama, 16, 2048, 64, 8, 0, true},
      {"Mixtral-8x7B-v0.1", Arch::Mixtral, 32, 4096, 128, 8, 8, false},
      {"gpt2", Arch::Gpt2, 12, 768, 64, 12, 0, true},
  };
  for (const auto& w : want) {
    auto c = load_config(dir / w.name);
    EXPECT_EQ(c.arch, w.arch) << w.name;
    EXPECT_EQ(c.num_hidden_layers, w.layers) << w.name;
    EXPECT_EQ(c.hidden_size, w.hidden) << w.name;
    EXPECT_EQ(c.head_dim, w.head_dim) << w.name;
    EXPECT_EQ(c.num_key_value_heads, w.kv) << w.name;
    EXPECT_EQ(c.num_experts, w.experts) << w.name;
    EXPECT_EQ(c.tie_word_embeddings, w.tied) << w.name;
  }
  auto l31 = load_config(dir / "Llama-3.1-8B");
  EXPECT_EQ(l31.rope_scaling.type, "llama3");
  EXPECT_EQ(l31.rope_scaling.factor, 8.0);
  EXPECT_THROW(load_config(dir / "DeepSeek-V3"), Error);
  auto m = calq_test::shared_file("data/models/bench-qwen3-28m");
  if (!m.empty()) {
    auto c = load_config(m);
    EXPECT_EQ(c.rope_theta, 1e6);  // transformers-5 rope_parameters
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_EQ(c.torch_dtype, "bfloat16");
  }
}

}  // namespace
