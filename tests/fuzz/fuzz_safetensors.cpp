// libFuzzer: the safetensors parser must accept or reject any byte string with a calq::Error (or
// a JSON exception), never crash; every view it accepts must lie inside the input, which ASan
// checks by reading each view's every byte (libFuzzer's input buffer is exactly `size` long).
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "calq/core/error.h"
#include "calq/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = calq::io::SafetensorsFile::from_memory(reinterpret_cast<const std::byte*>(data), size,
                                                    "fuzz");
    uint8_t acc = 0;
    size_t total = 0;
    for (const auto& t : f->tensors()) {
      const auto v = f->view(t.name);
      if (v.nbytes != t.end - t.begin || v.numel() < 0) __builtin_trap();
      total += v.nbytes;
      for (size_t i = 0; i < v.nbytes; ++i) acc ^= static_cast<uint8_t>(v.data[i]);
      f->release(t.name);  // a no-op for memory, but must accept every name it listed
    }
    if (total > size) __builtin_trap();  // tensors tile the data buffer: they cannot exceed it
    volatile uint8_t sink = acc;
    (void)sink;
  } catch (const calq::Error&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}
