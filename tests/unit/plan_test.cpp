// Quantization plan: tensor classification, defaults, presets, --keep and --override.
#include <gtest/gtest.h>

#include "calq/core/error.h"
#include "calq/io/config.h"
#include "calq/pipeline/plan.h"

using namespace calq;
using namespace calq::pipeline;

namespace {

io::ModelConfig qwen3_cfg() {
  nlohmann::json j = {{"model_type", "qwen3"}, {"hidden_size", 256}, {"intermediate_size", 768},
                      {"num_hidden_layers", 1}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"head_dim", 64}, {"vocab_size", 1000}, {"max_position_embeddings", 128},
                      {"tie_word_embeddings", false}};
  return io::parse_config(j);
}

std::vector<TensorDesc> qwen3_tensors(int64_t inter = 768) {
  std::string p = "model.layers.0.";
  return {{"model.embed_tokens.weight", DType::BF16, {1000, 256}},
          {p + "input_layernorm.weight", DType::BF16, {256}},
          {p + "self_attn.q_proj.weight", DType::BF16, {256, 256}},
          {p + "self_attn.k_proj.weight", DType::BF16, {128, 256}},
          {p + "self_attn.v_proj.weight", DType::BF16, {128, 256}},
          {p + "self_attn.o_proj.weight", DType::BF16, {256, 256}},
          {p + "self_attn.q_norm.weight", DType::BF16, {64}},
          {p + "mlp.gate_proj.weight", DType::BF16, {inter, 256}},
          {p + "mlp.up_proj.weight", DType::BF16, {inter, 256}},
          {p + "mlp.down_proj.weight", DType::BF16, {256, inter}},
          {"model.norm.weight", DType::BF16, {256}},
          {"lm_head.weight", DType::BF16, {1000, 256}}};
}

const TensorPlan& find(const std::vector<TensorPlan>& plan, const std::string& name) {
  for (const auto& p : plan)
    if (p.name == name) return p;
  throw std::runtime_error("no " + name);
}

