// The eval driver over a model whose logits are known in closed form (a bigram table), so the
// perplexity and KL divergence of whole runs can be computed independently.
#include "calq/eval/driver.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "calq/core/error.h"
#include "support.h"

namespace {

using namespace calq::eval;

struct Bigram {
  int V;
  std::vector<float> table;  // V × V: logits of the next token given the current one
  Bigram(int v, unsigned seed, float scale) : V(v), table(static_cast<size_t>(v) * v) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0, scale);
    for (auto& x : table) x = d(rng);
  }
  ForwardFn fn() const {
    return [this](const std::vector<int32_t>& in, int64_t first, std::vector<float>& out) {
      out.clear();
      for (size_t i = static_cast<size_t>(first); i < in.size(); ++i)
        out.insert(out.end(), table.begin() + in[i] * V, table.begin() + (in[i] + 1) * V);
    };
  }
  long double nll(int cur, int next) const {
    long double mx = -1e30L, s = 0;
    for (int j = 0; j < V; ++j) mx = std::max<long double>(mx, table[cur * V + j]);
    for (int j = 0; j < V; ++j) s += std::exp(table[cur * V + j] - mx);
    return -(table[cur * V + next] - mx - std::log(s));
  }
};

std::vector<int32_t> random_tokens(int n, int V, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % V);
  return t;
}

TEST(EvalDriver, PerplexityOfABigramModel) {
  Bigram m(37, 1, 2.0f);
  auto tok = random_tokens(64 * 6 + 5, 37, 2);
  auto windows = llama_chunks(tok, 64, -1, std::nullopt);
  RunOptions o;
  o.progress = false;
  RunStats st;
  auto r = run_perplexity(windows, 37, m.fn(), o, &st);
  // Independent: the scored positions are 32..62 of every chunk, predicting 33..63.
  long double s = 0;
  int n = 0;
  for (int c = 0; c < 6; ++c)
    for (int p = 32; p < 63; ++p, ++n) s += m.nll(tok[c * 64 + p], tok[c * 64 + p + 1]);
  EXPECT_EQ(r.tokens, n);
  EXPECT_NEAR(r.ppl, std::exp(static_cast<double>(s / n)), 1e-9 * r.ppl);
  EXPECT_EQ(st.tokens_processed, 6 * 64);
  // Stride: every token from 1 on is scored once.
  auto sw = stride_windows(tok, 64, 16, -1);
  auto rs = run_perplexity(sw, 37, m.fn(), o);
  long double s2 = 0;
  for (size_t t = 1; t < tok.size(); ++t) s2 += m.nll(tok[t - 1], tok[t]);
  EXPECT_EQ(rs.tokens, static_cast<int64_t>(tok.size() - 1));
  EXPECT_NEAR(rs.ppl, std::exp(static_cast<double>(s2 / (tok.size() - 1))), 1e-9 * rs.ppl);
}

