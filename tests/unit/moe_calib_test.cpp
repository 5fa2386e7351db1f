// MoE calibration (docs/moe.md, pipeline::MoeCalibOptions): the Hessian each expert of a small
// random Qwen3-MoE is quantized with, in every mode (routed, routed + blend below
// --moe-min-tokens, all-experts, shared, routing-weighted), checked against a reference computed
// here from the router's input alone: routing (softmax, top-k, renormalisation), expert inputs
// and down-projection inputs are recomputed with plain fp64 loops, the Hessian built from them,
// and GPTQ run on it; the pipeline's codes must match. Also: batching experts under a Hessian
// memory limit and quantizing them on several threads change nothing, and the report names every
// expert that fell back.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>

#include "calq/engine/engine.h"
#include "calq/io/config.h"
#include "calq/model/synth.h"
#include "calq/pipeline/calibrated.h"
#include "calq/pipeline/quantize.h"
#include "calq/quant/gptq.h"
#include "calq/quant/hessian.h"
#include "support.h"

using namespace calq;
using nlohmann::json;
namespace fs = std::filesystem;
using calq_test::TempDir;

namespace {

constexpr int64_t kH = 64, kI = 32, kE = 8, kK = 2;

struct Fixture {
  TempDir t;
  fs::path model, text;
  bool ok = false;
  Fixture() {
    const fs::path tok = calq_test::shared_file("data/models/bench-qwen3-28m/tokenizer.json");
    if (tok.empty()) return;
    model = t / "moe";
    json c = {{"architectures", {"Qwen3MoeForCausalLM"}},
              {"model_type", "qwen3_moe"},
              {"hidden_act", "silu"},
              {"hidden_size", kH},
              {"intermediate_size", 128},
              {"moe_intermediate_size", kI},
              {"num_experts", kE},
              {"num_experts_per_tok", kK},
              {"norm_topk_prob", true},
              {"decoder_sparse_step", 1},
              {"mlp_only_layers", json::array()},
              {"head_dim", 16},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"num_hidden_layers", 1},
              {"max_position_embeddings", 256},
              {"rms_norm_eps", 1e-6},
              {"rope_theta", 10000.0},
              {"tie_word_embeddings", false},
              {"vocab_size", 8192}};
    model::SynthOptions o;
    o.dtype = DType::F32;
    o.seed = 11;
    o.std = 0.25f;  // a router with clear preferences: some experts get few tokens
    model::write_random_model(io::parse_config(c), model, o);
    fs::copy_file(tok, model / "tokenizer.json");
    const fs::path tc = calq_test::shared_file("data/models/bench-qwen3-28m/tokenizer_config.json");
    if (!tc.empty()) fs::copy_file(tc, model / "tokenizer_config.json");
    // Calibration text: pseudo-random words (a fixed seed), enough for 6 sequences of 48 tokens.
    text = t / "calib.txt";
    std::mt19937 rng(3);
    const char* words[] = {"the", "model", "expert", "river", "stone", "quantize", "light", "seven", "code",
                           "north", "market", "window", "garden", "signal", "paper", "glass"};
    std::string s;
    for (int i = 0; i < 2000; ++i) s += std::string(words[rng() % 16]) + (i % 13 == 12 ? ".\n\n" : " ");
    calq_test::write_file(text, s);
    ok = true;
  }
};

pipeline::GptqPipelineOptions base_options(const Fixture& f, const fs::path& work) {
  pipeline::GptqPipelineOptions g;
  g.calib.source = f.text.string();
  g.calib.select.samples = 6;
  g.calib.select.seq_len = 48;
  g.calib.batch = 4;
  g.true_sequential = false;  // one pass over layer 0 with the original weights: the reference sees the same inputs
  g.gptq.block_size = 16;
  g.storage.work_dir = work;
  g.storage.overwrite = true;
  g.min_tokens = 1;
  g.moe.token_weight = pipeline::MoeCalibOptions::TokenWeight::Uniform;  // the weighted case sets Routing
  return g;
}

