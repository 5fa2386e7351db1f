// Evaluation arithmetic against straightforward references: chunk plans, perplexity, KL
// divergence statistics, and the saved log-probability file.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "calq/core/error.h"
#include "calq/eval/logits_file.h"
#include "calq/eval/metrics.h"
#include "support.h"

namespace {

using namespace calq::eval;

std::vector<int32_t> iota_tokens(int n) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = 1000 + i;
  return t;
}

TEST(Chunks, LlamaCppPlan) {
  auto tok = iota_tokens(8 * 5 + 3);
  auto w = llama_chunks(tok, 8, -1, 7);
  ASSERT_EQ(w.size(), 5u);
  for (int c = 0; c < 5; ++c) {
    EXPECT_EQ(w[c].input[0], 7);  // BOS replaces the first token of every chunk
    for (int k = 1; k < 8; ++k) EXPECT_EQ(w[c].input[k], tok[c * 8 + k]);
    EXPECT_EQ(w[c].scored_from, 4);
    // rows 4..6 predict tokens 5..7 of the chunk: ctx - 1 - ctx/2 = 3 per chunk
    ASSERT_EQ(w[c].targets.size(), 3u);
    for (int k = 0; k < 3; ++k) EXPECT_EQ(w[c].targets[k], tok[c * 8 + 5 + k]);
  }
  EXPECT_EQ(llama_chunks(tok, 8, 2, std::nullopt).size(), 2u);
  EXPECT_EQ(llama_chunks(tok, 8, 2, std::nullopt)[1].input[0], tok[8]);
  EXPECT_THROW(llama_chunks(iota_tokens(7), 8, -1, std::nullopt), calq::Error);
  // ctx 512: 255 scored tokens per chunk, as llama-perplexity.
  EXPECT_EQ(llama_chunks(iota_tokens(1100), 512, -1, std::nullopt)[0].targets.size(), 255u);
}

TEST(Chunks, StrideScoresEveryTokenOnceWithFullContext) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 2 + static_cast<int>(rng() % 200);
    const int ctx = 2 + static_cast<int>(rng() % 40);
    const int stride = 1 + static_cast<int>(rng() % (ctx - 1));
    auto tok = iota_tokens(n);
    auto ws = stride_windows(tok, ctx, stride, -1);
    std::map<int, int> scored;
    int begin = 0;
    for (auto& w : ws) {
      // Find this window's start in the token stream.
      begin = w.input[0] - 1000;
      ASSERT_LE(static_cast<int>(w.input.size()), ctx);
      for (size_t k = 0; k < w.targets.size(); ++k) {
        const int t = w.targets[k] - 1000;
        const int pos = static_cast<int>(w.scored_from + k);  // row predicting t
        EXPECT_EQ(begin + pos + 1, t);
        ++scored[t];
        // The context is everything since the window start: at least min(t, ctx - stride).
        EXPECT_GE(pos + 1, std::min(t, ctx - stride)) << "n=" << n << " ctx=" << ctx << " stride=" << stride;
      }
    }
    for (int t = 1; t < n; ++t) if (!scored.count(t)) ADD_FAILURE() << "missing " << t;
    ASSERT_EQ(static_cast<int>(scored.size()), n - 1) << "n=" << n << " ctx=" << ctx << " stride=" << stride;
    for (auto& [t, c] : scored) {
      EXPECT_GE(t, 1);
      EXPECT_EQ(c, 1);
    }
  }
  EXPECT_THROW(stride_windows(iota_tokens(10), 8, 8, -1), calq::Error);
}

std::vector<float> random_logits(std::mt19937& rng, int v, float scale) {
  std::normal_distribution<float> d(0, scale);
  std::vector<float> x(v);
  for (auto& e : x) e = d(rng);
  return x;
}

long double ref_logsoftmax(const std::vector<float>& x, int i) {
  long double mx = *std::max_element(x.begin(), x.end()), s = 0;
  for (float v : x) s += std::exp(static_cast<long double>(v) - mx);
  return x[i] - mx - std::log(s);
}

TEST(Perplexity, MatchesDirectComputation) {
  std::mt19937 rng(5);
  const int V = 50, R = 300;
  std::vector<float> logits;
  std::vector<int32_t> targets;
  long double s = 0, s2 = 0;
  for (int r = 0; r < R; ++r) {
    auto row = random_logits(rng, V, 3.0f);
    int t = static_cast<int>(rng() % V);
    logits.insert(logits.end(), row.begin(), row.end());
    targets.push_back(t);
    long double nll = -ref_logsoftmax(row, t);
    s += nll;
    s2 += nll * nll;
  }
  PerplexityAccumulator acc;
  acc.add(logits, V, targets);
  auto r = acc.result();
  const long double m = s / R, sd = std::sqrt((s2 / R - m * m) / (R - 1));
  EXPECT_NEAR(r.ppl, std::exp(m), 1e-9 * std::exp(m));
  EXPECT_NEAR(r.ppl_err, std::exp(m) * sd, 1e-9);
  EXPECT_EQ(r.tokens, R);
  std::vector<int32_t> bad = {V};
  EXPECT_THROW(acc.add(std::span(logits).subspan(0, V), V, bad), calq::Error);
}

