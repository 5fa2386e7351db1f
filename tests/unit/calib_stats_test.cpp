// Activation statistics against brute force; imatrix GGUF contents and llama.cpp tensor names.
#include "calq/calib/stats.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "calq/core/error.h"
#include "calq/io/gguf.h"
#include "support.h"

namespace {

using namespace calq::calib;

TEST(InputStats, MatchBruteForce) {
  std::mt19937 rng(1);
  std::student_t_distribution<float> d(3.0f);  // heavy tails
  const int rows = 700, F = 13;
  std::vector<float> x(rows * F);
  for (auto& v : x) v = d(rng);
  x[F + 5] = 0.f;  // an exact zero in a kept row
  std::vector<uint8_t> mask(rows, 1);
  for (int r = 0; r < rows; r += 7) mask[r] = 0;
  for (int j = 0; j < F; ++j) x[0 * F + j] = 1e6f;  // masked row: must not count
  InputStats s(F);
  s.add(x.data(), 300, mask.data());
  InputStats s2(F);
  s2.add(x.data() + 300 * F, rows - 300, mask.data() + 300);
  s.merge(s2);
  std::vector<double> all;
  double mn = INFINITY, mx = -INFINITY;
  std::vector<double> cab(F, 0), csa(F, 0), css(F, 0);
  int64_t tokens = 0;
  for (int r = 0; r < rows; ++r) {
    if (!mask[r]) continue;
    ++tokens;
    for (int j = 0; j < F; ++j) {
      const double v = x[r * F + j];
      mn = std::min(mn, v);
      mx = std::max(mx, v);
      cab[j] = std::max(cab[j], std::fabs(v));
      csa[j] += std::fabs(v);
      css[j] += v * v;
      all.push_back(std::fabs(v));
    }
  }
  EXPECT_EQ(s.tokens, tokens);
  EXPECT_EQ(s.min, mn);
  EXPECT_EQ(s.max, mx);
  EXPECT_EQ(s.absmax, std::max(-mn, mx));
  for (int j = 0; j < F; ++j) {
    EXPECT_EQ(s.ch_absmax[j], cab[j]);
    EXPECT_NEAR(s.ch_sum_abs[j], csa[j], 1e-9 * csa[j]);
    EXPECT_NEAR(s.ch_sum_sq[j], css[j], 1e-9 * css[j]);
  }
  std::sort(all.begin(), all.end());
  for (double p : {50.0, 90.0, 99.0, 99.9, 100.0}) {
    const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * all.size()));
    const double exact = all[std::max<size_t>(rank, 1) - 1];
    const double got = s.abs_percentile(p);
    EXPECT_GE(got, exact) << p;
    EXPECT_LE(got, exact * 1.011) << p;
  }
  EXPECT_EQ(s.abs_percentile(0), 0.0);  // the exact zero
  std::vector<float> bad = {1.f, NAN};
  InputStats b(2);
  EXPECT_THROW(b.add(bad.data(), 1), calq::Error);
}

TEST(GgufNames, LlamaCppTensorNames) {
  using calq::io::Arch;
  auto n = [](const std::string& w, Arch a = Arch::Qwen3) { return gguf_tensor_name(w, a); };
  EXPECT_EQ(n("model.layers.3.self_attn.q_proj.weight").name, "blk.3.attn_q.weight");
  EXPECT_EQ(n("model.layers.3.self_attn.o_proj.weight").name, "blk.3.attn_output.weight");
  EXPECT_EQ(n("model.layers.0.mlp.down_proj.weight").name, "blk.0.ffn_down.weight");
  EXPECT_EQ(n("model.layers.0.self_attn.k_norm.weight").name, "blk.0.attn_k_norm.weight");
  EXPECT_EQ(n("lm_head.weight").name, "output.weight");
  EXPECT_EQ(n("model.embed_tokens.weight").name, "token_embd.weight");
  auto e = n("model.layers.2.mlp.experts.5.up_proj.weight", Arch::Qwen3Moe);
  EXPECT_EQ(e.name, "blk.2.ffn_up_exps.weight");
  EXPECT_EQ(e.expert, 5);
  EXPECT_EQ(n("model.layers.1.block_sparse_moe.experts.7.w2.weight", Arch::Mixtral).name, "blk.1.ffn_down_exps.weight");
  EXPECT_EQ(n("model.layers.1.block_sparse_moe.gate.weight", Arch::Mixtral).name, "blk.1.ffn_gate_inp.weight");
  EXPECT_EQ(n("transformer.h.4.attn.c_attn.weight", Arch::Gpt2).name, "blk.4.attn_qkv.weight");
  EXPECT_EQ(n("transformer.h.4.mlp.c_fc.weight", Arch::Gpt2).name, "blk.4.ffn_up.weight");
  EXPECT_TRUE(n("something.else.weight").name.empty());
}