std::vector<pipeline::TensorPlan> make_plan(const Fixture& f) {
  pipeline::QuantizeOptions q;
  q.input = f.model;
  q.output = f.t / "unused";
  q.method = "gptq";
  q.plan.format = quant::Format::parse("int4", 16, true);
  q.plan.group_size_explicit = true;
  q.dry_run = true;
  return pipeline::quantize_model(q).plan;
}

struct MoeRun {
  std::map<std::string, quant::QuantizedWeight> w;  // module -> weight
  json report;
};

MoeRun run(const Fixture& f, const pipeline::GptqPipelineOptions& g, const std::string& tag) {
  const auto plan = make_plan(f);
  MoeRun r;
  auto res = pipeline::run_gptq(f.model, plan, g, json{{"tag", tag}}, r.report);
  for (const auto& p : plan)
    if (auto q = res.weight(p)) r.w.emplace(p.module, std::move(*q));
  res.work_dir().remove();
  return r;
}

// The router's input (post-attention RMSNorm output) of every real calibration token, from the
// engine with the original weights.
struct RouterInput {
  std::vector<double> x;  // tokens × kH
  int64_t tokens = 0;
};

RouterInput router_input(const Fixture& f, const pipeline::GptqPipelineOptions& g) {
  auto m = engine::Model::load(f.model);
  auto ci = pipeline::load_calibration(f.model, g.calib);
  struct Obs : engine::Observer {
    RouterInput* ri;
    void on_linear_input(const engine::LinearInput& in) override {
      if (in.modules.front() != "model.layers.0.mlp.gate") return;
      for (int64_t r = 0; r < in.rows; ++r) {
        if (!in.real[r]) continue;
        for (int64_t c = 0; c < in.cols; ++c) ri->x.push_back(in.x[r * in.cols + c]);
        ++ri->tokens;
      }
    }
  } obs;
  RouterInput ri;
  obs.ri = &ri;
  const int64_t n = static_cast<int64_t>(ci.set.tokens.size());
  for (int64_t s0 = 0; s0 < n; s0 += g.calib.batch) {
    engine::Batch b;
    b.batch = std::min<int64_t>(g.calib.batch, n - s0);
    b.seq = ci.set.seq_len;
    for (int64_t i = 0; i < b.batch; ++i) {
      b.tokens.insert(b.tokens.end(), ci.set.tokens[s0 + i].begin(), ci.set.tokens[s0 + i].end());
      b.lengths.push_back(ci.set.lengths[s0 + i]);
    }
    auto h = m.embed(b);
    m.run_layer(0, h, &obs);
  }
  return ri;
}

// Plain fp64 reference of one layer's experts: routing and the inputs of every expert module.
struct Reference {
  int64_t T = 0;
  std::vector<std::vector<int64_t>> routed_rows;    // expert -> token indices
  std::vector<std::vector<double>> routed_weight;   // expert -> routing weight per routed token
  std::vector<std::vector<double>> down_in;         // expert -> T × kI: down input of every token
  const RouterInput* ri = nullptr;

