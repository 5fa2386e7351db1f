// Fake quantization for cyclic precision training: quantize-dequantize in the forward pass with a
// straight-through estimator in the backward pass (the model passes gradients through unchanged).
//
// Two quantizers, selectable:
//  - MinMax: symmetric, narrow range: s = max|x| / (2^(b-1) - 1), x' = clamp(round(x/s), -q, q)·s
//    with q = 2^(b-1) - 1 (2^b - 1 codes, exact zero).
//  - Log (the seed's log quantizer, fixed to really use b bits): sign + (b-1)-bit magnitude index.
//    Statistics are log2|x| over the elements with |x| >= 1e-30 (zeros do not pull the range down);
//    zp = min, R = max - min; L = 2^(b-1) - 1 magnitude levels 2^(zp + R·k/(L-1)), k = 0..L-1
//    (L = 1: the single level 2^(zp+R)); a magnitude below half the smallest level (in log2: below
//    zp - step/2, step = R/(L-1), or below zp+R-1 when L = 1) becomes 0. So a b-bit code holds
//    sign, zero and L levels: 2L + 1 = 2^b - 1 values, as MinMax.
// Ranges are kept per bit-width and per channel (Granularity), so a precision that comes back
// finds its own ranges; applying a bit-width that was never calibrated is an error, never a silent
// pass-through.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace calq::train {

enum class QuantKind { MinMax, Log };
QuantKind parse_quant_kind(const std::string& s);  // "minmax" | "log"
std::string quant_kind_name(QuantKind k);

// Which elements share a range in a [rows, cols] tensor.
enum class Granularity { Tensor, Row, Column };

constexpr int kMinBits = 2, kMaxBits = 16;
void check_bits(int bits, const std::string& option);  // 2..16, else an error naming the option

// Per-channel parameters for one bit-width.
struct QuantParams {
  std::vector<float> a, b;  // MinMax: a = scale; Log: a = zp, b = R
};

class FakeQuantizer {
 public:
  FakeQuantizer() = default;
  FakeQuantizer(QuantKind kind, Granularity g) : kind_(kind), gran_(g) {}
  QuantKind kind() const { return kind_; }
  Granularity granularity() const { return gran_; }

  // Calibration: reset, observe any number of tensors (running min/max of the statistic), then
  // finish(bits) stores the parameters of that bit-width. Each observed tensor has the same
  // channel count.
  void reset_stats();
  void observe(const float* x, int64_t rows, int64_t cols);
  bool has_stats() const { return observed_; }
  // `levels` (default: bits) sets the level count when the parameters are stored under another
  // key (inputs at a fixed precision, keyed by the forward precision they were calibrated at).
  void finish(int bits, int levels = 0);
  bool calibrated(int bits) const { return params_.count(bits) > 0; }
  void forget(int bits) { params_.erase(bits); }
  const QuantParams& params(int bits) const;

  // y = Q_bits(x) (y may alias x). Fails if `bits` was never calibrated.
  void apply(int bits, const float* x, float* y, int64_t rows, int64_t cols, const std::string& what,
             int levels = 0) const;

  // Serialization of the stored parameters (for checkpoints).
  std::map<int, QuantParams>& all_params() { return params_; }

 private:
  QuantKind kind_ = QuantKind::MinMax;
  Granularity gran_ = Granularity::Tensor;
  bool observed_ = false;
  std::vector<float> lo_, hi_;  // running statistics per channel
  std::map<int, QuantParams> params_;
};

// Quantize-dequantize of one value with given parameters (exposed for tests).
float fq_minmax(float x, float scale, int bits);
float fq_log(float x, float zp, float range, int bits);

// Dynamic symmetric per-row MinMax quantization in place (the gradient quantizer's default mode):
// each row's range from its own values.
void quantize_rows_dynamic(float* x, int64_t rows, int64_t cols, int bits);

}  // namespace calq::train
