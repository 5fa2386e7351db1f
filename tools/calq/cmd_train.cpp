// calq train: LoRA fine-tuning under fake quantization; --method cpt cycles the forward precision
// (cyclic precision training), --method static keeps it fixed (the QAT baseline). docs/cpt.md.
#include <fmt/format.h>

#include <sstream>

#include "calq/core/error.h"
#include "calq/train/trainer.h"
#include "commands.h"

namespace calq::cli {

namespace {

std::pair<int, int> parse_bits(const std::string& s) {
  const auto colon = s.find(':');
  auto num = [&](const std::string& v) {
    size_t used = 0;
    int n = 0;
    try {
      n = std::stoi(v, &used);
    } catch (...) {
      used = 0;
    }
    CALQ_CHECK(used == v.size() && !v.empty(), "--bits '{}': expected MIN:MAX (e.g. 4:8) or one bit-width", s);
    return n;
  };
  if (colon == std::string::npos) {
    const int b = num(s);
    return {b, b};
  }
  return {num(s.substr(0, colon)), num(s.substr(colon + 1))};
}

std::vector<int> parse_eval_bits(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item == "fp32" || item == "32") {
      out.push_back(0);
      continue;
    }
    size_t used = 0;
    int b = 0;
    try {
      b = std::stoi(item, &used);
    } catch (...) {
      used = 0;
    }
    CALQ_CHECK(used == item.size() && !item.empty(), "--eval-bits '{}': expected a list like 4,6,8,fp32", s);
    train::check_bits(b, "--eval-bits");
    out.push_back(b);
  }
  return out;
}

}  // namespace