TEST(Kld, SelfIsExactlyZero) {
  std::mt19937 rng(6);
  KldAccumulator acc;
  std::vector<double> lp;
  for (int r = 0; r < 200; ++r) {
    auto row = random_logits(rng, 64, 4.0f);
    log_softmax(row, lp);
    acc.add_row(row, lp, static_cast<int32_t>(rng() % 64));
  }
  auto k = acc.result();
  EXPECT_EQ(k.kld_mean, 0.0);
  EXPECT_EQ(k.kld_max, 0.0);
  EXPECT_EQ(k.same_top, 1.0);
  EXPECT_EQ(k.dp_rms, 0.0);
  EXPECT_EQ(k.q.ppl, k.base.ppl);
  EXPECT_EQ(k.ln_ratio, 0.0);
}

TEST(Kld, MatchesDirectComputationAndPercentiles) {
  std::mt19937 rng(7);
  const int V = 40, R = 501;
  KldAccumulator acc;
  std::vector<long double> klds, dps;
  int same = 0;
  std::vector<double> lp;
  for (int r = 0; r < R; ++r) {
    auto base = random_logits(rng, V, 3.0f), q = base;
    std::normal_distribution<float> noise(0, 0.3f);
    for (auto& v : q) v += noise(rng);
    const int t = static_cast<int>(rng() % V);
    log_softmax(base, lp);
    acc.add_row(q, lp, t);
    long double kl = 0;
    for (int i = 0; i < V; ++i) {
      long double lb = ref_logsoftmax(base, i), lq = ref_logsoftmax(q, i);
      kl += std::exp(lb) * (lb - lq);
    }
    klds.push_back(kl);
    dps.push_back(std::exp(ref_logsoftmax(q, t)) - std::exp(ref_logsoftmax(base, t)));
    same += std::max_element(q.begin(), q.end()) - q.begin() == std::max_element(base.begin(), base.end()) - base.begin();
  }
  auto k = acc.result();
  long double mean = 0;
  for (auto v : klds) mean += v;
  mean /= R;
  EXPECT_NEAR(k.kld_mean, static_cast<double>(mean), 1e-9);
  std::vector<long double> sorted = klds;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_NEAR(k.kld_median, static_cast<double>(sorted[R / 2]), 1e-6);  // R odd: the middle value
  EXPECT_NEAR(k.kld_max, static_cast<double>(sorted.back()), 1e-6);
  // 99% of 501 values: position 0.99 * 500 = 495 exactly.
  EXPECT_NEAR(k.kld_p99, static_cast<double>(sorted[495]), 1e-6);
  // 95%: position 475.
  EXPECT_NEAR(k.kld_p95, static_cast<double>(sorted[475]), 1e-6);
  EXPECT_NEAR(k.same_top, static_cast<double>(same) / R, 1e-12);
  long double dpm = 0, dp2 = 0;
  for (auto v : dps) {
    dpm += v;
    dp2 += v * v;
  }
  EXPECT_NEAR(k.dp_mean, static_cast<double>(dpm / R), 1e-9);
  EXPECT_NEAR(k.dp_rms, static_cast<double>(std::sqrt(dp2 / R)), 1e-9);
  EXPECT_GT(k.kld_mean, 0);
  auto j = k.to_json();
  for (const char* key : {"ppl", "ppl_base", "ppl_ratio", "kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max",
                          "same_top_p", "dp_mean", "tokens_scored"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_NE(k.table().find("Mean    KLD:"), std::string::npos);
}

TEST(Percentile, LinearBetweenClosestRanks) {
  std::vector<float> v = {0, 10, 20, 30, 40};
  EXPECT_DOUBLE_EQ(percentile_sorted(v, 0.5), 20);
  EXPECT_DOUBLE_EQ(percentile_sorted(v, 0.1), 4);
  EXPECT_DOUBLE_EQ(percentile_sorted(v, 0.0), 0);
  EXPECT_DOUBLE_EQ(percentile_sorted(v, 1.0), 40);
  EXPECT_DOUBLE_EQ(percentile_sorted({5}, 0.3), 5);
}

TEST(LogitsFile, EncodingErrorBound) {
  std::mt19937 rng(8);
  std::vector<double> lp(1000), back(1000);
  std::vector<uint16_t> codes(1000);
  for (int trial = 0; trial < 20; ++trial) {
    auto row = random_logits(rng, 1000, 6.0f);
    log_softmax(row, lp);
    float top;
    encode_logprobs(lp, top, codes);
    decode_logprobs(top, codes, back);
    const double mx = *std::max_element(lp.begin(), lp.end());
    for (int i = 0; i < 1000; ++i) {
      if (lp[i] >= mx - 24 + 1e-6) EXPECT_NEAR(back[i], lp[i], 1.9e-4) << i;
      else if (lp[i] < mx - 24 - 1e-6) EXPECT_EQ(back[i], -INFINITY);
    }
  }
  std::vector<double> nan_row = {NAN, NAN};
  std::vector<uint16_t> c2(2);
  float top;
  EXPECT_THROW(encode_logprobs(nan_row, top, c2), calq::Error);
}

TEST(LogitsFile, RoundTripAndCorruption) {
  calq_test::TempDir t;
  std::mt19937 rng(9);
  const int V = 30;
  LogitsHeader h;
  h.vocab = V;
  h.ctx = 16;
  h.windows = 3;
  h.method = "llama";
  h.windows_sha256 = windows_digest(llama_chunks(iota_tokens(50), 16, -1, std::nullopt));
  h.model = "m";
  std::vector<std::vector<double>> rows;
  {
    LogitsWriter w(t / "l.bin", h);
    for (int k = 0; k < 3; ++k) {
      std::vector<double> lp, all;
      for (int r = 0; r < 7; ++r) {
        auto row = random_logits(rng, V, 2.0f);
        log_softmax(row, lp);
        all.insert(all.end(), lp.begin(), lp.end());
      }
      rows.push_back(all);
      w.add_window(all, 7);
    }
    w.finish();
  }
  {
    LogitsReader r(t / "l.bin");
    EXPECT_EQ(r.header().windows_sha256, h.windows_sha256);
    EXPECT_EQ(r.header().vocab, V);
    std::vector<double> lp;
    for (int k = 0; k < 3; ++k) {
      ASSERT_EQ(r.next_window(lp), 7);
      for (size_t i = 0; i < lp.size(); ++i) EXPECT_NEAR(lp[i], rows[k][i], 1.9e-4);
    }
    EXPECT_THROW(r.next_window(lp), calq::Error);
  }
  const std::string bytes = calq_test::read_file(t / "l.bin");
  calq_test::write_file(t / "trunc.bin", bytes.substr(0, bytes.size() - 100));
  EXPECT_THROW(LogitsReader(t / "trunc.bin"), calq::Error);
  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 0x40;
  calq_test::write_file(t / "flip.bin", flipped);
  try {
    LogitsReader r(t / "flip.bin");
    std::vector<double> lp;
    for (int k = 0; k < 3; ++k) r.next_window(lp);
    ADD_FAILURE() << "corruption not detected";
  } catch (const calq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("CRC-32"), std::string::npos) << e.what();
  }
  calq_test::write_file(t / "junk.bin", std::string(100, 'x'));
  EXPECT_THROW(LogitsReader(t / "junk.bin"), calq::Error);
  // A writer that does not finish leaves nothing behind.
  {
    LogitsWriter w(t / "partial.bin", h);
  }
  EXPECT_FALSE(std::filesystem::exists(t / "partial.bin"));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(t.path()), std::filesystem::directory_iterator()), 4);
}

}  // namespace