  Reference(const Fixture& f, const RouterInput& in) : T(in.tokens), ri(&in) {
    auto m = engine::Model::load(f.model);
    const auto wr = m.weight("model.layers.0.mlp.gate");  // [kE, kH]
    routed_rows.resize(kE);
    routed_weight.resize(kE);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> lg(kE), p(kE);
      for (int64_t e = 0; e < kE; ++e)
        for (int64_t c = 0; c < kH; ++c) lg[e] += static_cast<double>(static_cast<float>(wr[e * kH + c])) * in.x[t * kH + c];
      const double mx = *std::max_element(lg.begin(), lg.end());
      double s = 0;
      for (int64_t e = 0; e < kE; ++e) s += (p[e] = std::exp(lg[e] - mx));
      std::vector<int64_t> idx(kE);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
      const double top = p[idx[0]] + p[idx[1]];
      for (int64_t j = 0; j < kK; ++j) {
        routed_rows[idx[j]].push_back(t);
        routed_weight[idx[j]].push_back(p[idx[j]] / top);
      }
      (void)s;
    }
    down_in.resize(kE);
    for (int64_t e = 0; e < kE; ++e) {
      const std::string ep = "model.layers.0.mlp.experts." + std::to_string(e) + ".";
      const auto wg = m.weight(ep + "gate_proj"), wu = m.weight(ep + "up_proj");
      auto& d = down_in[e];
      d.assign(static_cast<size_t>(T * kI), 0.0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < kI; ++i) {
          double gv = 0, uv = 0;
          for (int64_t c = 0; c < kH; ++c) {
            gv += static_cast<double>(wg[i * kH + c]) * in.x[t * kH + c];
            uv += static_cast<double>(wu[i * kH + c]) * in.x[t * kH + c];
          }
          d[t * kI + i] = gv / (1 + std::exp(-gv)) * uv;
        }
    }
  }
  // Σ w² x xᵀ / Σ w² over `rows` (w = 1 when `weights` is null) of the input matrix X (T × n).
  static std::vector<double> hessian(const std::vector<double>& X, int64_t n, const std::vector<int64_t>& rows,
                                     const std::vector<double>* weights) {
    std::vector<double> h(static_cast<size_t>(n * n), 0.0);
    double wsum = 0;
    for (size_t k = 0; k < rows.size(); ++k) {
      const double w = weights ? (*weights)[k] * (*weights)[k] : 1.0;
      const double* x = X.data() + rows[k] * n;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) h[i * n + j] += w * x[i] * x[j];
      wsum += w;
    }
    if (wsum > 0)
      for (auto& v : h) v /= wsum;
    return h;
  }
  std::vector<int64_t> all_rows() const {
    std::vector<int64_t> r(static_cast<size_t>(T));
    std::iota(r.begin(), r.end(), 0);
    return r;
  }
  const std::vector<double>& input_of(int64_t e, bool down) const { return down ? down_in[e] : ri->x; }
  // Expert e's gate/up (down = false) or down input Hessian: over its routed tokens (weighted by
  // the routing weight when `weighted`), or over every token.
  std::vector<double> routed(int64_t e, bool down, bool weighted = false) const {
    return hessian(input_of(e, down), down ? kI : kH, routed_rows[e], weighted ? &routed_weight[e] : nullptr);
  }
  std::vector<double> every(int64_t e, bool down) const {
    return hessian(input_of(e, down), down ? kI : kH, all_rows(), nullptr);
  }
};

// Share of codes equal between the pipeline's weight and GPTQ on the reference Hessian.
double agreement(engine::Model& m, const MoeRun& run, const std::string& mod, const std::vector<double>& H) {
  const auto w = m.weight(mod);
  const auto& q = run.w.at(mod);
  quant::GptqOptions go;
  go.block_size = 16;
  auto ref = quant::gptq_quantize(w.data(), q.rows, q.cols, H, q.format, go, mod);
  int64_t same = 0;
  for (size_t i = 0; i < q.codes.size(); ++i) same += q.codes[i] == ref.q.codes[i];
  return static_cast<double>(same) / static_cast<double>(q.codes.size());
}

std::string emod(int64_t e, const char* leaf) {
  return "model.layers.0.mlp.experts." + std::to_string(e) + "." + leaf;
}

// Runs the check for every expert module: the reference Hessian gives (almost exactly: fp32
// block products against fp64 sums) the pipeline's codes, and a deliberately wrong Hessian
// (the other mode's) gives clearly fewer equal codes somewhere, so the check can fail.
void expect_hessians(const Fixture& f, const MoeRun& r, const std::function<std::vector<double>(int64_t, bool)>& ref,
                     const std::function<std::vector<double>(int64_t, bool)>& wrong) {
  double worst = 1, wrong_worst = 1;
  auto m = engine::Model::load(f.model);
  for (int64_t e = 0; e < kE; ++e)
    for (const char* leaf : {"gate_proj", "up_proj", "down_proj"}) {
      const bool down = std::string(leaf) == "down_proj";
      const double a = agreement(m, r, emod(e, leaf), ref(e, down));
      // fp32 block products against fp64 sums flip a few codes through GPTQ's error propagation
      // (pooled shared Hessians: 99.32 % at worst); a wrong Hessian gives about 10 %.
      EXPECT_GE(a, 0.99) << emod(e, leaf);
      worst = std::min(worst, a);
      wrong_worst = std::min(wrong_worst, agreement(m, r, emod(e, leaf), wrong(e, down)));
    }
  std::printf("code agreement: reference Hessian >= %.4f, wrong Hessian >= %.4f\n", worst, wrong_worst);
  EXPECT_LT(wrong_worst, worst - 0.02) << "the wrong Hessian is indistinguishable: the test would not fail";
}

}  // namespace

