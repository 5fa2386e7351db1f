// The GPU forward pass behind engine::Model (Options::device = Cuda): the interface between the
// CPU engine (engine.cpp, which owns the checkpoint, the weight overrides and the input
// transforms) and its CUDA implementation (src/calq/backend/cuda/engine_cuda.cpp). Without the
// CUDA backend, create() throws the "built without CUDA" error (gpu_stub.cpp). docs/cuda.md,
// "Forward pass".
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "calq/engine/engine.h"

namespace calq::engine::gpu {

// Where the GPU forward pass reads the model from (the CPU engine's own loading code).
struct Source {
  // Whether the checkpoint has this tensor.
  std::function<bool(const std::string& name)> contains;
  // Number of elements of a tensor the checkpoint has.
  std::function<int64_t(const std::string& name)> numel;
  // The fp32 tensor by HF name; linear weights ("<module>.weight", linear = true) as [out, in]
  // with any set_weight override applied.
  std::function<std::vector<float>(const std::string& name, bool linear)> load;
};

// The device-resident forward pass of one model: weights uploaded once at creation, the residual
// stream of the current batch kept on the GPU between calls.
class Forward {
 public:
  virtual ~Forward() = default;
  // Copies host activations to the device residual stream (its shape becomes the current batch).
  virtual void upload(const Activations& h) = 0;
  // Copies the device residual stream back into h (resized to the current batch).
  virtual void download(Activations& h) = 0;
  // Activation slots on the device (calibration keeps every chunk there between passes): stash
  // copies the current residual stream (with its batch shape and lengths) into slot `slot`,
  // restore makes a stashed slot the current stream; both device to device. free_slots releases
  // them all.
  virtual void stash(int64_t slot) = 0;
  virtual void restore(int64_t slot) = 0;
  virtual void free_slots() = 0;
  // Decoder layer `layer` on the device residual stream. `transforms` are the model's input
  // transforms (applied on a host copy of the module's input).
  virtual void run_layer(int64_t layer, Observer* obs, const std::map<std::string, InputTransform>& transforms) = 0;
  // Final norm + lm head over the rows `rows` of the device residual stream (all rows when
  // empty): [rows, vocab] on the host. The observer sees "lm_head" with layer = num_layers.
  virtual std::vector<float> head(const std::vector<int64_t>& rows, Observer* obs) = 0;
  // Re-uploads a linear module's weight (after set_weight / clear_weight).
  virtual void reload(const std::string& module) = 0;
  // Bytes of device memory held (weights + buffers).
  virtual int64_t device_bytes() const = 0;
};

// Checks the architecture and the GPU, uploads the weights. Throws calq::Error for an
// architecture the GPU path does not implement, without CUDA / without a GPU, and when the
// weights do not fit (bytes needed and free).
std::unique_ptr<Forward> create(const io::ModelConfig& cfg, Precision precision, const Source& src,
                                const std::vector<uint8_t>& sliding, bool check_nan);

}  // namespace calq::engine::gpu
