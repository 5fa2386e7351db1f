// Cyclic precision training pieces: the scheduler's sequences (computed by hand from the formula),
// the fake quantizers' values and level counts, per-precision ranges, gradient quantization, and
// the lazy CalibrationManager (exactly once per used precision, never for unused ones).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>

#include "calq/core/error.h"
#include "calq/model/layout.h"
#include "calq/train/cpt.h"
#include "calq/train/trainer.h"

using namespace calq;
using namespace calq::train;
using Unit = CyclicPrecisionScheduler::Unit;

namespace {
std::vector<int> seq(const CyclicPrecisionScheduler& s, int64_t n) {
  std::vector<int> v;
  for (int64_t t = 0; t < n; ++t) v.push_back(s.precision(t));
  return v;
}
}  // namespace

TEST(CptScheduler, DocumentedSequences) {
  // 4..8, 10 steps, 2 cycles: T = 5; 4 + 2(1 - cos(pi k/5)) = 4, 4.38, 5.38, 6.62, 7.62.
  EXPECT_EQ(seq(CyclicPrecisionScheduler(4, 8, 10, 2, Unit::Iteration), 10),
            (std::vector<int>{4, 4, 5, 7, 8, 4, 4, 5, 7, 8}));
  // The paper's Eq. 1 sampled 10 times per cycle, 2..9 (research notes 4.3): 2 2 3 3 4 6 7 8 8 9.
  EXPECT_EQ(seq(CyclicPrecisionScheduler(2, 9, 20, 2, Unit::Iteration), 20),
            (std::vector<int>{2, 2, 3, 3, 4, 6, 7, 8, 8, 9, 2, 2, 3, 3, 4, 6, 7, 8, 8, 9}));
  // Per epoch: 10 epochs, 5 cycles of 2 epochs over 4..8: 4, 6 (4 + 2(1 - cos(pi/2))).
  EXPECT_EQ(seq(CyclicPrecisionScheduler(4, 8, 10, 5, Unit::Epoch), 10),
            (std::vector<int>{4, 6, 4, 6, 4, 6, 4, 6, 4, 6}));
  // min == max: constant.
  EXPECT_EQ(seq(CyclicPrecisionScheduler(6, 6, 5, 2, Unit::Iteration), 5), (std::vector<int>{6, 6, 6, 6, 6}));
}

TEST(CptScheduler, ThirtyTwoCyclesOverTenEpochs) {
  // The seed's case: bits 5..6, 10 epochs, 32 cycles. Per iteration with 8 steps per epoch:
  // T = 80/32 = 2.5 steps; t mod 2.5 = 0, 1, 2, 0.5, 1.5 -> 5, 5.35, 5.90, 5.10, 5.65 -> 5 5 6 5 6.
  CyclicPrecisionScheduler s(5, 6, 80, 32, Unit::Iteration);
  EXPECT_DOUBLE_EQ(s.period(), 2.5);
  const auto v = seq(s, 80);
  for (int64_t t = 0; t < 80; ++t) EXPECT_EQ(v[t], (std::vector<int>{5, 5, 6, 5, 6})[t % 5]) << t;
  // 4..8 with 100 steps per epoch: T = 31.25; 32 rises (31 drops back to the minimum), every cycle
  // reaching 8.
  CyclicPrecisionScheduler s2(4, 8, 1000, 32, Unit::Iteration);
  const auto w = seq(s2, 1000);
  int drops = 0;
  for (size_t t = 1; t < w.size(); ++t) drops += w[t] < w[t - 1];
  EXPECT_EQ(drops, 31);
  EXPECT_EQ(w[0], 4);
  EXPECT_EQ(w[31], 8);  // 31 mod 31.25 = 31: 4 + 2(1 - cos(0.992 pi)) = 7.9994
  EXPECT_EQ(w[32], 4);  // 32 mod 31.25 = 0.75: 4.006
}

TEST(CptScheduler, PerEpochRejectsMoreCyclesThanEpochs) {
  try {
    CyclicPrecisionScheduler(5, 6, 10, 32, Unit::Epoch);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--schedule iter"), std::string::npos) << e.what();
  }
  EXPECT_THROW(CyclicPrecisionScheduler(8, 4, 10, 2, Unit::Iteration), Error);   // min > max
  EXPECT_THROW(CyclicPrecisionScheduler(4, 8, 3, 32, Unit::Iteration), Error);   // < 2 steps per cycle
  EXPECT_THROW(CyclicPrecisionScheduler(1, 4, 10, 2, Unit::Iteration), Error);   // below 2
  EXPECT_THROW(CyclicPrecisionScheduler(4, 17, 10, 2, Unit::Iteration), Error);  // above 16
}