TEST(EvalDriver, KlDivergenceInProcessAndFromFile) {
  Bigram base(29, 3, 2.0f), q = base;
  std::mt19937 rng(4);
  std::normal_distribution<float> noise(0, 0.2f);
  for (auto& x : q.table) x += noise(rng);
  auto tok = random_tokens(32 * 8, 29, 5);
  auto windows = llama_chunks(tok, 32, -1, std::nullopt);
  RunOptions o;
  o.progress = false;
  auto bf = base.fn(), qf = q.fn();
  auto self = run_kl_divergence(windows, 29, bf, {&bf, nullptr}, o);
  EXPECT_EQ(self.kld_mean, 0.0);
  EXPECT_EQ(self.same_top, 1.0);
  auto k = run_kl_divergence(windows, 29, qf, {&bf, nullptr}, o);
  // Independent mean KLD over the scored rows.
  long double s = 0;
  int n = 0;
  for (int c = 0; c < 8; ++c)
    for (int p = 16; p < 31; ++p, ++n) {
      const int cur = tok[c * 32 + p];
      for (int j = 0; j < 29; ++j) {
        const long double lb = -base.nll(cur, j), lq = -q.nll(cur, j);
        s += std::exp(lb) * (lb - lq);
      }
    }
  EXPECT_EQ(k.tokens, n);
  EXPECT_NEAR(k.kld_mean, static_cast<double>(s / n), 1e-9);
  EXPECT_GT(k.kld_mean, 1e-4);

  calq_test::TempDir t;
  LogitsHeader h;
  h.vocab = 29;
  h.ctx = 32;
  h.windows = static_cast<int64_t>(windows.size());
  h.method = "llama";
  h.windows_sha256 = windows_digest(windows);
  {
    LogitsWriter w(t / "base.logprobs", h);
    auto pb = save_logprobs(windows, 29, bf, w, o);
    EXPECT_NEAR(pb.ppl, k.base.ppl, 1e-9 * pb.ppl);
  }
  LogitsReader r(t / "base.logprobs");
  auto kf = run_kl_divergence(windows, 29, qf, {nullptr, &r}, o);
  EXPECT_NEAR(kf.kld_mean, k.kld_mean, 2e-4);
  EXPECT_NEAR(kf.base.ppl, k.base.ppl, 1e-3 * k.base.ppl);
  EXPECT_EQ(kf.same_top, k.same_top);
}

TEST(EvalDriver, BatchedWindowsGiveTheSameResults) {
  Bigram base(23, 8, 2.0f), q = base;
  std::mt19937 rng(9);
  std::normal_distribution<float> noise(0, 0.3f);
  for (auto& x : q.table) x += noise(rng);
  auto tok = random_tokens(32 * 7, 23, 10);
  auto windows = llama_chunks(tok, 32, -1, std::nullopt);
  RunOptions one;
  one.progress = false;
  RunOptions batched = one;
  batched.batch = 3;  // 7 windows: groups of 3, 3, 1
  int calls = 0;
  auto qf = q.fn(), bf = base.fn();
  batched.batch_fn = [&](const std::vector<const std::vector<int32_t>*>& in, int64_t first, std::vector<float>& out) {
    ++calls;
    out.clear();
    std::vector<float> part;
    for (auto* w : in) {
      qf(*w, first, part);
      out.insert(out.end(), part.begin(), part.end());
    }
  };
  auto a = run_perplexity(windows, 23, qf, one), b = run_perplexity(windows, 23, qf, batched);
  EXPECT_EQ(a.ppl, b.ppl);
  EXPECT_EQ(calls, 2);
  auto ka = run_kl_divergence(windows, 23, qf, {&bf, nullptr}, one);
  auto kb = run_kl_divergence(windows, 23, qf, {&bf, nullptr}, batched);
  EXPECT_EQ(ka.kld_mean, kb.kld_mean);
  EXPECT_EQ(ka.same_top, kb.same_top);
}

TEST(EvalDriver, NonFiniteLogitsNameTheChunk) {
  Bigram m(11, 6, 1.0f);
  auto tok = random_tokens(16 * 3, 11, 7);
  auto windows = llama_chunks(tok, 16, -1, std::nullopt);
  ForwardFn bad = [&](const std::vector<int32_t>& in, int64_t first, std::vector<float>& out) {
    m.fn()(in, first, out);
    if (in == windows[1].input) out[11 * 2 + 3] = NAN;
  };
  RunOptions o;
  o.progress = false;
  try {
    run_perplexity(windows, 11, bad, o);
    ADD_FAILURE() << "NaN not reported";
  } catch (const calq::Error& e) {
    const std::string s = e.what();
    EXPECT_NE(s.find("chunk 2"), std::string::npos) << s;
    EXPECT_NE(s.find("position 10"), std::string::npos) << s;
  }
  ForwardFn short_fn = [](const std::vector<int32_t>&, int64_t, std::vector<float>& out) { out.assign(3, 0.f); };
  EXPECT_THROW(run_perplexity(windows, 11, short_fn, o), calq::Error);
}

}  // namespace
