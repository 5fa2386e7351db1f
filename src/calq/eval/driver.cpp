#include "calq/eval/driver.h"

#include <chrono>
#include <cmath>

#include "calq/core/error.h"
#include "calq/core/log.h"

namespace calq::eval {

namespace {

// Computes the logits of windows [c0, c1) (one call per window, or batched) into `logits`, one
// window after the other, and checks their shape and that they are finite.
void forward_group(const ForwardFn& model, const RunOptions& o, const std::vector<Window>& ws, size_t c0, size_t c1,
                   int64_t vocab, std::vector<float>& logits, const char* who) {
  size_t expected = 0;
  for (size_t c = c0; c < c1; ++c) expected += (ws[c].input.size() - static_cast<size_t>(ws[c].scored_from));
  expected *= static_cast<size_t>(vocab);
  if (c1 - c0 > 1) {
    std::vector<const std::vector<int32_t>*> in;
    for (size_t c = c0; c < c1; ++c) in.push_back(&ws[c].input);
    o.batch_fn(in, ws[c0].scored_from, logits);
  } else {
    model(ws[c0].input, ws[c0].scored_from, logits);
  }
  CALQ_CHECK(logits.size() == expected, "{} model returned {} logits for chunks {}..{} (expected {})", who,
             logits.size(), c0 + 1, c1, expected);
  size_t off = 0;
  for (size_t c = c0; c < c1; ++c) {
    const size_t rows = ws[c].input.size() - static_cast<size_t>(ws[c].scored_from);
    for (size_t i = 0; i < rows * static_cast<size_t>(vocab); ++i)
      if (!std::isfinite(logits[off + i]))
        fail("{} model: non-finite logit ({}) in chunk {} at position {}, token id {}", who, logits[off + i], c + 1,
             static_cast<int64_t>(i / static_cast<size_t>(vocab)) + ws[c].scored_from, i % static_cast<size_t>(vocab));
    off += rows * static_cast<size_t>(vocab);
  }
}

// The end of the group of windows starting at c0 that can run in one batch.
size_t group_end(const RunOptions& o, const std::vector<Window>& ws, size_t c0) {
  size_t c1 = c0 + 1;
  if (!o.batch_fn || o.batch <= 1) return c1;
  while (c1 < ws.size() && static_cast<int64_t>(c1 - c0) < o.batch && ws[c1].input.size() == ws[c0].input.size() &&
         ws[c1].scored_from == ws[c0].scored_from)
    ++c1;
  return c1;
}

// Offset of window c's logits inside its group's buffer.
size_t window_offset(const std::vector<Window>& ws, size_t c0, size_t c, int64_t vocab) {
  size_t off = 0;
  for (size_t k = c0; k < c; ++k) off += (ws[k].input.size() - static_cast<size_t>(ws[k].scored_from));
  return off * static_cast<size_t>(vocab);
}

struct Timer {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  double s() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};

// log_softmax of each of `rows` rows of V logits into out (rows × V), rows in parallel.
void log_softmax_rows(std::span<const float> logits, size_t rows, size_t V, std::vector<double>& out) {
  const auto n = static_cast<int64_t>(rows);
#pragma omp parallel if (rows * V >= (1u << 16))
  {
    std::vector<double> row;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      log_softmax(logits.subspan(static_cast<size_t>(r) * V, V), row);
      std::copy(row.begin(), row.end(), out.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(r) * V));
    }
  }
}

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
  for (size_t c0 = 0; c0 < windows.size();) {
    const size_t c1 = group_end(opts, windows, c0);
    forward_group(model, opts, windows, c0, c1, vocab, logits, "the");
    for (size_t c = c0; c < c1; ++c) {
      const Window& w = windows[c];
      const size_t rows = w.targets.size();
      acc.add(std::span<const float>(logits).subspan(window_offset(windows, c0, c, vocab), rows * static_cast<size_t>(vocab)),
              vocab, w.targets);
      processed += static_cast<int64_t>(w.input.size());
    }
    if (bar) bar->advance(c1 - c0, 0, fmt::format("PPL {:.4f}", acc.result().ppl));
    c0 = c1;
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
  std::vector<double> blp;
  std::unique_ptr<Progress> bar;
  if (opts.progress) bar = std::make_unique<Progress>(opts.label, windows.size(), "chunks");
  Timer t;
  int64_t processed = 0;
  const size_t V = static_cast<size_t>(vocab);
  // The base model runs one window at a time (its batch function is not known here).
  RunOptions one = opts;
  one.batch_fn = nullptr;
  for (size_t c0 = 0; c0 < windows.size();) {
    const size_t c1 = group_end(opts, windows, c0);
    forward_group(q, opts, windows, c0, c1, vocab, ql, "the");
    for (size_t c = c0; c < c1; ++c) {
      const Window& w = windows[c];
      const size_t rows = w.targets.size();
      if (base.model) {
        forward_group(*base.model, one, windows, c, c + 1, vocab, bl, "the reference");
        blp.resize(rows * V);
        log_softmax_rows(bl, rows, V, blp);
        processed += static_cast<int64_t>(w.input.size());
      } else {
        const int64_t got = base.file->next_window(blp);
        CALQ_CHECK(static_cast<size_t>(got) == rows, "reference logits: chunk {} has {} rows, expected {}", c + 1, got,
                   rows);
      }
      const size_t off = window_offset(windows, c0, c, vocab);
      acc.add_rows(std::span<const float>(ql).subspan(off, rows * V), std::span<const double>(blp).subspan(0, rows * V),
                   vocab, w.targets);
      processed += static_cast<int64_t>(w.input.size());
    }
    if (bar) bar->advance(c1 - c0, 0, fmt::format("KLD {:.5f}", acc.mean_kld()));
    c0 = c1;
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
  std::vector<double> lp;
  std::unique_ptr<Progress> bar;
  if (opts.progress) bar = std::make_unique<Progress>(opts.label, windows.size(), "chunks");
  Timer t;
  int64_t processed = 0;
  const size_t V = static_cast<size_t>(vocab);
  for (size_t c0 = 0; c0 < windows.size();) {
    const size_t c1 = group_end(opts, windows, c0);
    forward_group(model, opts, windows, c0, c1, vocab, logits, "the");
    for (size_t c = c0; c < c1; ++c) {
      const Window& w = windows[c];
      const size_t rows = w.targets.size(), off = window_offset(windows, c0, c, vocab);
      lp.resize(rows * V);
      log_softmax_rows(std::span<const float>(logits).subspan(off, rows * V), rows, V, lp);
      for (size_t r = 0; r < rows; ++r) acc.add_nll(-lp[r * V + static_cast<size_t>(w.targets[r])]);
      out.add_window(lp, static_cast<int64_t>(rows));
      processed += static_cast<int64_t>(w.input.size());
    }
    if (bar) bar->advance(c1 - c0);
    c0 = c1;
  }
  if (bar) bar->finish();
  out.finish();
  if (stats) *stats = {t.s(), processed};
  return acc.result();
}

}  // namespace calq::eval
