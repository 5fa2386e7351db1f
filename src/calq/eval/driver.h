// Runs a model over evaluation windows: perplexity, KL divergence against a base model (run in
// the same process or read from a saved log-probability file), and saving the base's
// log-probabilities. The model is a function, so the driver is independent of the engine.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "calq/eval/logits_file.h"
#include "calq/eval/metrics.h"

namespace calq::eval {

// Computes the logits of rows [first_row, input.size()) for one window's input: on return,
// `logits` holds (input.size() - first_row) × vocab values.
using ForwardFn =
    std::function<void(const std::vector<int32_t>& input, int64_t first_row, std::vector<float>& logits)>;

// The same for several windows of equal length at once (one batched forward pass): on return,
// `logits` holds, window after window, (length - first_row) × vocab values each.
using BatchForwardFn = std::function<void(const std::vector<const std::vector<int32_t>*>& inputs, int64_t first_row,
                                          std::vector<float>& logits)>;

struct RunOptions {
  bool progress = true;
  std::string label = "eval";
  // When set, consecutive windows of equal length and offset are run `batch` at a time through
  // it (weights are read once per batch, and the matrix products are larger).
  BatchForwardFn batch_fn;
  int64_t batch = 1;
};

struct RunStats {
  double seconds = 0;
  int64_t tokens_processed = 0;  // forward-pass tokens (inputs), for tokens/s
};

PerplexityResult run_perplexity(const std::vector<Window>& windows, int64_t vocab, const ForwardFn& model,
                                const RunOptions& opts, RunStats* stats = nullptr);

// The base side of a KL-divergence run: a model evaluated here, or a saved file.
struct KldBase {
  const ForwardFn* model = nullptr;
  LogitsReader* file = nullptr;
};
KldResult run_kl_divergence(const std::vector<Window>& windows, int64_t vocab, const ForwardFn& q, KldBase base,
                            const RunOptions& opts, RunStats* stats = nullptr);

// Evaluates `model` on the windows and writes its log-probabilities for the scored rows; also
// returns its perplexity (the same windows).
PerplexityResult save_logprobs(const std::vector<Window>& windows, int64_t vocab, const ForwardFn& model,
                               LogitsWriter& out, const RunOptions& opts, RunStats* stats = nullptr);

}  // namespace calq::eval
