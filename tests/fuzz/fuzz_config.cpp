// libFuzzer: config.json parsing must accept or reject any input with a calq::Error (or a JSON
// parse error), never crash.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "calq/core/error.h"
#include "calq/io/config.h"
#include "calq/model/layout.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    auto cfg = calq::io::parse_config(j, "fuzz");
    // Bound the work: only enumerate tensors of configs of modest size.
    if (cfg.num_hidden_layers <= 64 && cfg.num_experts <= 64) (void)calq::model::expected_tensors(cfg);
  } catch (const calq::Error&) {
  }
  return 0;
}