TEST(MoeCalib, RoutedHessiansAndBlendBelowMinTokens) {
  Fixture f;
  if (!f.ok) GTEST_SKIP() << "../shared absent (tokenizer)";
  auto g = base_options(f, f.t / "work");
  const auto ri = router_input(f, g);
  const Reference ref(f, ri);
  std::vector<int64_t> counts;
  for (auto& r : ref.routed_rows) counts.push_back(static_cast<int64_t>(r.size()));
  auto sorted = counts;
  std::sort(sorted.begin(), sorted.end());
  ASSERT_LT(sorted.front(), sorted.back()) << "routing is uniform: the fixture cannot test the blend";
  // N between the counts: some experts blend, some do not.
  const int64_t N = (sorted[2] + sorted[3]) / 2 + 1;
  g.moe.min_tokens = N;
  const MoeRun r = run(f, g, "blend");
  // The routed count of every expert is reported, and exactly the experts below N fell back.
  std::set<std::string> fell;
  for (auto& fb : r.report["moe"]["fallback"]) fell.insert(fb["module"].get<std::string>());
  for (int64_t e = 0; e < kE; ++e) {
    EXPECT_EQ(r.report["moe"]["layers"]["0"][std::to_string(e)]["routed_tokens"].get<int64_t>(), counts[e]);
    for (const char* leaf : {"gate_proj", "up_proj", "down_proj"})
      EXPECT_EQ(fell.count(emod(e, leaf)) > 0, counts[e] < N) << emod(e, leaf) << " tokens " << counts[e];
  }
  auto expected = [&](int64_t e, bool down) {
    auto Hr = ref.routed(e, down);
    const int64_t c = counts[e];
    if (c >= N) return Hr;
    auto Ha = ref.every(e, down);
    const double a = static_cast<double>(c) / static_cast<double>(N);
    for (size_t i = 0; i < Ha.size(); ++i) Ha[i] = a * Hr[i] + (1 - a) * Ha[i];
    return Ha;
  };
  expect_hessians(f, r, expected, [&](int64_t e, bool down) {
    // For experts that did not blend, "wrong" = the every-token Hessian.
    return counts[e] < N ? ref.routed(e, down) : ref.every(e, down);
  });
  // Every expert module was quantized by GPTQ (never RTN), with its Hessian kind recorded.
  for (auto& m : r.report["gptq"]["modules"]) {
    EXPECT_FALSE(m.contains("fallback")) << m.dump();
    if (m.contains("expert")) EXPECT_TRUE(m["hessian"] == "routed" || m["hessian"] == "blend");
  }
}

