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

// Thrown by a layer run (CPU or GPU engine) when its observer's Observer::done_after says the
// rest of the layer is not needed; Model::run_layer / gpu_run catch it and return.
struct LayerDone {};

// Where the GPU forward pass reads the model from (the CPU engine's own loading code).
struct Source {
  // Whether the checkpoint has this tensor.
  std::function<bool(const std::string& name)> contains;
  // Number of elements of a tensor the checkpoint has.
  std::function<int64_t(const std::string& name)> numel;
  // The fp32 tensor by HF name; linear weights ("<module>.weight", linear = true) as [out, in]
  // with any set_weight override applied.
  std::function<std::vector<float>(const std::string& name, bool linear)> load;
  // The bytes of a tensor when they are exactly what `load` would return, without a copy: a
  // set_weight override (fp32), or the checkpoint's own tensor (no transpose, stored bf16 or
  // fp32); data = null otherwise. The upload then skips the host conversion (bf16 goes to the GPU
  // as it is stored). `release` drops a checkpoint tensor's pages after use.
  struct Raw {
    const void* data = nullptr;
    bool bf16 = false;
    bool checkpoint = false;  // a view of the checkpoint (release it after use)
  };
  std::function<Raw(const std::string& name, bool linear)> raw;
  std::function<void(const std::string& name)> release;
};

// The device-resident forward pass of one model: weights uploaded once at creation, the residual
// stream of the current batch kept on the GPU between calls.
class Forward {
 public:
  virtual ~Forward() = default;
  // Copies host activations to the device residual stream (its shape becomes the current batch).
  virtual void upload(const Activations& h) = 0;
  // The residual stream becomes the embedding rows of `tokens` [batch · seq] (checked by the
  // caller: inside the vocabulary; lengths as Activations::lengths), gathered on the GPU from a
  // device copy of the embedding table (made on first use). false, with nothing changed, where
  // that cannot be done (GPT-2's learned positions, a table stored in another dtype than bf16 or
  // fp32, too little free memory for the table): the caller then embeds on the host and uploads.
  virtual bool embed_tokens(const std::vector<int32_t>& tokens, int64_t batch, int64_t seq,
                            const std::vector<int64_t>& lengths) = 0;
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
  // A decoder-layer run with kept states (engine::LayerCache on the GPU engine; the caller decides
  // validity): it starts at `start` (0: the residual stream, 1: states->attn, 2: states->mid, 3:
  // states->act with states->mid) and copies the states it computes into `states` where keep[s].
  // stored[s] is set as soon as state s's copy is queued, also when the observer ends the run
  // early (LayerDone). `states` comes from new_states() (device memory, freed with it).
  struct StateRun {
    void* states = nullptr;
    int start = 0;
    bool keep[3] = {false, false, false};
    bool stored[3] = {false, false, false};
  };
  virtual void run_layer(int64_t layer, Observer* obs, const std::map<std::string, InputTransform>& transforms,
                         StateRun& run) = 0;
  virtual std::shared_ptr<void> new_states() = 0;
  // Rows of the current residual stream (batch · seq).
  virtual int64_t rows() const = 0;
  // Final norm + lm head over the rows `rows` of the device residual stream (all rows when
  // empty): [rows, vocab] on the host. The observer sees "lm_head" with layer = num_layers.
  virtual std::vector<float> head(const std::vector<int64_t>& rows, Observer* obs) = 0;
  // Re-uploads a linear module's weight (after set_weight / clear_weight).
  virtual void reload(const std::string& module) = 0;
  // The device copy of a decoder-layer linear module's weight as uploaded (bf16 bits or fp32,
  // [out, in]); data = null when the module has no such copy (GPT-2, the head, unknown names, a
  // layer not on the GPU now).
  virtual Model::DeviceWeight device_weight(const std::string& module) const = 0;
  // A decoder-layer linear module's weight from fp32 [out, in] on GPU `device` (peer copy when
  // that is not the engine's): stored as the upload of the same host values would store it (bf16
  // rounded to nearest even, or fp32). The bias is unchanged.
  virtual void set_weight_device(const std::string& module, const float* w, int device) = 0;
  // Bytes of device memory held (weights + buffers).
  virtual int64_t device_bytes() const = 0;
};

// Checks the architecture and the GPU, uploads the weights. Throws calq::Error for an
// architecture the GPU path does not implement, without CUDA / without a GPU, and when the
// weights do not fit (bytes needed and free).
// resident_layers: Options::gpu_resident_layers; bf16_slots: Options::bf16_slots.
std::unique_ptr<Forward> create(const io::ModelConfig& cfg, Precision precision, const Source& src,
                                const std::vector<uint8_t>& sliding, bool check_nan, int64_t resident_layers = 0,
                                bool bf16_slots = false);

}  // namespace calq::engine::gpu
