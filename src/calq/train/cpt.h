// Cyclic precision training: the precision schedule, the per-linear fake quantizers (as model
// Hooks) and the lazy per-precision CalibrationManager.
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "calq/train/model.h"
#include "calq/train/quant.h"

namespace calq::train {

// B_t = round(B_min + ½(B_max − B_min)(1 − cos(π·(t mod T)/T))), T = total / cycles (fractional
// T allowed), exact ties rounded up (so 2..9 over 10 steps gives 2 2 3 3 4 6 7 8 8 9). Per iteration: t counts optimizer steps and
// total is the number of steps. Per epoch: t counts epochs; then cycles must not exceed epochs
// (a per-epoch schedule cannot hold more cycles than epochs: use the per-iteration one).
class CyclicPrecisionScheduler {
 public:
  enum class Unit { Iteration, Epoch };
  CyclicPrecisionScheduler(int min_bits, int max_bits, int64_t total, int64_t cycles, Unit unit);
  int precision(int64_t t) const;
  double period() const { return period_; }
  int min_bits() const { return min_; }
  int max_bits() const { return max_; }

 private:
  int min_, max_;
  int64_t total_, cycles_;
  double period_;
};

struct CptOptions {
  QuantKind weight_kind = QuantKind::MinMax, input_kind = QuantKind::MinMax, lora_kind = QuantKind::MinMax;
  bool quantize_inputs = false;
  int input_bits = 0;             // fixed input precision (W?A8: 8); 0: inputs follow the forward precision
  Granularity input_granularity = Granularity::Tensor;
  bool quantize_lora = true;
  int gradient_bits = 8;          // 0: gradients not quantized
  bool gradient_calibrated = false;  // false: dynamic per-step per-row ranges
};

// The fake quantizers of every linear module of a Model, installed as its hooks.
class CptQuantizers : public Hooks {
 public:
  CptQuantizers(Model& model, CptOptions o);
  ~CptQuantizers() override;
  const CptOptions& options() const { return o_; }
  size_t size() const { return w_.size(); }

  // Forward precision (0: fp32, no fake quantization; LoRA still applied). Switching to a
  // precision whose weight quantizers are not calibrated fails.
  void set_precision(int bits);
  int precision() const { return bits_; }

  // Calibration steps (the CalibrationManager drives them).
  int calibrate_weights(int bits);          // returns the number of weight quantizers
  void begin_input_calibration(int bits);   // observe inputs; LoRA off; inputs pass through
  int end_input_calibration();              // returns the number of input quantizers calibrated
  int calibrate_lora(int bits);             // from the current A and B; returns adapters calibrated
  bool gradients_calibrated() const;

  FakeQuantizer& weight_quantizer(size_t i) { return w_[i]; }
  FakeQuantizer& input_quantizer(size_t i) { return x_[i]; }
  FakeQuantizer& lora_a_quantizer(size_t i) { return a_[i]; }
  FakeQuantizer& lora_b_quantizer(size_t i) { return b_[i]; }
  FakeQuantizer& grad_a_quantizer(size_t i) { return ga_[i]; }
  FakeQuantizer& grad_b_quantizer(size_t i) { return gb_[i]; }
  int64_t gradient_tensors_quantized() const { return grads_quantized_; }

  // Hooks
  const float* weight(size_t i) override;
  void input(size_t i, float* x, int64_t rows, int64_t cols) override;
  bool lora_enabled() override { return !calibrating_inputs_; }
  bool lora_weights(size_t i, const Param& A, const Param& B, float* Aq, float* Bq) override;
  void lora_grads(size_t i, float* dA, int64_t nA, float* dB, int64_t nB) override;

 private:
  void quantize_weight_cache();
  Model& m_;
  CptOptions o_;
  int bits_ = 0;
  bool cache_valid_ = false;
  bool calibrating_inputs_ = false;
  std::vector<FakeQuantizer> w_, x_, a_, b_, ga_, gb_;
  std::vector<std::vector<float>> wq_;  // fake-quantized weights at bits_
  int64_t grads_quantized_ = 0;
};

// Lazy per-precision calibration: a precision's weight and input quantizers are calibrated the
// first time it is used (inputs from `batches` with LoRA disabled, dropout off), its LoRA
// quantizers likewise; never for precisions that are not used.
class CalibrationManager {
 public:
  using BatchFn = std::function<std::vector<int32_t>(int64_t index)>;  // tokens of batch `index`
  CalibrationManager(Model& model, CptQuantizers& q, BatchFn batches, int64_t num_batches, int64_t batch,
                     int64_t seq);
  // Calibrates `bits` unless done; returns true when it calibrated now. Logs the seed's lines.
  bool ensure_calibrated(int bits);
  bool ensure_lora_calibrated(int bits);
  // Calibrates again (weights, inputs and LoRA) a precision already calibrated.
  void recalibrate(int bits);
  const std::set<int>& calibrated_bits() const { return calibrated_; }
  const std::set<int>& lora_calibrated_bits() const { return lora_calibrated_; }
  bool gradient_calibrated() const { return q_.gradients_calibrated(); }
  int calibrations(int bits) const;  // how many times `bits` was calibrated (weights + inputs)
  std::string summary() const;
  // For resume: marks precisions calibrated (their parameters restored from a checkpoint).
  void restore(const std::set<int>& bits, const std::set<int>& lora_bits);

 private:
  void calibrate(int bits);
  Model& m_;
  CptQuantizers& q_;
  BatchFn batches_;
  int64_t num_batches_, batch_, seq_;
  std::set<int> calibrated_, lora_calibrated_;
  std::map<int, int> count_;
};

}  // namespace calq::train
