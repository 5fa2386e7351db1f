// The CPT training driver behind `calq train --method cpt`: data, schedule, lazy calibration,
// optional precision range test, the training loop (accumulation, clipping, AdamW, cosine LR),
// checkpoints and resume, perplexity at chosen precisions, and the PEFT adapter output.
#pragma once

#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calq/train/cpt.h"
#include "calq/train/model.h"
#include "calq/train/optim.h"

namespace calq::train {

struct TrainOptions {
  std::string model, data = "bartowski-v3", output;
  std::string method = "cpt";  // cpt (cycling) or static (fixed precision = --bits MAX, QAT baseline)
  int min_bits = 4, max_bits = 8;
  bool prt = false;
  double prt_threshold = 0.01;  // absolute top-1 accuracy gain
  int64_t prt_batches = 4;
  int64_t cycles = 32;
  CyclicPrecisionScheduler::Unit schedule = CyclicPrecisionScheduler::Unit::Iteration;
  int64_t epochs = 0, steps = 0;  // exactly one > 0
  int64_t batch = 4, seq_len = 256, grad_accum = 1, samples = 256;
  ModelOptions model_opts;
  AdamWOptions adam;
  double min_lr = 0.0;
  int64_t warmup = -1;  // -1: 5% of the steps
  double clip = 1.0;
  CptOptions quant;
  int64_t calib_batches = 4;
  int64_t recalibrate_every = 0;  // epochs; 0: never
  uint64_t seed = 0;
  std::string resume;            // checkpoint directory
  std::string merged;            // also write the merged model here (then: calq quantize --input it)
  int64_t checkpoint_every = 0;  // steps; 0: only at the end
  int64_t stop_after = 0;        // stop (with a checkpoint, no adapter) after this many steps; 0: run to the end
  std::vector<int> eval_bits;    // 0 = fp32
  std::string eval_data = "wikitext2";
  int64_t eval_ctx = 256, eval_chunks = 16;
  bool offline = false, overwrite = false, progress = true;
};

struct TrainResult {
  int64_t steps = 0;
  double first_loss = 0, last_loss = 0;  // mean of the first / last min(10, steps) steps
  std::vector<int> bits_per_step;
  std::vector<double> loss_per_step;
  double tokens_per_second = 0;
  std::set<int> calibrated_bits, lora_calibrated_bits;
  std::vector<std::pair<int, double>> eval_ppl;  // (bits, perplexity)
  int prt_lower = 0, prt_upper = 0;
};

TrainResult train_cpt(const TrainOptions& o);

// Writes a PEFT LoRA adapter into `dir` (created if needed): adapter_config.json + adapter_model.safetensors
// (base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r], fp32).
void write_peft_adapter(Model& m, const std::filesystem::path& dir, const std::string& base_model);

// Writes the base model with every adapter merged into its weight (W + (alpha/r)·B·A, in the
// stored dtype and layout; trained norms replaced) as a model directory that `calq quantize` and
// `calq eval` read: config.json and tokenizer files copied from `base_dir`. A LoRA on a head tied
// to the embedding cannot be merged (the embedding would change too) and is refused.
void write_merged_model(Model& m, const std::filesystem::path& base_dir, const std::filesystem::path& out_dir,
                        bool overwrite);

// The precision range test's lower bound from the top-1 accuracies of consecutive bit-widths
// first_bits, first_bits + 1, ...: the first b whose gain over b − 1 exceeds `threshold`; if none
// does, the b with the largest gain (the earliest on ties); with one precision, that one.
int prt_lower_bound(const std::vector<double>& accuracy, int first_bits, double threshold);

}  // namespace calq::train