TEST(MoeCalib, AllExpertsSharedAndRoutingWeights) {
  Fixture f;
  if (!f.ok) GTEST_SKIP() << "../shared absent (tokenizer)";
  auto g = base_options(f, f.t / "work");
  const auto ri = router_input(f, g);
  const Reference ref(f, ri);
  auto routed = [&](int64_t e, bool down) { return ref.routed(e, down); };
  auto every = [&](int64_t e, bool down) { return ref.every(e, down); };
  {  // all-experts: every token's statistics through every expert
    auto ga = g;
    ga.moe.calibration = pipeline::MoeCalibOptions::Calibration::AllExperts;
    const MoeRun r = run(f, ga, "all");
    expect_hessians(f, r, every, routed);
    EXPECT_TRUE(r.report["moe"]["fallback"].empty());
  }
  {  // shared: gate/up of every expert use the pooled routed inputs, downs the pooled down inputs
    auto gs = g;
    gs.moe.hessian = pipeline::MoeCalibOptions::Hessian::Shared;
    const MoeRun r = run(f, gs, "shared");
    auto pooled = [&](int64_t, bool down) {
      const int64_t n = down ? kI : kH;
      std::vector<double> h(static_cast<size_t>(n * n), 0.0);
      double tokens = 0;
      for (int64_t e = 0; e < kE; ++e) {
        auto he = routed(e, down);
        const double c = static_cast<double>(ref.routed_rows[e].size());
        for (size_t i = 0; i < h.size(); ++i) h[i] += c * he[i];
        tokens += c;
      }
      for (auto& v : h) v /= tokens;
      return h;
    };
    expect_hessians(f, r, pooled, routed);
  }
  {  // routing-weighted routed statistics (min-tokens off: no blend)
    auto gw = g;
    gw.moe.token_weight = pipeline::MoeCalibOptions::TokenWeight::Routing;
    gw.moe.min_tokens = 0;
    const MoeRun r = run(f, gw, "weighted");
    expect_hessians(
        f, r,
        [&](int64_t e, bool down) {
          // An expert without routed tokens takes the every-token Hessian even with --moe-min-tokens 0.
          if (ref.routed_rows[e].empty()) return every(e, down);
          return ref.routed(e, down, true);
        },
        routed);
  }
}

TEST(MoeCalib, BatchingAndThreadsChangeNothing) {
  Fixture f;
  if (!f.ok) GTEST_SKIP() << "../shared absent (tokenizer)";
  auto g = base_options(f, f.t / "work");
  g.true_sequential = true;
  g.moe.threads = 1;
  const MoeRun a = run(f, g, "serial");
  auto gb = g;
  gb.moe.hessian_memory = 1;  // one expert per batch: one calibration pass each
  gb.moe.threads = 4;
  const MoeRun b = run(f, gb, "batched");
  ASSERT_EQ(a.w.size(), b.w.size());
  for (const auto& [mod, q] : a.w) {
    EXPECT_EQ(q.codes, b.w.at(mod).codes) << mod;
    ASSERT_EQ(q.params.size(), b.w.at(mod).params.size());
    for (size_t i = 0; i < q.params.size(); ++i) EXPECT_EQ(q.params[i].scale, b.w.at(mod).params[i].scale) << mod;
  }
}

// The layer cache (engine::LayerCache) on a MoE model, true-sequential: expert passes start from
// the residual after attention; blend passes (--moe-min-tokens) and all-experts feeds too. Same
// codes and scales as without it.
TEST(MoeCalib, LayerCacheChangesNothing) {
  Fixture f;
  if (!f.ok) GTEST_SKIP() << "../shared absent (tokenizer)";
  auto g = base_options(f, f.t / "work");
  g.true_sequential = true;
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant == 0 ? "routed, min-tokens blend" : "all-experts");
    auto gv = g;
    if (variant == 0)
      gv.moe.min_tokens = 1000;  // every expert blends: a second pass per step
    else
      gv.moe.calibration = pipeline::MoeCalibOptions::Calibration::AllExperts;
    auto off = gv;
    off.storage.layer_cache_memory = 0;
    const MoeRun a = run(f, gv, "cached"), b = run(f, off, "uncached");
    const auto& lc = a.report["gptq"]["layer_cache"];
    EXPECT_GT(lc["bytes"].get<uint64_t>(), 0u);
    EXPECT_GT(lc["runs_from_mid"].get<int64_t>(), 0);
    EXPECT_EQ(b.report["gptq"]["layer_cache"]["bytes"].get<uint64_t>(), 0u);
    EXPECT_EQ(b.report["gptq"]["layer_cache"]["runs_from_mid"].get<int64_t>(), 0);
    ASSERT_EQ(a.w.size(), b.w.size());
    for (const auto& [mod, q] : a.w) {
      EXPECT_EQ(q.codes, b.w.at(mod).codes) << mod;
      ASSERT_EQ(q.params.size(), b.w.at(mod).params.size());
      for (size_t i = 0; i < q.params.size(); ++i) EXPECT_EQ(q.params[i].scale, b.w.at(mod).params[i].scale) << mod;
    }
  }
}

