#include "calq/eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <exception>

#include <fmt/format.h>

#include "calq/core/error.h"

namespace calq::eval {

std::vector<Window> llama_chunks(const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_chunks,
                                 std::optional<int32_t> bos) {
  CALQ_CHECK(ctx >= 4, "context {} is too short (at least 4 tokens)", ctx);
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t available = n / ctx;
  CALQ_CHECK(available >= 1,
             "the text tokenizes to {} tokens, fewer than one chunk of {}: use a longer text or a smaller --ctx", n,
             ctx);
  const int64_t chunks = max_chunks < 0 ? available : std::min(max_chunks, available);
  const int64_t first = ctx / 2;
  std::vector<Window> out;
  out.reserve(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    Window w;
    auto begin = tokens.begin() + c * ctx;
    w.input.assign(begin, begin + ctx);
    if (bos) w.input[0] = *bos;
    w.scored_from = first;
    w.targets.assign(begin + first + 1, begin + ctx);
    out.push_back(std::move(w));
  }
  return out;
}

std::vector<Window> stride_windows(const std::vector<int32_t>& tokens, int64_t ctx, int64_t stride,
                                   int64_t max_windows) {
  CALQ_CHECK(ctx >= 2, "context {} is too short", ctx);
  // Windows must overlap by one token at least: the first token of a window is predicted by the
  // row before it, which only an overlapping window holds.
  CALQ_CHECK(stride >= 1 && stride < ctx, "--stride must be in 1..ctx-1 ({}), got {}", ctx - 1, stride);
  const int64_t n = static_cast<int64_t>(tokens.size());
  CALQ_CHECK(n >= 2, "the text tokenizes to {} tokens: nothing to score", n);
  std::vector<Window> out;
  int64_t scored_until = 1;  // tokens [1, scored_until) are already scored
  for (int64_t begin = 0; scored_until < n; begin += stride) {
    if (max_windows >= 0 && static_cast<int64_t>(out.size()) >= max_windows) break;
    const int64_t end = std::min(begin + ctx, n);
    Window w;
    w.input.assign(tokens.begin() + begin, tokens.begin() + end);
    // Token t is predicted by the row at position t-1-begin; score t in [scored_until, end).
    const int64_t t0 = std::max(scored_until, begin + 1);
    w.scored_from = t0 - 1 - begin;
    w.targets.assign(tokens.begin() + t0, tokens.begin() + end);
    scored_until = end;
    if (!w.targets.empty()) out.push_back(std::move(w));
    if (end == n) break;
  }
  return out;
}

namespace {

// log Σ exp(logits), in fp64 from the max.
double log_sum_exp(std::span<const float> logits) {
  double mx = -INFINITY;
  for (float v : logits) mx = std::max(mx, static_cast<double>(v));
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - mx);
  return mx + std::log(sum);
}

// Rows per thread below which a parallel region costs more than it saves (a row is ~vocab exps).
constexpr int64_t kParallelElems = 1 << 16;

}  // namespace

void log_softmax(std::span<const float> logits, std::vector<double>& out) {
  out.resize(logits.size());
  const double lse = log_sum_exp(logits);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - lse;
}

namespace {

MeanErr mean_err(double sum, double sum2, int64_t n, bool small_is_zero) {
  if (n < 1) return {};
  const double m = sum / static_cast<double>(n);
  double var = sum2 / static_cast<double>(n) - m * m;
  const bool use = var > 0 && n > 1 && (!small_is_zero || n > 10);
  return {m, use ? std::sqrt(var / static_cast<double>(n - 1)) : 0.0};
}

}  // namespace

double percentile_sorted(const std::vector<float>& v, double fraction) {
  CALQ_CHECK(!v.empty(), "percentile of no values");
  if (fraction <= 0) return v.front();
  if (fraction >= 1) return v.back();
  const double pos = fraction * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const double f = pos - static_cast<double>(lo);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return (1 - f) * v[lo] + f * v[hi];
}

void PerplexityAccumulator::add_nll(double nll) {
  sum_ += nll;
  sum2_ += nll * nll;
  ++n_;
}