TEST(Imatrix, GgufContents) {
  calq::io::ModelConfig cfg;
  cfg.arch = calq::io::Arch::Qwen3Moe;
  cfg.num_experts = 4;
  StatsCollector c;
  std::vector<float> x = {1, 2, 3, -1, 0, 2};  // 2 tokens × 3
  c.add({"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"},
        x.data(), 2, 3);
  std::vector<float> y = {2, 0, 1};
  c.add({"model.layers.0.mlp.experts.2.down_proj"}, y.data(), 1, 3);
  c.add({"model.layers.0.mlp.experts.0.down_proj"}, x.data(), 2, 3);
  EXPECT_EQ(c.of("model.layers.0.self_attn.k_proj").tokens, 2);
  calq_test::TempDir t;
  c.write_imatrix(t / "imatrix.gguf", cfg, {"calibration_datav3.txt"}, 3, 512);
  calq::io::GgufReader r(t / "imatrix.gguf");
  EXPECT_EQ(r.find("general.type")->as_str(), "imatrix");
  EXPECT_EQ(r.find("imatrix.chunk_count")->as_u64(), 3u);
  EXPECT_EQ(r.find("imatrix.chunk_size")->as_u64(), 512u);
  EXPECT_EQ(r.find("imatrix.datasets")->array[0].as_str(), "calibration_datav3.txt");
  auto* q = r.tensor("blk.0.attn_v.weight.in_sum2");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->ne, (std::vector<int64_t>{3, 1}));
  auto qb = r.read(*q);
  std::vector<float> qs(3);
  std::memcpy(qs.data(), qb.data(), 12);
  EXPECT_EQ(qs, (std::vector<float>{2, 4, 13}));  // 1+1, 4+0, 9+4
  auto cb = r.read(*r.tensor("blk.0.attn_q.weight.counts"));
  float cnt;
  std::memcpy(&cnt, cb.data(), 4);
  EXPECT_EQ(cnt, 2.f);
  auto* ex = r.tensor("blk.0.ffn_down_exps.weight.in_sum2");
  ASSERT_NE(ex, nullptr);
  EXPECT_EQ(ex->ne, (std::vector<int64_t>{3, 4}));
  auto eb = r.read(*ex);
  std::vector<float> es(12);
  std::memcpy(es.data(), eb.data(), 48);
  EXPECT_EQ(es, (std::vector<float>{2, 4, 13, 0, 0, 0, 4, 0, 1, 0, 0, 0}));
  auto ecb = r.read(*r.tensor("blk.0.ffn_down_exps.weight.counts"));
  std::vector<float> ec(4);
  std::memcpy(ec.data(), ecb.data(), 16);
  EXPECT_EQ(ec, (std::vector<float>{2, 0, 1, 0}));

  auto j = c.activation_ranges(99.9, 0.8);
  EXPECT_EQ(j["layer_ranges"]["model.layers.0.self_attn.q_proj"], nlohmann::json({-1.0, 3.0}));
  EXPECT_EQ(j["percentile"], 99.9);
  EXPECT_DOUBLE_EQ(j["detailed_stats"]["model.layers.0.self_attn.q_proj"]["int4_scale"].get<double>(), 3.0 / 7);
  EXPECT_EQ(j["detailed_stats"]["model.layers.0.self_attn.q_proj"]["channel_mean_abs"],
            nlohmann::json({1.0, 1.0, 2.5}));
  EXPECT_EQ(j["detailed_stats"]["model.layers.0.self_attn.q_proj"]["channel_mean_sq"],
            nlohmann::json({1.0, 2.0, 6.5}));
  EXPECT_EQ(c.ranges_minmax()["model.layers.0.mlp.experts.2.down_proj"]["max"], 2.0);
}

}  // namespace
