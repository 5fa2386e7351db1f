// The tensor list of each architecture follows what the transformers modeling code builds,
// including which projections carry biases.
#include "calq/model/layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "calq/io/config.h"

namespace {

using nlohmann::json;

json base(const std::string& type) {
  return {{"model_type", type},          {"hidden_size", 64},   {"intermediate_size", 128},
          {"num_hidden_layers", 2},      {"num_attention_heads", 4}, {"num_key_value_heads", 2},
          {"vocab_size", 100},           {"head_dim", 16},      {"max_position_embeddings", 256}};
}

std::vector<std::string> names(const json& j) {
  std::vector<std::string> out;
  for (auto& t : calq::model::expected_tensors(calq::io::parse_config(j))) out.push_back(t.name);
  return out;
}

bool has(const std::vector<std::string>& v, const std::string& n) {
  return std::find(v.begin(), v.end(), n) != v.end();
}

TEST(Layout, LlamaAttentionAndMlpBias) {
  auto j = base("llama");
  auto plain = names(j);
  EXPECT_FALSE(has(plain, "model.layers.0.self_attn.q_proj.bias"));
  EXPECT_FALSE(has(plain, "model.layers.0.self_attn.o_proj.bias"));
  EXPECT_TRUE(has(plain, "lm_head.weight"));
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  j["tie_word_embeddings"] = true;
  auto b = names(j);
  for (auto m : {"q_proj", "k_proj", "v_proj", "o_proj"})
    EXPECT_TRUE(has(b, std::string("model.layers.1.self_attn.") + m + ".bias")) << m;
  for (auto m : {"gate_proj", "up_proj", "down_proj"})
    EXPECT_TRUE(has(b, std::string("model.layers.1.mlp.") + m + ".bias")) << m;
  EXPECT_FALSE(has(b, "lm_head.weight"));
  EXPECT_EQ(b.size(), plain.size() + 2 * 7 - 1);
}

TEST(Layout, Qwen2HasQkvBiasOnly) {
  auto n = names(base("qwen2"));
  EXPECT_TRUE(has(n, "model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(has(n, "model.layers.0.self_attn.v_proj.bias"));
  EXPECT_FALSE(has(n, "model.layers.0.self_attn.o_proj.bias"));
}

TEST(Layout, Qwen3AttentionBiasIncludesOProj) {
  auto j = base("qwen3");
  j["attention_bias"] = true;
  auto n = names(j);
  EXPECT_TRUE(has(n, "model.layers.0.self_attn.o_proj.bias"));
  EXPECT_TRUE(has(n, "model.layers.0.self_attn.q_norm.weight"));
  EXPECT_FALSE(has(n, "model.layers.0.mlp.gate_proj.bias"));  // mlp_bias is llama's only
}

}  // namespace