void PerplexityAccumulator::add(std::span<const float> logits, int64_t vocab, std::span<const int32_t> targets) {
  CALQ_CHECK(static_cast<int64_t>(logits.size()) == vocab * static_cast<int64_t>(targets.size()),
             "perplexity: {} logits for {} targets of vocab {}", logits.size(), targets.size(), vocab);
  const int64_t rows = static_cast<int64_t>(targets.size());
  for (int32_t t : targets) CALQ_CHECK(t >= 0 && t < vocab, "target token {} outside the vocabulary ({})", t, vocab);
  // -log_softmax(row)[t], exactly as log_softmax computes it, without writing the row.
  std::vector<double> nll(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static) if (rows * vocab >= kParallelElems)
  for (int64_t r = 0; r < rows; ++r) {
    auto row = logits.subspan(static_cast<size_t>(r * vocab), static_cast<size_t>(vocab));
    nll[r] = -(static_cast<double>(row[static_cast<size_t>(targets[r])]) - log_sum_exp(row));
  }
  for (double v : nll) add_nll(v);
}

PerplexityResult PerplexityAccumulator::result() const {
  PerplexityResult r;
  auto me = mean_err(sum_, sum2_, n_, false);
  r.nll_mean = me.mean;
  r.ppl = std::exp(me.mean);
  r.ppl_err = r.ppl * me.err;
  r.tokens = n_;
  return r;
}

nlohmann::json PerplexityResult::to_json() const {
  return {{"ppl", ppl}, {"ppl_stderr", ppl_err}, {"tokens_scored", tokens}};
}

KldAccumulator::Row KldAccumulator::score(std::span<const float> q_logits, std::span<const double> base_lp,
                                          int32_t target, std::vector<double>& buf) {
  CALQ_CHECK(q_logits.size() == base_lp.size(), "KL divergence: vocabularies differ ({} vs {})", q_logits.size(),
             base_lp.size());
  CALQ_CHECK(target >= 0 && static_cast<size_t>(target) < q_logits.size(), "target token {} outside the vocabulary",
             target);
  log_softmax(q_logits, buf);
  const size_t V = q_logits.size();
  Row row;
  size_t arg_q = 0, arg_b = 0;
  for (size_t i = 0; i < V; ++i) {
    const double lb = base_lp[i];
    if (lb > -INFINITY) row.kld += std::exp(lb) * (lb - buf[i]);
    if (buf[i] > buf[arg_q]) arg_q = i;
    if (base_lp[i] > base_lp[arg_b]) arg_b = i;
  }
  row.nll = -buf[static_cast<size_t>(target)];
  row.nllb = -base_lp[static_cast<size_t>(target)];
  row.same_top = arg_q == arg_b;
  return row;
}

void KldAccumulator::add_row(std::span<const float> q_logits, std::span<const double> base_lp, int32_t target) {
  add(score(q_logits, base_lp, target, buf_));
}

void KldAccumulator::add_rows(std::span<const float> q_logits, std::span<const double> base_lp, int64_t vocab,
                              std::span<const int32_t> targets) {
  const int64_t rows = static_cast<int64_t>(targets.size());
  const auto V = static_cast<size_t>(vocab);
  CALQ_CHECK(q_logits.size() == static_cast<size_t>(rows) * V && base_lp.size() == q_logits.size(),
             "KL divergence: {} and {} values for {} rows of vocab {}", q_logits.size(), base_lp.size(), rows, vocab);
  std::vector<Row> out(static_cast<size_t>(rows));
  std::vector<std::exception_ptr> err(static_cast<size_t>(rows));
#pragma omp parallel if (rows * vocab >= kParallelElems)
  {
    std::vector<double> buf;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      try {
        out[r] = score(q_logits.subspan(r * V, V), base_lp.subspan(r * V, V), targets[r], buf);
      } catch (...) {
        err[r] = std::current_exception();
      }
    }
  }
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
  for (const Row& r : out) add(r);
}

void KldAccumulator::add(const Row& row) {
  const double nll = row.nll, nllb = row.nllb, kld = row.kld;
  s_nll_ += nll;
  s_nll2_ += nll * nll;
  s_nllb_ += nllb;
  s_nllb2_ += nllb * nllb;
  s_nll_nllb_ += nll * nllb;
  s_kld_ += kld;
  s_kld2_ += kld * kld;
  const double dp = std::exp(-nll) - std::exp(-nllb);
  s_dp_ += dp;
  s_dp2_ += dp * dp;
  s_dp4_ += dp * dp * dp * dp;
  same_top_ += row.same_top;
  ++n_;
  kld_.push_back(static_cast<float>(kld));
  dp_.push_back(static_cast<float>(dp));
}

