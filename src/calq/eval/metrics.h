// Evaluation arithmetic, independent of the model: llama.cpp-style chunking of a token stream,
// the Hugging Face sliding-window plan (without its off-by-one), per-token negative
// log-likelihood, KL divergence against a base distribution, and the summary statistics that
// llama.cpp's llama-perplexity prints (same definitions, so numbers are comparable).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace calq::eval {

// One forward pass: `input` tokens (positions 0..n-1); the logits row at position scored_from + k
// predicts targets[k].
struct Window {
  std::vector<int32_t> input;
  int64_t scored_from = 0;
  std::vector<int32_t> targets;
};

// llama.cpp's perplexity chunking. `tokens` is the whole text tokenized with special tokens (so
// it starts with BOS when the tokenizer adds one). Chunks are the consecutive non-overlapping
// runs of ctx tokens (a partial tail is dropped); with `bos`, the first token of every chunk is
// replaced by BOS for the forward pass (the targets keep the original tokens). Positions
// ctx/2 .. ctx-2 are scored: ctx - 1 - ctx/2 tokens per chunk. max_chunks < 0: all.
std::vector<Window> llama_chunks(const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_chunks,
                                 std::optional<int32_t> bos);

// Sliding windows of at most ctx tokens advancing by `stride`: every token t >= 1 is scored
// exactly once, predicted by the window that first contains t with t-1 inside it, with as much
// left context as the window gives (the transformers perplexity recipe, without dropping the
// first target of each window). 1 <= stride < ctx. max_windows < 0: all.
std::vector<Window> stride_windows(const std::vector<int32_t>& tokens, int64_t ctx, int64_t stride,
                                   int64_t max_windows);

// log-softmax of one logits row, in double.
void log_softmax(std::span<const float> logits, std::vector<double>& out);

// mean and llama.cpp's uncertainty sqrt((E[x²] - E[x]²)/(n-1)) (0 for n <= 10 in KLD stats).
struct MeanErr {
  double mean = 0, err = 0;
};

// Linear interpolation between closest ranks of sorted values (fraction in [0, 1]).
double percentile_sorted(const std::vector<float>& sorted, double fraction);

struct PerplexityResult {
  double ppl = 0, ppl_err = 0;  // exp(mean NLL) and exp(mean)·stderr(mean NLL)
  double nll_mean = 0;
  int64_t tokens = 0;
  nlohmann::json to_json() const;
};

class PerplexityAccumulator {
 public:
  // Adds the scored rows of one window: logits is [rows × vocab] for positions scored_from...
  // (rows scored in parallel, accumulated in row order: independent of the thread count).
  void add(std::span<const float> logits, int64_t vocab, std::span<const int32_t> targets);
  void add_nll(double nll);
  PerplexityResult result() const;
  int64_t count() const { return n_; }

 private:
  double sum_ = 0, sum2_ = 0;
  int64_t n_ = 0;
};

struct KldResult {
  PerplexityResult q, base;
  double ln_ratio = 0, ln_ratio_err = 0, ratio = 0, ratio_err = 0, diff = 0, diff_err = 0;
  double correlation = 0;  // of per-token NLLs, as llama.cpp's Cor(ln PPL(Q), ln PPL(base))
  double kld_mean = 0, kld_err = 0, kld_max = 0, kld_min = 0, kld_median = 0;
  double kld_p999 = 0, kld_p99 = 0, kld_p95 = 0, kld_p90 = 0, kld_p10 = 0, kld_p05 = 0, kld_p01 = 0,
         kld_p001 = 0;
  double dp_mean = 0, dp_err = 0, dp_max = 0, dp_min = 0, dp_median = 0, dp_rms = 0, dp_rms_err = 0;
  double dp_p999 = 0, dp_p99 = 0, dp_p95 = 0, dp_p90 = 0, dp_p75 = 0, dp_p25 = 0, dp_p10 = 0, dp_p05 = 0,
         dp_p01 = 0, dp_p001 = 0;
  double same_top = 0, same_top_err = 0;  // fractions
  int64_t tokens = 0;
  nlohmann::json to_json() const;
  std::string table() const;  // the llama.cpp-style report
};

// Accumulates, per scored token, KL(base || q) = Σ p_base (ln p_base − ln p_q), the NLL of both,
// Δp = p_q(target) − p_base(target) and whether the argmax agrees.
class KldAccumulator {
 public:
  // One row: q logits and the base model's log-probabilities (log-softmax, -inf allowed) over
  // the same vocab. When the base log-probs come from log_softmax of the same logits, every term
  // is exactly zero: a model against itself gives KLD 0 and same-top 100%.
  void add_row(std::span<const float> q_logits, std::span<const double> base_logprobs, int32_t target);
  // add_row for each of targets.size() rows ([rows × vocab] each), the rows' sums computed in
  // parallel and accumulated in row order: the same result as calling add_row row by row.
  void add_rows(std::span<const float> q_logits, std::span<const double> base_logprobs, int64_t vocab,
                std::span<const int32_t> targets);
  KldResult result() const;
  int64_t count() const { return n_; }
  // The running mean KLD (cheap: result() sorts every value for the percentiles).
  double mean_kld() const { return n_ ? s_kld_ / static_cast<double>(n_) : 0.0; }

 private:
  struct Row {
    double nll = 0, nllb = 0, kld = 0;
    bool same_top = false;
  };
  static Row score(std::span<const float> q_logits, std::span<const double> base_lp, int32_t target,
                   std::vector<double>& buf);
  void add(const Row& r);
  double s_nll_ = 0, s_nll2_ = 0, s_nllb_ = 0, s_nllb2_ = 0, s_nll_nllb_ = 0;
  double s_kld_ = 0, s_kld2_ = 0, s_dp_ = 0, s_dp2_ = 0, s_dp4_ = 0;
  int64_t same_top_ = 0, n_ = 0;
  std::vector<float> kld_, dp_;
  std::vector<double> buf_;
};

}  // namespace calq::eval