TEST(HessianAccumulator, WeightedMatchesPlainSum) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0, 1);
  std::uniform_real_distribution<float> ud(0, 1);
  const int64_t n = 7, rows = 1100;  // crosses the 512-row block twice
  std::vector<float> x(static_cast<size_t>(rows * n)), w(rows);
  std::vector<uint8_t> mask(rows);
  for (auto& v : x) v = nd(rng) * (ud(rng) < 0.01f ? 100.f : 1.f);  // a few large values
  for (int64_t r = 0; r < rows; ++r) {
    w[r] = r % 17 == 0 ? 0.f : ud(rng);  // zero weights too
    mask[r] = r % 5 != 0;
  }
  quant::HessianAccumulator acc(n);
  acc.add_weighted(x.data(), rows, mask.data(), w.data());
  std::vector<double> ref(static_cast<size_t>(n * n), 0.0);
  double ws = 0;
  int64_t tokens = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!mask[r]) continue;
    const double ww = static_cast<double>(w[r]) * w[r];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) ref[i * n + j] += ww * x[r * n + i] * x[r * n + j];
    ws += ww;
    ++tokens;
  }
  const auto h = acc.hessian();
  EXPECT_EQ(acc.tokens(), tokens);
  EXPECT_NEAR(acc.weight(), ws, 1e-9 * ws);
  for (size_t i = 0; i < h.size(); ++i) EXPECT_NEAR(h[i], ref[i] / ws, 1e-5 * (std::fabs(ref[i] / ws) + 1)) << i;
  // Unit weights are the plain accumulator.
  quant::HessianAccumulator plain(n), ones(n);
  std::vector<float> one(rows, 1.f);
  plain.add(x.data(), rows, mask.data());
  ones.add_weighted(x.data(), rows, mask.data(), one.data());
  EXPECT_EQ(plain.hessian(), ones.hessian());
  // A negative or NaN weight is refused.
  std::vector<float> bad(rows, 1.f);
  bad[3] = -1.f;
  quant::HessianAccumulator b(n);
  EXPECT_THROW(b.add_weighted(x.data(), rows, nullptr, bad.data()), std::exception);
}

// The statistics-only feed (Observer::all_tokens) sends every token through the experts it names,
// reports those inputs as not routed, and leaves the layer's output exactly as without it.
TEST(MoeCalib, AllTokensFeedLeavesTheOutputAlone) {
  Fixture f;
  if (!f.ok) GTEST_SKIP() << "../shared absent (tokenizer)";
  auto m = engine::Model::load(f.model);
  engine::Batch b;
  b.batch = 2;
  b.seq = 24;
  for (int i = 0; i < 48; ++i) b.tokens.push_back((i * 37 + 11) % 8000);
  b.lengths = {24, 17};  // padding in the second sequence
  auto plain = m.embed(b);
  auto fed = plain;
  m.run_layer(0, plain);
  struct Obs : engine::Observer {
    std::map<int64_t, int64_t> routed, all;  // expert -> rows seen by its gate/up input
    bool all_tokens(int64_t, int64_t e) const override { return e % 2 == 1; }
    void on_linear_input(const engine::LinearInput& in) override {
      if (in.expert < 0 || in.modules.front().find("gate_proj") == std::string::npos) return;
      (in.routed ? routed : all)[in.expert] += in.rows;
      if (!in.routed) EXPECT_EQ(in.token_rows, nullptr);
    }
  } obs;
  m.run_layer(0, fed, &obs);
  ASSERT_EQ(plain.data.size(), fed.data.size());
  for (size_t i = 0; i < plain.data.size(); ++i) ASSERT_EQ(plain.data[i], fed.data[i]) << i;
  for (int64_t e = 0; e < kE; ++e) EXPECT_EQ(obs.all.count(e) ? obs.all.at(e) : 0, e % 2 == 1 ? 48 : 0) << e;
  int64_t routed = 0;
  for (auto& [e, n] : obs.routed) routed += n;
  EXPECT_EQ(routed, 48 * kK) << "every row (padding included) is routed to top-k experts";
}