TEST(CptQuant, MinMaxValuesAndLevels) {
  EXPECT_FLOAT_EQ(fq_minmax(0.34f, 0.1f, 4), 0.3f);
  EXPECT_FLOAT_EQ(fq_minmax(1.0f, 0.1f, 4), 0.7f);  // clamped to 7 levels
  EXPECT_FLOAT_EQ(fq_minmax(-1.0f, 0.1f, 4), -0.7f);  // narrow range: -7, not -8
  // Per-row weights: row absmax / 7 at 4 bits.
  FakeQuantizer q(QuantKind::MinMax, Granularity::Row);
  const std::vector<float> W = {0.7f, -0.36f, 0.1f, 14.0f, 1.0f, -2.0f};
  q.observe(W.data(), 2, 3);
  q.finish(4);
  q.finish(8);
  std::vector<float> y(6);
  q.apply(4, W.data(), y.data(), 2, 3, "w");
  EXPECT_FLOAT_EQ(y[1], -0.4f);  // -3.6 -> -4, x 0.1
  EXPECT_FLOAT_EQ(y[2], 0.1f);
  EXPECT_FLOAT_EQ(y[4], 0.0f);   // 1/2 = 0.5 -> 0 (ties to even)
  EXPECT_FLOAT_EQ(y[5], -2.0f);
  EXPECT_THROW(q.apply(6, W.data(), y.data(), 2, 3, "w"), Error);  // never silently unquantized
  // 2^b - 1 distinct values over a dense ramp.
  for (int b : {2, 3, 4, 6}) {
    FakeQuantizer t(QuantKind::MinMax, Granularity::Tensor);
    std::vector<float> x(2001);
    for (int i = 0; i < 2001; ++i) x[i] = -1.0f + i * 0.001f;
    t.observe(x.data(), 1, 2001);
    t.finish(b);
    t.apply(b, x.data(), x.data(), 1, 2001, "x");
    EXPECT_EQ(std::set<float>(x.begin(), x.end()).size(), static_cast<size_t>((1 << b) - 1)) << b;
  }
}

TEST(CptQuant, LogQuantizer) {
  // zp = -4, R = 4, 3 bits: L = 3 magnitudes 2^-4, 2^-2, 2^0 (step 2 in log2).
  EXPECT_FLOAT_EQ(fq_log(0.3f, -4, 4, 3), 0.25f);  // log2 0.3 = -1.74 -> k = round(1.13) = 1
  EXPECT_FLOAT_EQ(fq_log(-0.9f, -4, 4, 3), -1.0f);
  EXPECT_FLOAT_EQ(fq_log(5.0f, -4, 4, 3), 1.0f);   // clipped to the top level
  EXPECT_FLOAT_EQ(fq_log(0.02f, -4, 4, 3), 0.0f);  // below zp - step/2 = -5: zero
  EXPECT_FLOAT_EQ(fq_log(0.04f, -4, 4, 3), 0.0625f);
  EXPECT_FLOAT_EQ(fq_log(0.0f, -4, 4, 3), 0.0f);
  // Zeros do not pull the range down (the seed's 1e-5 floor did); b bits give at most 2^b - 1 values.
  FakeQuantizer q(QuantKind::Log, Granularity::Tensor);
  std::vector<float> x = {0.0f, 0.0f, 0.5f, -0.125f, 2.0f};
  q.observe(x.data(), 1, 5);
  q.finish(3);
  EXPECT_FLOAT_EQ(q.params(3).a[0], -3.0f);  // log2(0.125)
  EXPECT_FLOAT_EQ(q.params(3).b[0], 4.0f);
  for (int b : {2, 3, 5}) {
    std::mt19937_64 g(b);
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> v(5000);
    for (auto& e : v) e = d(g);
    FakeQuantizer t(QuantKind::Log, Granularity::Tensor);
    t.observe(v.data(), 1, 5000);
    t.finish(b);
    t.apply(b, v.data(), v.data(), 1, 5000, "v");
    EXPECT_LE(std::set<float>(v.begin(), v.end()).size(), static_cast<size_t>((1 << b) - 1)) << b;
  }
}