Command add_train(CLI::App& app) {
  struct Args {
    train::TrainOptions o;
    std::string bits = "4:8", schedule = "iter", eval_bits, quantizer = "minmax", input_gran = "tensor",
                gradient_mode = "dynamic";
  };
  auto a = std::make_shared<Args>();
  train::TrainOptions& o = a->o;
  auto* c = app.add_subcommand("train",
                               "LoRA fine-tuning under fake quantization: cyclic precision training (--method cpt) "
                               "or fixed-precision QAT (--method static); writes a PEFT adapter");
  c->add_option("--method", o.method, "cpt (cyclic precision) or static (fixed precision = the --bits maximum)")
      ->check(CLI::IsMember({"cpt", "static"}))
      ->capture_default_str();
  c->add_option("--model,-m", o.model, "Base model directory (Hugging Face layout)")->required();
  c->add_option("--data", o.data,
                "Training text: bartowski-v3, wikitext2[:train|validation], c4[:N] or a file (never wikitext-2 test)")
      ->capture_default_str();
  c->add_option("--output,-o", o.output, "Output directory: the PEFT adapter, checkpoint/ and training_log.json")
      ->required();
  c->add_option("--bits", a->bits, "Forward precision range MIN:MAX (2..16); with --prt only MAX is used")
      ->capture_default_str();
  c->add_flag("--prt", o.prt, "Find the lower bound with the precision range test");
  c->add_option("--prt-threshold", o.prt_threshold, "PRT: top-1 accuracy gain that marks the lower bound")
      ->capture_default_str();
  c->add_option("--prt-batches", o.prt_batches, "PRT: fixed batches evaluated per precision")->capture_default_str();
  c->add_option("--cycles", o.cycles, "Precision cycles over the run")->capture_default_str();
  c->add_option("--schedule", a->schedule, "iter (the paper's, per optimizer step) or epoch")
      ->check(CLI::IsMember({"iter", "epoch"}))
      ->capture_default_str();
  c->add_option("--epochs", o.epochs, "Epochs over the training windows (or --steps)");
  c->add_option("--steps", o.steps, "Optimizer steps (or --epochs)");
  c->add_option("--samples", o.samples, "Training windows of --seq-len tokens taken from --data")
      ->capture_default_str();
  c->add_option("--seq-len", o.seq_len, "Tokens per training window")->capture_default_str();
  c->add_option("--batch", o.batch, "Windows per micro-batch")->capture_default_str();
  c->add_option("--grad-accum", o.grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  c->add_option("--lr", o.adam.lr, "Peak learning rate (AdamW)")->capture_default_str();
  c->add_option("--min-lr", o.min_lr, "Learning rate at the end of the cosine")->capture_default_str();
  c->add_option("--warmup", o.warmup, "Warm-up steps (default: 5% of the steps)");
  c->add_option("--weight-decay", o.adam.weight_decay, "AdamW decay (never on norms; on LoRA only with --decay-lora)")
      ->capture_default_str();
  c->add_flag("--decay-lora", o.model_opts.lora.decay, "Apply weight decay to the LoRA factors too");
  c->add_option("--clip", o.clip, "Gradient-norm clipping (0: off)")->capture_default_str();
  c->add_option("--lora-rank", o.model_opts.lora.rank, "LoRA rank")->capture_default_str();
  c->add_option("--lora-alpha", o.model_opts.lora.alpha, "LoRA alpha (scale alpha/rank)")->capture_default_str();
  c->add_option("--lora-dropout", o.model_opts.lora.dropout, "Dropout on the LoRA input")->capture_default_str();
  c->add_option("--lora-targets", o.model_opts.lora.targets,
                "Regex searched in module paths (e.g. 'q_proj|v_proj', 'c_attn'); must match at least one")
      ->capture_default_str();
  c->add_flag("--lora-head", o.model_opts.lora.head, "Also adapt lm_head");
  c->add_flag("--train-norms", o.model_opts.train_norms, "Train the norm weights (and LayerNorm biases)");
  c->add_option("--quantizer", a->quantizer, "minmax (symmetric integer) or log (the seed's log quantizer)")
      ->check(CLI::IsMember({"minmax", "log"}))
      ->capture_default_str();
  c->add_flag("--quantize-inputs", o.quant.quantize_inputs, "Also fake-quantize every linear input (W?A?)");
  c->add_option("--input-bits", o.quant.input_bits,
                "Fixed input precision with --quantize-inputs (e.g. 8 for W4A8); default: the forward precision");
  c->add_option("--input-granularity", a->input_gran, "Input ranges per tensor or per channel")
      ->check(CLI::IsMember({"tensor", "channel"}))
      ->capture_default_str();
  c->add_option("--gradient-bits", o.quant.gradient_bits, "LoRA gradient precision (0: not quantized)")
      ->capture_default_str();
  c->add_option("--gradient-ranges", a->gradient_mode, "dynamic (per step) or calibrated (once)")
      ->check(CLI::IsMember({"dynamic", "calibrated"}))
      ->capture_default_str();
  c->add_option("--calib-batches", o.calib_batches, "Batches for input calibration per precision")
      ->capture_default_str();
  c->add_option("--recalibrate-every", o.recalibrate_every, "Recalibrate used precisions every K epochs (0: never)")
      ->capture_default_str();
  c->add_option("--eval-bits", a->eval_bits, "Perplexity before and after training at these precisions (e.g. 4,6,8,fp32)");
  c->add_option("--eval-data", o.eval_data, "Evaluation text (default wikitext-2 test)")->capture_default_str();
  c->add_option("--eval-ctx", o.eval_ctx, "Evaluation context")->capture_default_str();
  c->add_option("--eval-chunks", o.eval_chunks, "Evaluation chunks (-1: all)")->capture_default_str();
  c->add_option("--seed", o.seed, "Seed (data order, LoRA init, dropout)")->capture_default_str();
  c->add_option("--checkpoint-every", o.checkpoint_every, "Write OUTPUT/checkpoint every N steps (0: at the end)")
      ->capture_default_str();
  c->add_option("--stop-after", o.stop_after, "Stop after N steps with a checkpoint (split a long run)");
  c->add_option("--resume", o.resume, "Resume from a checkpoint directory (OUTPUT/checkpoint)");
  c->add_option("--merged", o.merged,
                "Also write the base model with the adapters merged (fp weights, the base dtype) to this directory, "
                "for calq quantize / calq eval");
  c->add_flag("--overwrite", o.overwrite, "Replace an adapter already in --output");
  c->add_flag("--offline", o.offline, "Never download data");
  return {c, [a]() -> int {
            train::TrainOptions& o = a->o;
            const auto [lo, hi] = parse_bits(a->bits);
            o.min_bits = lo;
            o.max_bits = hi;
            o.schedule = a->schedule == "epoch" ? train::CyclicPrecisionScheduler::Unit::Epoch
                                                : train::CyclicPrecisionScheduler::Unit::Iteration;
            const auto kind = train::parse_quant_kind(a->quantizer);
            o.quant.weight_kind = o.quant.input_kind = o.quant.lora_kind = kind;
            o.quant.input_granularity = a->input_gran == "channel" ? train::Granularity::Column : train::Granularity::Tensor;
            o.quant.gradient_calibrated = a->gradient_mode == "calibrated";
            if (!a->eval_bits.empty()) o.eval_bits = parse_eval_bits(a->eval_bits);
            train::train_cpt(o);
            return 0;
          }};
}

}  // namespace calq::cli
