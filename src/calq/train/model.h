// A trainable fp32 model of the gpt2 and llama/qwen2/qwen3/mistral (dense) families: frozen base
// weights loaded through native::Model (any dtype calq reads), LoRA adapters on linear modules
// chosen by regex (and optionally the head), optionally trainable norms, forward and backward of
// the whole network for next-token cross-entropy. Fake quantization enters through Hooks (the
// CPT driver implements them); without hooks the model is plain fp32 and matches the engine.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "calq/core/tensor.h"
#include "calq/io/config.h"

namespace calq::train {

struct Param {
  std::string name;  // PEFT-style tensor name (without the base_model.model. prefix)
  Shape shape;
  std::vector<float> value, grad;
  bool decay = false;  // AdamW weight decay applies
  int64_t numel() const { return static_cast<int64_t>(value.size()); }
};

struct LoraOptions {
  int64_t rank = 16;
  double alpha = 32.0;
  double dropout = 0.0;
  std::string targets = ".*";  // ECMAScript regex, searched in the module path (transformer.h.0.attn.c_attn)
  bool head = false;           // also adapt lm_head (regardless of `targets`)
  bool decay = false;          // weight decay on LoRA factors
  uint64_t seed = 0;
};

struct ModelOptions {
  LoraOptions lora;
  bool train_norms = false;  // norm weights (and LayerNorm biases) trainable, never decayed
};

// Fake-quantization hooks. Indices are those of Model::linears().
class Hooks {
 public:
  virtual ~Hooks() = default;
  // The fake-quantized weight [out, in] of linear i at the current precision, or nullptr (fp32).
  virtual const float* weight(size_t i) { return nullptr; }
  // Quantizes (or observes) in place a copy of linear i's input [rows, cols].
  virtual void input(size_t i, float* x, int64_t rows, int64_t cols) {}
  // Whether LoRA branches run (false while calibrating inputs on the base model).
  virtual bool lora_enabled() { return true; }
  // Writes the fake-quantized LoRA factors of linear i and returns true, or returns false (fp32).
  virtual bool lora_weights(size_t i, const Param& A, const Param& B, float* Aq, float* Bq) { return false; }
  // The LoRA factor gradients of linear i from one forward/backward (before accumulation).
  virtual void lora_grads(size_t i, float* dA, int64_t nA, float* dB, int64_t nB) {}
};

struct Lora {
  int64_t rank = 0;
  float scale = 0;  // alpha / rank
  float dropout = 0;
  Param A, B;       // A [rank, in], B [out, rank] (PEFT lora_A.weight / lora_B.weight)
};

struct Linear {
  std::string name;  // HF module path; "lm_head" for the head
  int64_t in = 0, out = 0;
  std::vector<float> W;  // [out, in]; empty for a head tied to the embedding
  const float* w = nullptr;  // W or the embedding
  std::vector<float> bias;   // empty: none
  std::unique_ptr<Lora> lora;
};

struct Norm {
  std::string name;  // HF module path (transformer.h.0.ln_1, model.layers.0.input_layernorm, ...)
  Param w, b;        // b empty for RMSNorm
  bool trainable = false;
};

class Model {
 public:
  static Model load(const std::filesystem::path& dir, const ModelOptions& opts);
  // From HF-named tensors in HF layout (fp32), for tests.
  static Model from_tensors(const io::ModelConfig& cfg, std::map<std::string, std::vector<float>> tensors,
                            const ModelOptions& opts);
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  const io::ModelConfig& config() const;
  const ModelOptions& options() const;
  std::vector<Linear>& linears();
  const std::vector<Linear>& linears() const;
  std::vector<Norm>& norms();
  // Every trainable parameter (LoRA factors in module order, then trainable norms).
  std::vector<Param*> params();
  int64_t num_lora_params() const;
  int64_t num_trainable_params();
  int64_t num_frozen_params() const;

  void set_hooks(Hooks* h);
  void set_training(bool on);  // dropout on LoRA inputs
  void set_step_seed(uint64_t s);  // dropout masks of the next forward

  // Mean next-token cross-entropy of B sequences of T tokens (labels = the tokens, shifted once
  // inside). With backward, adds grad_scale * d(mean loss)/d(param) into every param's grad.
  double loss(const std::vector<int32_t>& tokens, int64_t B, int64_t T, bool backward, float grad_scale = 1.0f);
  // Forward only: logits [B*T, vocab].
  std::vector<float> logits(const std::vector<int32_t>& tokens, int64_t B, int64_t T);
  // Next-token top-1 accuracy and loss sums (for the precision range test): counts of correct and
  // scored positions, and the summed NLL.
  struct Scores { int64_t correct = 0, scored = 0; double nll = 0; };
  Scores score(const std::vector<int32_t>& tokens, int64_t B, int64_t T);

  void zero_grad();

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace calq::train