namespace {

io::ModelConfig tiny_qwen3() {
  return io::parse_config({{"model_type", "qwen3"}, {"hidden_size", 16}, {"intermediate_size", 24},
                           {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                           {"head_dim", 8}, {"vocab_size", 29}, {"max_position_embeddings", 32}},
                          "tiny-qwen3");
}

Model tiny_model(uint64_t seed, int64_t rank = 4) {
  const auto cfg = tiny_qwen3();
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::map<std::string, std::vector<float>> t;
  for (const auto& e : model::expected_tensors(cfg)) {
    std::vector<float> v(static_cast<size_t>(shape_numel(e.shape)));
    for (auto& x : v) x = e.is_norm ? 1.0f : 0.3f * d(g);
    t[e.name] = std::move(v);
  }
  ModelOptions o;
  o.lora.rank = rank;
  o.lora.head = true;
  auto m = Model::from_tensors(cfg, std::move(t), o);
  for (auto& L : m.linears())
    if (L.lora)
      for (auto& x : L.lora->B.value) x = 0.2f * d(g);
  return m;
}

std::vector<int32_t> tokens(uint64_t seed, int64_t n) {
  std::mt19937_64 g(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(g() % 29);
  return t;
}

std::vector<std::vector<float>> grads(Model& m) {
  std::vector<std::vector<float>> g;
  for (Param* p : m.params()) g.push_back(p->grad);
  return g;
}

}  // namespace

TEST(CptQuant, GradientQuantizationChangesGradients) {
  const auto tok = tokens(3, 2 * 8);
  auto m = tiny_model(1);
  m.zero_grad();
  m.loss(tok, 2, 8, true);
  const auto fp = grads(m);
  for (int mode = 0; mode < 2; ++mode) {
    CptOptions o;
    o.gradient_bits = 4;
    o.gradient_calibrated = mode == 1;
    CptQuantizers q(m, o);  // precision 0: forward in fp32, gradients quantized
    m.zero_grad();
    m.loss(tok, 2, 8, true);
    const auto gq = grads(m);
    EXPECT_GT(q.gradient_tensors_quantized(), 0);
    size_t k = 0;
    double diff = 0;
    for (Param* p : m.params()) {
      const Linear* owner = nullptr;
      for (const auto& L : m.linears())
        if (L.lora && (&L.lora->A == p || &L.lora->B == p)) owner = &L;
      ASSERT_NE(owner, nullptr);
      const int64_t rows = p->shape[0], cols = p->shape[1];
      // Dynamic mode: exactly the per-row 4-bit quantization of the fp gradient.
      auto ref = fp[k];
      quantize_rows_dynamic(ref.data(), rows, cols, 4);
      for (size_t i = 0; i < ref.size(); ++i) {
        diff += std::fabs(gq[k][i] - fp[k][i]);
        if (mode == 0) EXPECT_FLOAT_EQ(gq[k][i], ref[i]) << p->name;
      }
      for (int64_t r = 0; r < rows; ++r) {
        std::set<float> vals(gq[k].begin() + r * cols, gq[k].begin() + (r + 1) * cols);
        EXPECT_LE(vals.size(), 15u) << p->name;
      }
      ++k;
    }
    EXPECT_GT(diff, 1e-4) << "gradients unchanged by 4-bit quantization (mode " << mode << ")";
  }
}

TEST(CptQuant, QuantizedForwardDiffersAndPrecisionsKeepTheirRanges) {
  const auto tok = tokens(4, 2 * 8);
  auto m = tiny_model(2);
  const double fp = m.loss(tok, 2, 8, false);
  CptOptions o;
  o.quantize_inputs = true;
  o.gradient_bits = 0;
  CptQuantizers q(m, o);
  EXPECT_THROW(q.set_precision(4), Error);  // not calibrated: refused, never silently fp32
  int calls = 0;
  CalibrationManager cm(m, q, [&](int64_t k) { ++calls; return tokens(100 + k, 2 * 8); }, 2, 2, 8);
  cm.ensure_calibrated(4);
  cm.ensure_lora_calibrated(4);
  cm.ensure_calibrated(8);
  cm.ensure_lora_calibrated(8);
  EXPECT_EQ(calls, 4);
  q.set_precision(4);
  const double l4 = m.loss(tok, 2, 8, false);
  q.set_precision(8);
  const double l8 = m.loss(tok, 2, 8, false);
  q.set_precision(4);
  const double l4b = m.loss(tok, 2, 8, false);
  EXPECT_EQ(l4, l4b);  // 4-bit comes back with its own ranges
  EXPECT_GT(std::fabs(l4 - fp), std::fabs(l8 - fp));
  EXPECT_GT(std::fabs(l8 - fp), 0.0);
  q.set_precision(0);
  EXPECT_EQ(m.loss(tok, 2, 8, false), fp);
}

TEST(CptCalibration, ExactlyOncePerUsedPrecision) {
  auto m = tiny_model(5);
  CptOptions o;
  o.quantize_inputs = true;
  CptQuantizers q(m, o);
  int calls = 0;
  CalibrationManager cm(m, q, [&](int64_t k) { ++calls; return tokens(200 + k, 8); }, 3, 1, 8);
  CyclicPrecisionScheduler s(3, 6, 40, 4, Unit::Iteration);  // T = 10: 3 3 4 4 4 ... 6
  std::set<int> used;
  for (int64_t t = 0; t < 40; ++t) {
    const int b = s.precision(t);
    used.insert(b);
    cm.ensure_calibrated(b);
    cm.ensure_lora_calibrated(b);
    q.set_precision(b);
    m.zero_grad();
    m.loss(tokens(t, 8), 1, 8, true);
  }
  EXPECT_EQ(used, (std::set<int>{3, 4, 5, 6}));
  EXPECT_EQ(cm.calibrated_bits(), used);
  EXPECT_EQ(cm.lora_calibrated_bits(), used);
  for (int b = 2; b <= 16; ++b) EXPECT_EQ(cm.calibrations(b), used.count(b) ? 1 : 0) << b;
  EXPECT_EQ(calls, 3 * 4);  // 3 input batches per used precision
  EXPECT_TRUE(cm.gradient_calibrated());
  EXPECT_NE(cm.summary().find("Weight/Input calibrated bits: [3, 4, 5, 6]"), std::string::npos) << cm.summary();
  cm.recalibrate(4);
  EXPECT_EQ(cm.calibrations(4), 2);
  EXPECT_THROW(cm.recalibrate(7), Error);
}

TEST(CptQuant, FixedInputBitsKeyedByForwardPrecision) {
  // W4A8: input ranges calibrated at forward precision 4 but with 8-bit levels.
  auto m = tiny_model(7);
  std::vector<float> scale;
  for (int input_bits : {0, 8}) {
    CptOptions o;
    o.quantize_inputs = true;
    o.input_bits = input_bits;
    CptQuantizers q(m, o);
    CalibrationManager cm(m, q, [&](int64_t k) { return tokens(300 + k, 8); }, 1, 1, 8);
    cm.ensure_calibrated(4);
    scale.push_back(q.input_quantizer(0).params(4).a[0]);
    EXPECT_FALSE(q.input_quantizer(0).calibrated(8));
  }
  // Same statistics (the forward at 4 bits), levels 7 vs 127.
  EXPECT_NEAR(scale[0] * 7.0f, scale[1] * 127.0f, 1e-6f * scale[0] * 7.0f);
}

namespace {

// The precision range test's bound on hand-made accuracy curves (bits 2, 3, 4, ...).
TEST(Prt, LowerBoundRule) {
  using calq::train::prt_lower_bound;
  // 2→3 gains 0.005, 3→4 gains 0.02 > 0.01: the lower bound is 4.
  EXPECT_EQ(prt_lower_bound({0.10, 0.105, 0.125, 0.13}, 2, 0.01), 4);
  // The first precision over the threshold wins, not the largest gain.
  EXPECT_EQ(prt_lower_bound({0.10, 0.12, 0.20}, 2, 0.01), 3);
  // A gain equal to the threshold does not count (strictly greater).
  EXPECT_EQ(prt_lower_bound({0.10, 0.11, 0.115}, 2, 0.01), 3);  // none exceeds: largest gain (3)
  // None exceeds: the largest gain; ties keep the earliest.
  EXPECT_EQ(prt_lower_bound({0.25, 0.375, 0.5, 0.5625}, 2, 0.2), 3);  // dyadic: exact equal gains
  // Noise that lowers accuracy is no gain.
  EXPECT_EQ(prt_lower_bound({0.30, 0.20, 0.21}, 2, 0.05), 4);
  // One precision measured: that one; other starting widths shift the answer.
  EXPECT_EQ(prt_lower_bound({0.5}, 6, 0.01), 6);
  EXPECT_EQ(prt_lower_bound({0.10, 0.105, 0.125}, 4, 0.01), 6);
  EXPECT_THROW(prt_lower_bound({}, 2, 0.01), calq::Error);
}

}  // namespace
