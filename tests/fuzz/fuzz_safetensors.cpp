// libFuzzer: the safetensors parser must accept or reject any byte string with a calq::Error,
// never crash, and every tensor view it accepts must lie inside the input.
#include <cstddef>
#include <cstdint>

#include "calq/core/error.h"
#include "calq/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = calq::io::SafetensorsFile::from_memory(reinterpret_cast<const std::byte*>(data), size, "fuzz");
    volatile uint8_t sink = 0;
    for (const auto& t : f->tensors()) {
      auto v = f->view(t.name);
      if (v.nbytes) sink = sink ^ static_cast<uint8_t>(v.data[0]) ^ static_cast<uint8_t>(v.data[v.nbytes - 1]);
      if (calq::dtype_is_float(v.dtype) && v.nbytes <= (1u << 16)) (void)calq::to_f32_vector(v);
    }
  } catch (const calq::Error&) {
  }
  return 0;
}
