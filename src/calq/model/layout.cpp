#include "calq/model/layout.h"

#include "calq/core/error.h"

namespace calq::model {

std::vector<ExpectedTensor> expected_tensors(const io::ModelConfig& c) {
  std::vector<ExpectedTensor> t;
  auto add = [&](std::string name, Shape shape) { t.push_back({std::move(name), std::move(shape), false, false}); };
  auto norm = [&](std::string name, int64_t n) { t.push_back({std::move(name), {n}, true, false}); };
  auto bias = [&](std::string name, int64_t n) { t.push_back({std::move(name), {n}, false, true}); };
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  if (c.arch == io::Arch::Gpt2) {
    const int64_t I = c.intermediate_size;
    add("transformer.wte.weight", {V, H});
    add("transformer.wpe.weight", {c.max_position_embeddings, H});
    for (int64_t l = 0; l < L; ++l) {
      std::string p = "transformer.h." + std::to_string(l) + ".";
      norm(p + "ln_1.weight", H);
      bias(p + "ln_1.bias", H);
      add(p + "attn.c_attn.weight", {H, 3 * H});  // Conv1D: [in, out]
      bias(p + "attn.c_attn.bias", 3 * H);
      add(p + "attn.c_proj.weight", {H, H});
      bias(p + "attn.c_proj.bias", H);
      norm(p + "ln_2.weight", H);
      bias(p + "ln_2.bias", H);
      add(p + "mlp.c_fc.weight", {H, I});
      bias(p + "mlp.c_fc.bias", I);
      add(p + "mlp.c_proj.weight", {I, H});
      bias(p + "mlp.c_proj.bias", H);
    }
    norm("transformer.ln_f.weight", H);
    bias("transformer.ln_f.bias", H);
    if (!c.tie_word_embeddings) add("lm_head.weight", {V, H});
    return t;
  }
  const int64_t D = c.head_dim, NQ = c.num_attention_heads, NKV = c.num_key_value_heads;
  add("model.embed_tokens.weight", {V, H});
  for (int64_t l = 0; l < L; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    norm(p + "input_layernorm.weight", H);
    add(p + "self_attn.q_proj.weight", {NQ * D, H});
    add(p + "self_attn.k_proj.weight", {NKV * D, H});
    add(p + "self_attn.v_proj.weight", {NKV * D, H});
    if (c.attention_bias) {
      bias(p + "self_attn.q_proj.bias", NQ * D);
      bias(p + "self_attn.k_proj.bias", NKV * D);
      bias(p + "self_attn.v_proj.bias", NKV * D);
    }
    add(p + "self_attn.o_proj.weight", {H, NQ * D});
    // transformers gives o_proj a bias from attention_bias too, except Qwen2 (q/k/v only).
    if (c.attention_bias && c.arch != io::Arch::Qwen2) bias(p + "self_attn.o_proj.bias", H);
    if (c.qk_norm) {
      norm(p + "self_attn.q_norm.weight", D);
      norm(p + "self_attn.k_norm.weight", D);
    }
    norm(p + "post_attention_layernorm.weight", H);
    if (c.is_moe() && c.layer_is_sparse(l)) {
      bool mixtral = c.arch == io::Arch::Mixtral;
      std::string moe = p + (mixtral ? "block_sparse_moe." : "mlp.");
      const int64_t I = mixtral ? c.intermediate_size : c.moe_intermediate_size;
      add(moe + "gate.weight", {c.num_experts, H});
      for (int64_t e = 0; e < c.num_experts; ++e) {
        std::string ep = moe + "experts." + std::to_string(e) + ".";
        if (mixtral) {
          add(ep + "w1.weight", {I, H});
          add(ep + "w2.weight", {H, I});
          add(ep + "w3.weight", {I, H});
        } else {
          add(ep + "gate_proj.weight", {I, H});
          add(ep + "up_proj.weight", {I, H});
          add(ep + "down_proj.weight", {H, I});
        }
      }
    } else {
      const int64_t I = c.intermediate_size;
      add(p + "mlp.gate_proj.weight", {I, H});
      add(p + "mlp.up_proj.weight", {I, H});
      add(p + "mlp.down_proj.weight", {H, I});
      if (c.mlp_bias) {  // llama's mlp_bias
        bias(p + "mlp.gate_proj.bias", I);
        bias(p + "mlp.up_proj.bias", I);
        bias(p + "mlp.down_proj.bias", H);
      }
    }
  }
  norm("model.norm.weight", H);
  if (!c.tie_word_embeddings) add("lm_head.weight", {V, H});
  return t;
}

}  // namespace calq::model