// Rows scored in parallel (PerplexityAccumulator::add, KldAccumulator::add_rows) give exactly what
// the row-by-row path gives: each row is computed by one thread with the same arithmetic and
// accumulated in row order. Sizes large enough for the parallel path; a -inf base log-prob too.
TEST(EvalMetrics, ParallelRowsMatchRowByRow) {
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0, 3);
  const int64_t rows = 48, V = 5003;
  std::vector<float> q(static_cast<size_t>(rows * V)), b(q.size());
  for (auto& v : q) v = nd(rng);
  for (auto& v : b) v = nd(rng);
  std::vector<int32_t> t(rows);
  for (auto& v : t) v = static_cast<int32_t>(rng() % V);
  std::vector<double> blp(q.size()), row;
  for (int64_t r = 0; r < rows; ++r) {
    calq::eval::log_softmax(std::span<const float>(b).subspan(r * V, V), row);
    std::copy(row.begin(), row.end(), blp.begin() + r * V);
  }
  blp[7] = -INFINITY;
  calq::eval::KldAccumulator one, many;
  calq::eval::PerplexityAccumulator p1, pm;
  for (int64_t r = 0; r < rows; ++r) {
    one.add_row(std::span<const float>(q).subspan(r * V, V), std::span<const double>(blp).subspan(r * V, V), t[r]);
    calq::eval::log_softmax(std::span<const float>(q).subspan(r * V, V), row);
    p1.add_nll(-row[t[r]]);
  }
  many.add_rows(q, blp, V, t);
  pm.add(q, V, t);
  EXPECT_EQ(one.result().to_json().dump(), many.result().to_json().dump());
  EXPECT_EQ(p1.result().ppl, pm.result().ppl);
  EXPECT_EQ(p1.result().ppl_err, pm.result().ppl_err);
  // A bad target is still refused.
  t[5] = static_cast<int32_t>(V);
  calq::eval::KldAccumulator bad;
  EXPECT_THROW(bad.add_rows(q, blp, V, t), std::exception);
}
