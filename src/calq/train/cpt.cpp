#include "calq/train/cpt.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

#include "calq/core/error.h"
#include "calq/core/log.h"

namespace calq::train {

CyclicPrecisionScheduler::CyclicPrecisionScheduler(int min_bits, int max_bits, int64_t total, int64_t cycles,
                                                   Unit unit)
    : min_(min_bits), max_(max_bits), total_(total), cycles_(cycles) {
  check_bits(min_bits, "--bits (minimum)");
  check_bits(max_bits, "--bits (maximum)");
  CALQ_CHECK(min_bits <= max_bits, "--bits {}:{}: the minimum is larger than the maximum; write MIN:MAX", min_bits,
             max_bits);
  CALQ_CHECK(cycles >= 1, "--cycles must be at least 1, got {}", cycles);
  CALQ_CHECK(total >= 1, "the schedule needs at least one {}", unit == Unit::Epoch ? "epoch" : "step");
  CALQ_CHECK(unit == Unit::Iteration || cycles <= total,
             "--cycles {} is more than the {} epochs: a per-epoch schedule holds at most one cycle per epoch; use "
             "--schedule iter (the paper's per-iteration schedule) or --cycles {} or fewer",
             cycles, total, total);
  period_ = static_cast<double>(total) / static_cast<double>(cycles);
  CALQ_CHECK(unit == Unit::Epoch || min_bits == max_bits || period_ >= 2.0,
             "--cycles {} over {} steps leaves {:.2f} steps per cycle; a cycle needs at least 2 steps (use --cycles {} "
             "or fewer, or more --steps/--epochs)",
             cycles, total, period_, std::max<int64_t>(1, total / 2));
}

int CyclicPrecisionScheduler::precision(int64_t t) const {
  const double tm = std::fmod(static_cast<double>(t), period_);
  const double b = min_ + 0.5 * (max_ - min_) * (1.0 - std::cos(M_PI * tm / period_));
  // Round half up on the exact value (B_min + Δ/2 at a quarter period rounds up, as the paper's
  // sequences); the tolerance absorbs cos() rounding around exact ties.
  const int r = static_cast<int>(std::floor(b + 0.5 + 1e-9));
  return std::clamp(r, min_, max_);
}

// ---------------------------------------------------------------------------------------------
CptQuantizers::CptQuantizers(Model& model, CptOptions o) : m_(model), o_(o) {
  if (o_.gradient_bits != 0) check_bits(o_.gradient_bits, "--gradient-bits");
  if (o_.input_bits != 0) check_bits(o_.input_bits, "--input-bits");
  const size_t n = m_.linears().size();
  for (size_t i = 0; i < n; ++i) {
    w_.emplace_back(o_.weight_kind, Granularity::Row);
    x_.emplace_back(o_.input_kind, o_.input_granularity);
    a_.emplace_back(o_.lora_kind, Granularity::Tensor);
    b_.emplace_back(o_.lora_kind, Granularity::Tensor);
    ga_.emplace_back(QuantKind::MinMax, Granularity::Row);
    gb_.emplace_back(QuantKind::MinMax, Granularity::Row);
  }
  wq_.resize(n);
  m_.set_hooks(this);
}

CptQuantizers::~CptQuantizers() { m_.set_hooks(nullptr); }

int CptQuantizers::calibrate_weights(int bits) {
  check_bits(bits, "precision");
  auto& L = m_.linears();
  for (size_t i = 0; i < L.size(); ++i) {
    w_[i].reset_stats();
    w_[i].observe(L[i].w, L[i].out, L[i].in);
    w_[i].finish(bits);
  }
  if (bits == bits_) quantize_weight_cache();
  return static_cast<int>(L.size());
}

void CptQuantizers::begin_input_calibration(int bits) {
  check_bits(bits, "precision");
  for (auto& q : x_) q.reset_stats();
  calibrating_inputs_ = true;
}

int CptQuantizers::end_input_calibration() {
  calibrating_inputs_ = false;
  int n = 0;
  for (auto& q : x_) n += q.has_stats();
  return n;
}

int CptQuantizers::calibrate_lora(int bits) {
  check_bits(bits, "precision");
  int n = 0;
  for (size_t i = 0; i < m_.linears().size(); ++i) {
    const Linear& L = m_.linears()[i];
    if (!L.lora) continue;
    a_[i].reset_stats();
    a_[i].observe(L.lora->A.value.data(), L.lora->rank, L.in);
    a_[i].finish(bits);
    b_[i].reset_stats();
    b_[i].observe(L.lora->B.value.data(), L.out, L.lora->rank);
    b_[i].finish(bits);
    ++n;
  }
  return n;
}

bool CptQuantizers::gradients_calibrated() const {
  if (o_.gradient_bits == 0) return false;
  if (!o_.gradient_calibrated) return true;  // dynamic: every step's gradients set their own ranges
  for (size_t i = 0; i < m_.linears().size(); ++i)
    if (m_.linears()[i].lora && !(ga_[i].calibrated(o_.gradient_bits) && gb_[i].calibrated(o_.gradient_bits)))
      return false;
  return true;
}

void CptQuantizers::quantize_weight_cache() {
  auto& L = m_.linears();
  for (size_t i = 0; i < L.size(); ++i) {
    if (bits_ == 0) {
      wq_[i].clear();
      wq_[i].shrink_to_fit();
      continue;
    }
    wq_[i].resize(static_cast<size_t>(L[i].out * L[i].in));
    w_[i].apply(bits_, L[i].w, wq_[i].data(), L[i].out, L[i].in, L[i].name + " weight");
  }
  cache_valid_ = true;
}

void CptQuantizers::set_precision(int bits) {
  if (bits != 0) {
    check_bits(bits, "precision");
    for (size_t i = 0; i < w_.size(); ++i)
      CALQ_CHECK(w_[i].calibrated(bits), "{}-bit precision selected before its calibration ({})", bits,
                 m_.linears()[i].name);
  }
  if (bits == bits_ && cache_valid_) return;
  bits_ = bits;
  quantize_weight_cache();
}

const float* CptQuantizers::weight(size_t i) { return bits_ == 0 ? nullptr : wq_[i].data(); }

void CptQuantizers::input(size_t i, float* x, int64_t rows, int64_t cols) {
  if (calibrating_inputs_) {
    x_[i].observe(x, rows, cols);
    return;
  }
  if (bits_ == 0 || !o_.quantize_inputs) return;
  x_[i].apply(bits_, x, x, rows, cols, m_.linears()[i].name + " input", o_.input_bits);
}

bool CptQuantizers::lora_weights(size_t i, const Param& A, const Param& B, float* Aq, float* Bq) {
  if (bits_ == 0 || !o_.quantize_lora) return false;
  const Linear& L = m_.linears()[i];
  a_[i].apply(bits_, A.value.data(), Aq, L.lora->rank, L.in, L.name + " lora_A");
  b_[i].apply(bits_, B.value.data(), Bq, L.out, L.lora->rank, L.name + " lora_B");
  return true;
}

void CptQuantizers::lora_grads(size_t i, float* dA, int64_t nA, float* dB, int64_t nB) {
  const int gb = o_.gradient_bits;
  if (gb == 0) return;
  const Linear& L = m_.linears()[i];
  const int64_t r = L.lora->rank;
  if (!o_.gradient_calibrated) {
    quantize_rows_dynamic(dA, r, L.in, gb);
    quantize_rows_dynamic(dB, L.out, r, gb);
  } else {
    // Calibrated once, from the first gradient of each factor that is not all zero (with B = 0 at
    // the start, A's first gradients are exactly zero and would give a zero range).
    auto calib = [&](FakeQuantizer& q, const float* g, int64_t rows, int64_t cols) {
      if (q.calibrated(gb)) return;
      bool nonzero = false;
      for (int64_t j = 0; j < rows * cols && !nonzero; ++j) nonzero = g[j] != 0.0f;
      if (!nonzero) return;
      q.reset_stats();
      q.observe(g, rows, cols);
      q.finish(gb);
    };
    calib(ga_[i], dA, r, L.in);
    calib(gb_[i], dB, L.out, r);
    // Until a factor's range exists, its gradient is all zeros (nothing to quantize).
    if (ga_[i].calibrated(gb)) ga_[i].apply(gb, dA, dA, r, L.in, L.name + " lora_A gradient");
    if (gb_[i].calibrated(gb)) gb_[i].apply(gb, dB, dB, L.out, r, L.name + " lora_B gradient");
  }
  (void)nA;
  (void)nB;
  ++grads_quantized_;
}

// ---------------------------------------------------------------------------------------------
CalibrationManager::CalibrationManager(Model& model, CptQuantizers& q, BatchFn batches, int64_t num_batches,
                                       int64_t batch, int64_t seq)
    : m_(model), q_(q), batches_(std::move(batches)), num_batches_(num_batches), batch_(batch), seq_(seq) {
  CALQ_CHECK(num_batches >= 1, "--calib-batches must be at least 1, got {}", num_batches);
}

void CalibrationManager::calibrate(int bits) {
  const int nw = q_.calibrate_weights(bits);
  log_info("  ✓ Calibrated {} weight quantizers", nw);
  if (q_.options().quantize_inputs) {
    // Inputs of the base model (LoRA off, dropout off) with the weights at this precision.
    const int prev = q_.precision();
    q_.set_precision(bits);
    q_.begin_input_calibration(bits);
    m_.set_training(false);
    try {
      for (int64_t k = 0; k < num_batches_; ++k) m_.logits(batches_(k), batch_, seq_);
    } catch (...) {
      q_.end_input_calibration();
      throw;
    }
    const int ni = q_.end_input_calibration();
    for (size_t i = 0; i < q_.size(); ++i) q_.input_quantizer(i).finish(bits, q_.options().input_bits);
    log_info("    Started {} input quantizers", ni);
    log_info("  ✓ Calibrated {} input quantizers on {} batches", ni, num_batches_);
    q_.set_precision(prev);
  }
  ++count_[bits];
}

bool CalibrationManager::ensure_calibrated(int bits) {
  check_bits(bits, "precision");
  if (calibrated_.count(bits)) return false;
  log_info("  ⚠️ {}-bit not calibrated, calibrating now...", bits);
  calibrate(bits);
  calibrated_.insert(bits);
  return true;
}

bool CalibrationManager::ensure_lora_calibrated(int bits) {
  check_bits(bits, "precision");
  if (lora_calibrated_.count(bits) || !q_.options().quantize_lora) return false;
  log_info("  Calibrating LoRA weight quantizers for {}-bit...", bits);
  const int n = q_.calibrate_lora(bits);
  int adapters = 0;
  for (const auto& L : m_.linears()) adapters += L.lora != nullptr;
  log_info("    ✓ Calibrated {}/{} LoRA weight quantizers for {}-bit", n, adapters, bits);
  lora_calibrated_.insert(bits);
  return true;
}

void CalibrationManager::recalibrate(int bits) {
  CALQ_CHECK(calibrated_.count(bits), "recalibrate: {}-bit was never calibrated", bits);
  log_info("  ↻ Recalibrating {}-bit", bits);
  calibrate(bits);
  if (q_.options().quantize_lora) {
    const int n = q_.calibrate_lora(bits);
    log_info("    ✓ Recalibrated {} LoRA weight quantizers for {}-bit", n, bits);
    lora_calibrated_.insert(bits);
  }
}

int CalibrationManager::calibrations(int bits) const {
  auto it = count_.find(bits);
  return it == count_.end() ? 0 : it->second;
}

void CalibrationManager::restore(const std::set<int>& bits, const std::set<int>& lora_bits) {
  calibrated_ = bits;
  lora_calibrated_ = lora_bits;
}

std::string CalibrationManager::summary() const {
  return fmt::format(
      "Calibration Summary:\n  Weight/Input calibrated bits: [{}]\n  LoRA weight calibrated bits: [{}]\n  Gradient "
      "calibrated: {}",
      fmt::join(calibrated_, ", "), fmt::join(lora_calibrated_, ", "), gradient_calibrated() ? "true" : "false");
}

}  // namespace calq::train