TEST(Plan, Classification) {
  auto a = io::Arch::Qwen3;
  EXPECT_EQ(classify_tensor("model.embed_tokens.weight", 2, a), TensorKind::Embedding);
  EXPECT_EQ(classify_tensor("lm_head.weight", 2, a), TensorKind::LmHead);
  EXPECT_EQ(classify_tensor("model.layers.3.input_layernorm.weight", 1, a), TensorKind::Norm);
  EXPECT_EQ(classify_tensor("model.layers.3.self_attn.k_norm.weight", 1, a), TensorKind::Norm);
  EXPECT_EQ(classify_tensor("model.layers.3.self_attn.q_proj.bias", 1, a), TensorKind::Bias);
  EXPECT_EQ(classify_tensor("model.layers.3.self_attn.v_proj.weight", 2, a), TensorKind::AttnQKV);
  EXPECT_EQ(classify_tensor("model.layers.3.self_attn.o_proj.weight", 2, a), TensorKind::AttnOut);
  EXPECT_EQ(classify_tensor("model.layers.3.mlp.up_proj.weight", 2, a), TensorKind::MlpGateUp);
  EXPECT_EQ(classify_tensor("model.layers.3.mlp.down_proj.weight", 2, a), TensorKind::MlpDown);
  auto m = io::Arch::Qwen3Moe;
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.gate.weight", 2, m), TensorKind::Router);
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.shared_expert_gate.weight", 2, m), TensorKind::SharedExpertGate);
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.experts.7.gate_proj.weight", 2, m), TensorKind::ExpertGateUp);
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.experts.7.down_proj.weight", 2, m), TensorKind::ExpertDown);
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.shared_expert.up_proj.weight", 2, m), TensorKind::SharedExpert);
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.experts.gate_up_proj", 3, m), TensorKind::FusedExperts);
  auto x = io::Arch::Mixtral;
  EXPECT_EQ(classify_tensor("model.layers.0.block_sparse_moe.gate.weight", 2, x), TensorKind::Router);
  EXPECT_EQ(classify_tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight", 2, x), TensorKind::ExpertDown);
  EXPECT_EQ(classify_tensor("model.layers.0.block_sparse_moe.experts.1.w3.weight", 2, x), TensorKind::ExpertGateUp);
  bool conv = false;
  auto g = io::Arch::Gpt2;
  EXPECT_EQ(classify_tensor("transformer.h.0.attn.c_attn.weight", 2, g, &conv), TensorKind::AttnQKV);
  EXPECT_TRUE(conv);
  EXPECT_EQ(classify_tensor("transformer.h.0.attn.c_proj.weight", 2, g, &conv), TensorKind::AttnOut);
  EXPECT_EQ(classify_tensor("transformer.h.0.mlp.c_proj.weight", 2, g, &conv), TensorKind::MlpDown);
  EXPECT_EQ(classify_tensor("transformer.wte.weight", 2, g, &conv), TensorKind::Embedding);
  EXPECT_FALSE(conv);
  EXPECT_EQ(classify_tensor("transformer.h.0.ln_1.weight", 1, g), TensorKind::Norm);
}

TEST(Plan, DefaultsKeepEmbeddingsHeadNorms) {
  PlanOptions o;
  o.format = quant::Format::parse("int4");
  auto plan = make_plan(qwen3_tensors(), qwen3_cfg(), o);
  for (const auto& p : plan) {
    bool linear = p.kind == TensorKind::AttnQKV || p.kind == TensorKind::AttnOut ||
                  p.kind == TensorKind::MlpGateUp || p.kind == TensorKind::MlpDown;
    EXPECT_EQ(p.format.has_value(), linear) << p.name;
    if (p.format) EXPECT_EQ(p.format->group_size, 128);
  }
  EXPECT_EQ(find(plan, "model.layers.0.self_attn.k_proj.weight").fuse_group,
            find(plan, "model.layers.0.self_attn.q_proj.weight").fuse_group);
  EXPECT_EQ(find(plan, "model.layers.0.mlp.up_proj.weight").fuse_group,
            find(plan, "model.layers.0.mlp.gate_proj.weight").fuse_group);
  EXPECT_TRUE(find(plan, "model.layers.0.mlp.down_proj.weight").fuse_group.empty());
}

TEST(Plan, PresetsKeepAndOverride) {
  PlanOptions o;
  o.format = quant::Format::parse("int4");
  o.preset = "quality";
  o.keep = {"o_proj"};
  o.overrides = {parse_override("down_proj$=int8:-1", true), parse_override("down=int2", true),
                 parse_override("lm_head=nvfp4", true)};
  auto plan = make_plan(qwen3_tensors(), qwen3_cfg(), o);
  EXPECT_EQ(find(plan, "model.layers.0.self_attn.q_proj.weight").format->group_size, 32);
  EXPECT_EQ(find(plan, "model.layers.0.mlp.gate_proj.weight").format->group_size, 128);
  EXPECT_FALSE(find(plan, "model.layers.0.self_attn.o_proj.weight").format.has_value());
  auto down = find(plan, "model.layers.0.mlp.down_proj.weight");
  ASSERT_TRUE(down.format.has_value());
  EXPECT_EQ(down.format->bits, 8);  // first matching override wins
  EXPECT_EQ(down.format->group_size, -1);
  ASSERT_TRUE(find(plan, "lm_head.weight").format.has_value());  // explicit override of a kept kind
  EXPECT_EQ(find(plan, "lm_head.weight").format->family, quant::Family::NVFP4);
  // Fixed-block formats are not regrouped by presets.
  o = PlanOptions();
  o.format = quant::Format::parse("mxfp4");
  o.preset = "speed";
  plan = make_plan(qwen3_tensors(), qwen3_cfg(), o);
  EXPECT_EQ(find(plan, "model.layers.0.self_attn.q_proj.weight").format->group_size, 32);
}

TEST(Plan, IndivisibleIsAnErrorOrKept) {
  PlanOptions o;
  o.format = quant::Format::parse("int4");
  try {
    make_plan(qwen3_tensors(200), qwen3_cfg(), o);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("model.layers.0.mlp.down_proj"), std::string::npos) << m;
    EXPECT_NE(m.find("--on-indivisible keep"), std::string::npos) << m;
  }
  o.on_indivisible = OnIndivisible::Keep;
  auto plan = make_plan(qwen3_tensors(200), qwen3_cfg(), o);
  EXPECT_FALSE(find(plan, "model.layers.0.mlp.down_proj.weight").format.has_value());
  EXPECT_TRUE(find(plan, "model.layers.0.mlp.up_proj.weight").format.has_value());
}

TEST(Plan, BadSpecs) {
  EXPECT_THROW(parse_override("nothing", true), Error);
  EXPECT_THROW(parse_override("x=int4:abc", true), Error);
  EXPECT_THROW(parse_override("([=int4", true), Error);
  EXPECT_THROW(parse_override("x=int7", true), Error);
  PlanOptions o;
  o.format = quant::Format::parse("int4");
  o.keep = {"(["};
  EXPECT_THROW(make_plan(qwen3_tensors(), qwen3_cfg(), o), Error);
  o.keep.clear();
  o.preset = "fastest";
  EXPECT_THROW(make_plan(qwen3_tensors(), qwen3_cfg(), o), Error);
}

}  // namespace