KldResult KldAccumulator::result() const {
  CALQ_CHECK(n_ > 0, "KL divergence over no tokens");
  KldResult r;
  r.tokens = n_;
  auto q = mean_err(s_nll_, s_nll2_, n_, true), b = mean_err(s_nllb_, s_nllb2_, n_, true);
  r.q = {std::exp(q.mean), std::exp(q.mean) * q.err, q.mean, n_};
  r.base = {std::exp(b.mean), std::exp(b.mean) * b.err, b.mean, n_};
  const double nn = static_cast<double>(n_);
  const double cov = n_ < 10 ? 0.0 : (s_nll_nllb_ / nn - (s_nll_ / nn) * (s_nllb_ / nn)) / (nn - 1);
  r.correlation = q.err > 0 && b.err > 0 ? cov / (q.err * b.err) : 1.0;
  r.ln_ratio = q.mean - b.mean;
  r.ln_ratio_err = std::sqrt(std::max(0.0, q.err * q.err + b.err * b.err - 2 * cov));
  r.ratio = std::exp(r.ln_ratio);
  r.ratio_err = r.ratio * r.ln_ratio_err;
  r.diff = r.q.ppl - r.base.ppl;
  r.diff_err = std::sqrt(std::max(0.0, r.q.ppl_err * r.q.ppl_err + r.base.ppl_err * r.base.ppl_err -
                                           2 * r.q.ppl * r.base.ppl * cov));
  auto k = mean_err(s_kld_, s_kld2_, n_, true);
  r.kld_mean = k.mean;
  r.kld_err = k.err;
  std::vector<float> ks = kld_, ds = dp_;
  std::sort(ks.begin(), ks.end());
  std::sort(ds.begin(), ds.end());
  auto median = [](const std::vector<float>& v) {
    const size_t n = v.size();
    return n % 2 ? static_cast<double>(v[n / 2]) : 0.5 * (static_cast<double>(v[n / 2 - 1]) + v[n / 2]);
  };
  r.kld_max = ks.back();
  r.kld_min = ks.front();
  r.kld_median = median(ks);
  r.kld_p999 = percentile_sorted(ks, 0.999);
  r.kld_p99 = percentile_sorted(ks, 0.99);
  r.kld_p95 = percentile_sorted(ks, 0.95);
  r.kld_p90 = percentile_sorted(ks, 0.90);
  r.kld_p10 = percentile_sorted(ks, 0.10);
  r.kld_p05 = percentile_sorted(ks, 0.05);
  r.kld_p01 = percentile_sorted(ks, 0.01);
  r.kld_p001 = percentile_sorted(ks, 0.001);
  auto d = mean_err(s_dp_, s_dp2_, n_, true);
  r.dp_mean = d.mean;
  r.dp_err = d.err;
  r.dp_max = ds.back();
  r.dp_min = ds.front();
  r.dp_median = median(ds);
  r.dp_p999 = percentile_sorted(ds, 0.999);
  r.dp_p99 = percentile_sorted(ds, 0.99);
  r.dp_p95 = percentile_sorted(ds, 0.95);
  r.dp_p90 = percentile_sorted(ds, 0.90);
  r.dp_p75 = percentile_sorted(ds, 0.75);
  r.dp_p25 = percentile_sorted(ds, 0.25);
  r.dp_p10 = percentile_sorted(ds, 0.10);
  r.dp_p05 = percentile_sorted(ds, 0.05);
  r.dp_p01 = percentile_sorted(ds, 0.01);
  r.dp_p001 = percentile_sorted(ds, 0.001);
  auto mse = mean_err(s_dp2_, s_dp4_, n_, true);
  r.dp_rms = std::sqrt(mse.mean);
  r.dp_rms_err = r.dp_rms > 0 ? 0.5 / r.dp_rms * mse.err : 0.0;
  r.same_top = static_cast<double>(same_top_) / nn;
  r.same_top_err = n_ > 1 ? std::sqrt(r.same_top * (1 - r.same_top) / (nn - 1)) : 0.0;
  return r;
}

