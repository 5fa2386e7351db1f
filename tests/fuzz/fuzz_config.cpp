// libFuzzer: config.json parsing must accept or reject any input with a calq::Error (or a JSON
// exception), never crash; an accepted config must satisfy the invariants the rest of calq
// relies on.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "calq/core/error.h"
#include "calq/io/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto j = nlohmann::json::parse(data, data + size);
    const auto c = calq::io::parse_config(j, "fuzz");
    bool ok =
        c.vocab_size > 0 && c.hidden_size > 0 && c.num_hidden_layers > 0 && c.head_dim > 0 &&
        c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
        c.num_attention_heads % c.num_key_value_heads == 0 && c.rms_norm_eps > 0 &&
        c.rope_theta > 0 &&
        (!c.is_moe() || (c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.num_experts &&
                         c.moe_intermediate_size > 0));
    bool any_dense = false;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) any_dense |= !c.layer_is_sparse(l);
    if (any_dense && c.intermediate_size <= 0) ok = false;
    if (!ok) __builtin_trap();
  } catch (const calq::Error&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}
