#include "calq/eval/driver.h"

#include <chrono>
#include <cmath>

#include "calq/core/error.h"
#include "calq/core/log.h"

namespace calq::eval {

namespace {

// Runs the model on window w and checks the shape and for NaN/Inf.
void forward(const ForwardFn& model, const Window& w, size_t index, int64_t vocab, std::vector<float>& logits,
             const char* who) {
  model(w.input, w.scored_from, logits);
  const size_t rows = w.input.size() - static_cast<size_t>(w.scored_from);
  CALQ_CHECK(logits.size() == rows * static_cast<size_t>(vocab),
             "{} model returned {} logits for {} rows of vocab {} (chunk {})", who, logits.size(), rows, vocab,
             index + 1);
  for (size_t i = 0; i < logits.size(); ++i)
    if (!std::isfinite(logits[i]))
      fail("{} model: non-finite logit ({}) in chunk {} at position {}, token id {}", who, logits[i], index + 1,
           static_cast<int64_t>(i / static_cast<size_t>(vocab)) + w.scored_from, i % static_cast<size_t>(vocab));
}

struct Timer {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  double s() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};

}  // namespace

PerplexityResult run_perplexity(const std::vector<Window>& windows, int64_t vocab, const ForwardFn& model,
                                const RunOptions& opts, RunStats* stats) {
  CALQ_CHECK(!windows.empty(), "no windows to evaluate");
  PerplexityAccumulator acc;
  std::vector<float> logits;
  std::unique_ptr<Progress> bar;
  if (opts.progress) bar = std::make_unique<Progress>(opts.label, windows.size(), "chunks");
  Timer t;
  int64_t processed = 0;
  for (size_t c = 0; c < windows.size(); ++c) {
    const Window& w = windows[c];
    forward(model, w, c, vocab, logits, "the");
    const size_t rows = w.targets.size();
    acc.add(std::span<const float>(logits).subspan(0, rows * static_cast<size_t>(vocab)), vocab, w.targets);
    processed += static_cast<int64_t>(w.input.size());
    if (bar) bar->advance(1, 0, fmt::format("PPL {:.4f}", acc.result().ppl));
  }
  if (bar) bar->finish();
  if (stats) *stats = {t.s(), processed};
  return acc.result();
}

KldResult run_kl_divergence(const std::vector<Window>& windows, int64_t vocab, const ForwardFn& q, KldBase base,
                            const RunOptions& opts, RunStats* stats) {
  CALQ_CHECK(!windows.empty(), "no windows to evaluate");
  CALQ_CHECK((base.model != nullptr) != (base.file != nullptr), "KL divergence needs one base: a model or a file");
  KldAccumulator acc;
  std::vector<float> ql, bl;
  std::vector<double> blp, row;
  std::unique_ptr<Progress> bar;
  if (opts.progress) bar = std::make_unique<Progress>(opts.label, windows.size(), "chunks");
  Timer t;
  int64_t processed = 0;
  const size_t V = static_cast<size_t>(vocab);
  for (size_t c = 0; c < windows.size(); ++c) {
    const Window& w = windows[c];
    const size_t rows = w.targets.size();
    if (base.model) {
      forward(*base.model, w, c, vocab, bl, "the reference");
      blp.resize(rows * V);
      for (size_t r = 0; r < rows; ++r) {
        log_softmax(std::span<const float>(bl).subspan(r * V, V), row);
        std::copy(row.begin(), row.end(), blp.begin() + static_cast<std::ptrdiff_t>(r * V));
      }
      processed += static_cast<int64_t>(w.input.size());
    } else {
      const int64_t got = base.file->next_window(blp);
      CALQ_CHECK(static_cast<size_t>(got) == rows, "reference logits: chunk {} has {} rows, expected {}", c + 1, got,
                 rows);
    }
    forward(q, w, c, vocab, ql, "the");
    for (size_t r = 0; r < rows; ++r)
      acc.add_row(std::span<const float>(ql).subspan(r * V, V), std::span<const double>(blp).subspan(r * V, V),
                  w.targets[r]);
    processed += static_cast<int64_t>(w.input.size());
    if (bar) bar->advance(1, 0, fmt::format("KLD {:.5f}", acc.result().kld_mean));
  }
  if (bar) bar->finish();
  if (stats) *stats = {t.s(), processed};
  return acc.result();
}

PerplexityResult save_logprobs(const std::vector<Window>& windows, int64_t vocab, const ForwardFn& model,
                               LogitsWriter& out, const RunOptions& opts, RunStats* stats) {
  CALQ_CHECK(!windows.empty(), "no windows to evaluate");
  PerplexityAccumulator acc;
  std::vector<float> logits;
  std::vector<double> lp, row;
  std::unique_ptr<Progress> bar;
  if (opts.progress) bar = std::make_unique<Progress>(opts.label, windows.size(), "chunks");
  Timer t;
  int64_t processed = 0;
  const size_t V = static_cast<size_t>(vocab);
  for (size_t c = 0; c < windows.size(); ++c) {
    const Window& w = windows[c];
    forward(model, w, c, vocab, logits, "the");
    const size_t rows = w.targets.size();
    lp.resize(rows * V);
    for (size_t r = 0; r < rows; ++r) {
      log_softmax(std::span<const float>(logits).subspan(r * V, V), row);
      std::copy(row.begin(), row.end(), lp.begin() + static_cast<std::ptrdiff_t>(r * V));
      acc.add_nll(-row[static_cast<size_t>(w.targets[r])]);
    }
    out.add_window(lp, static_cast<int64_t>(rows));
    processed += static_cast<int64_t>(w.input.size());
    if (bar) bar->advance(1);
  }
  if (bar) bar->finish();
  out.finish();
  if (stats) *stats = {t.s(), processed};
  return acc.result();
}

}  // namespace calq::eval