nlohmann::json KldResult::to_json() const {
  return {{"ppl", q.ppl},           {"ppl_stderr", q.ppl_err},   {"ppl_base", base.ppl},
          {"ppl_base_stderr", base.ppl_err}, {"ppl_ratio", ratio}, {"ppl_ratio_stderr", ratio_err},
          {"ln_ppl_ratio", ln_ratio}, {"ln_ppl_ratio_stderr", ln_ratio_err}, {"ppl_correlation", correlation},
          {"kld_mean", kld_mean},   {"kld_stderr", kld_err},     {"kld_median", kld_median},
          {"kld_p999", kld_p999},   {"kld_p99", kld_p99},         {"kld_p95", kld_p95},
          {"kld_p90", kld_p90},     {"kld_p10", kld_p10},         {"kld_p05", kld_p05},
          {"kld_p01", kld_p01},     {"kld_p001", kld_p001},       {"kld_max", kld_max},
          {"kld_min", kld_min},     {"same_top_p", same_top},     {"same_top_p_stderr", same_top_err},
          {"dp_mean", dp_mean},     {"dp_stderr", dp_err},        {"dp_rms", dp_rms},
          {"dp_median", dp_median}, {"dp_max", dp_max},           {"dp_min", dp_min},
          {"dp_p99", dp_p99},       {"dp_p01", dp_p01},           {"tokens_scored", tokens}};
}

std::string KldResult::table() const {
  std::string s;
  auto line = [&](const std::string& l) { s += l + "\n"; };
  line("====== Perplexity statistics ======");
  line(fmt::format("Mean PPL(Q)                   : {:10.6f} ± {:10.6f}", q.ppl, q.ppl_err));
  line(fmt::format("Mean PPL(base)                : {:10.6f} ± {:10.6f}", base.ppl, base.ppl_err));
  line(fmt::format("Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2f}%", 100 * correlation));
  line(fmt::format("Mean ln(PPL(Q)/PPL(base))     : {:10.6f} ± {:10.6f}", ln_ratio, ln_ratio_err));
  line(fmt::format("Mean PPL(Q)/PPL(base)         : {:10.6f} ± {:10.6f}", ratio, ratio_err));
  line(fmt::format("Mean PPL(Q)-PPL(base)         : {:10.6f} ± {:10.6f}", diff, diff_err));
  line("");
  line("====== KL divergence statistics ======");
  line(fmt::format("Mean    KLD: {:10.6f} ± {:10.6f}", kld_mean, kld_err));
  line(fmt::format("Maximum KLD: {:10.6f}", kld_max));
  line(fmt::format("99.9%   KLD: {:10.6f}", kld_p999));
  line(fmt::format("99.0%   KLD: {:10.6f}", kld_p99));
  line(fmt::format("95.0%   KLD: {:10.6f}", kld_p95));
  line(fmt::format("90.0%   KLD: {:10.6f}", kld_p90));
  line(fmt::format("Median  KLD: {:10.6f}", kld_median));
  line(fmt::format("10.0%   KLD: {:10.6f}", kld_p10));
  line(fmt::format(" 5.0%   KLD: {:10.6f}", kld_p05));
  line(fmt::format(" 1.0%   KLD: {:10.6f}", kld_p01));
  line(fmt::format(" 0.1%   KLD: {:10.6f}", kld_p001));
  line(fmt::format("Minimum KLD: {:10.6f}", kld_min));
  line("");
  line("====== Token probability statistics ======");
  line(fmt::format("Mean    Δp: {:6.3f} ± {:5.3f} %", 100 * dp_mean, 100 * dp_err));
  line(fmt::format("Maximum Δp: {:6.3f}%", 100 * dp_max));
  line(fmt::format("99.9%   Δp: {:6.3f}%", 100 * dp_p999));
  line(fmt::format("99.0%   Δp: {:6.3f}%", 100 * dp_p99));
  line(fmt::format("95.0%   Δp: {:6.3f}%", 100 * dp_p95));
  line(fmt::format("90.0%   Δp: {:6.3f}%", 100 * dp_p90));
  line(fmt::format("75.0%   Δp: {:6.3f}%", 100 * dp_p75));
  line(fmt::format("Median  Δp: {:6.3f}%", 100 * dp_median));
  line(fmt::format("25.0%   Δp: {:6.3f}%", 100 * dp_p25));
  line(fmt::format("10.0%   Δp: {:6.3f}%", 100 * dp_p10));
  line(fmt::format(" 5.0%   Δp: {:6.3f}%", 100 * dp_p05));
  line(fmt::format(" 1.0%   Δp: {:6.3f}%", 100 * dp_p01));
  line(fmt::format(" 0.1%   Δp: {:6.3f}%", 100 * dp_p001));
  line(fmt::format("Minimum Δp: {:6.3f}%", 100 * dp_min));
  line(fmt::format("RMS Δp    : {:6.3f} ± {:5.3f} %", 100 * dp_rms, 100 * dp_rms_err));
  line(fmt::format("Same top p: {:6.3f} ± {:5.3f} %", 100 * same_top, 100 * same_top_err));
  return s;
}

}  // namespace calq::eval