// Activation-aware RTN on a MoE layer: every expert's down_proj gets input scales from its own
// routed tokens, folded into the same expert's up_proj rows. The written checkpoint must compute
// the layer better than plain RTN does (a wrong fold would wreck it), and the report must pair each
// expert's down with its own up and its routed token count.
TEST(MoeCalib, ActRtnScalesEachExpertFromItsRoutedTokens) {
  Fixture f;
  if (!f.ok) GTEST_SKIP() << "../shared absent (tokenizer)";
  auto g = base_options(f, f.t / "work");
  const auto ri = router_input(f, g);
  const Reference ref(f, ri);
  pipeline::QuantizeOptions q;
  q.input = f.model;
  q.method = "rtn";
  q.plan.format = quant::Format::parse("int4", 16, true);
  q.plan.group_size_explicit = true;
  // Plain RTN.
  q.output = f.t / "rtn";
  pipeline::quantize_model(q);
  // Activation-aware RTN from the same calibration text.
  pipeline::ActRtnOptions ar;
  ar.calib = g.calib;
  ar.storage.work_dir = f.t / "work-act";
  ar.min_tokens = 16;
  json report;
  auto dry = q;
  dry.dry_run = true;
  const auto plan = pipeline::quantize_model(dry).plan;
  auto res = std::make_shared<pipeline::CalibratedResults>(pipeline::run_act_rtn(f.model, plan, ar, json{{"t", 1}}, report));
  q.output = f.t / "act";
  q.quantizer = [res](const pipeline::TensorPlan& p) { return res->weight(p); };
  q.replace = [res](const pipeline::TensorPlan& p) { return res->replaced(p.name); };
  pipeline::quantize_model(q);
  res->work_dir().remove();

  int scaled = 0;
  for (auto& row : report["act_scale"]["inputs"]) {
    const std::string m0 = row["modules"][0];
    const size_t at = m0.find(".experts.");
    if (at == std::string::npos || m0.find("down_proj") == std::string::npos) continue;
    const int64_t e = std::stoll(m0.substr(at + 9));
    const int64_t n = static_cast<int64_t>(ref.routed_rows[e].size());
    if (n < 16) {
      EXPECT_FALSE(row["scaled"].get<bool>()) << m0;
      continue;
    }
    EXPECT_EQ(row["tokens"].get<int64_t>(), n) << m0;
    if (row["scaled"].get<bool>()) {
      ++scaled;
      EXPECT_EQ(row["fold"], emod(e, "up_proj")) << m0;
      EXPECT_LE(row["output_error"].get<double>(), row["output_error_rtn"].get<double>() * (1 + 1e-9)) << m0;
    }
  }
  EXPECT_GE(scaled, 3) << report["act_scale"].dump();
  // The layer's output on the calibration tokens' embeddings: act-RTN closer to the original.
  auto layer_out = [&](const fs::path& dir) {
    auto m = engine::Model::load(dir);
    engine::Batch b;
    b.batch = 2;
    b.seq = 48;
    auto ci = pipeline::load_calibration(f.model, g.calib);
    for (int i = 0; i < 2; ++i) b.tokens.insert(b.tokens.end(), ci.set.tokens[i].begin(), ci.set.tokens[i].end());
    auto h = m.embed(b);
    m.run_layer(0, h);
    return h.data;
  };
  const auto base = layer_out(f.model), rtn = layer_out(f.t / "rtn"), act = layer_out(f.t / "act");
  double e_rtn = 0, e_act = 0, norm = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    e_rtn += (rtn[i] - base[i]) * (rtn[i] - base[i]);
    e_act += (act[i] - base[i]) * (act[i] - base[i]);
    norm += base[i] * base[i];
  }
  std::printf("layer output relative error: rtn %.5f, act-rtn %.5f\n", std::sqrt(e_rtn / norm), std::sqrt(e_act / norm));
  EXPECT_LT(e_act, e_rtn);
}
