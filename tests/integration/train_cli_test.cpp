// calq train --method cpt end to end on bench-qwen3-16m (skipped when ../shared lacks it): the
// PEFT adapter, the schedule actually run, resume reproducing an uninterrupted run byte for byte,
// and the bad-input errors of issue 8.
#include <gtest/gtest.h>

#include <cmath>

#include "support.h"

using namespace calq_test;

namespace {

struct Env {
  fs::path model, text;
  bool ok() const { return !model.empty() && !text.empty(); }
};

Env env() { return {shared_file("data/models/bench-qwen3-16m"), shared_file("data/calibration/calibration_datav3_small.txt")}; }

RunResult train(const Env& e, const fs::path& out, const std::string& extra) {
  const bool own_data = extra.find("--data ") != std::string::npos;
  const bool own_targets = extra.find("--lora-targets ") != std::string::npos;
  return run(calq_bin() + " train --method cpt -m " + e.model.string() + (own_data ? "" : " --data " + e.text.string()) +
             " -o " + out.string() + " --offline --samples 8 --seq-len 32 --batch 2 --lora-rank 2 " +
             (own_targets ? "" : "--lora-targets 'q_proj|v_proj' ") + "--calib-batches 1 " + extra + " 2>&1");
}

}  // namespace

TEST(TrainCli, AdapterScheduleAndResume) {
  const Env e = env();
  if (!e.ok()) GTEST_SKIP() << "bench-qwen3-16m or calibration text not in ../shared";
  TempDir d;
  auto r = train(e, d / "full", "--bits 4:8 --cycles 2 --steps 6 --quantize-inputs");
  ASSERT_EQ(r.rc, 0) << r.output;
  // T = 3 steps per cycle: 4 + 2(1 - cos(pi k/3)) = 4, 5, 7.
  const auto log = nlohmann::json::parse(read_file(d / "full/training_log.json"));
  EXPECT_EQ(log["bits"].get<std::vector<int>>(), (std::vector<int>{4, 5, 7, 4, 5, 7}));
  EXPECT_EQ(log["calibrated_bits"].get<std::vector<int>>(), (std::vector<int>{4, 5, 7}));
  EXPECT_NE(r.output.find("⚠️ 5-bit not calibrated, calibrating now..."), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("Weight/Input calibrated bits: [4, 5, 7]"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("6-bit not calibrated"), std::string::npos) << r.output;  // never an unused precision
  // The PEFT adapter.
  const auto cfg = nlohmann::json::parse(read_file(d / "full/adapter_config.json"));
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["r"], 2);
  const auto t = read_safetensors(d / "full/adapter_model.safetensors");
  const auto& cfgm = nlohmann::json::parse(read_file(e.model / "config.json"));
  const int64_t layers = cfgm["num_hidden_layers"], hidden = cfgm["hidden_size"];
  EXPECT_EQ(static_cast<int64_t>(t.size()), 2 * 2 * layers);
  const auto& a = t.at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, hidden}));
  EXPECT_EQ(a.dtype, "F32");
  ASSERT_TRUE(t.count("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"));
  // Trained: B moved away from its zero init.
  const auto b = raw_to_float(t.at("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"));
  double s = 0;
  for (float x : b) s += std::fabs(x);
  EXPECT_GT(s, 0.0);

  // Interrupted after 3 steps and resumed: the same adapter, byte for byte.
  r = train(e, d / "split", "--bits 4:8 --cycles 2 --steps 6 --quantize-inputs --stop-after 3");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_FALSE(fs::exists(d / "split/adapter_model.safetensors"));
  r = train(e, d / "split", "--bits 4:8 --cycles 2 --steps 6 --quantize-inputs --resume " + (d / "split/checkpoint").string());
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(d / "split/adapter_model.safetensors"), read_file(d / "full/adapter_model.safetensors"));
  // A checkpoint of another configuration is refused, naming the difference.
  r = train(e, d / "other", "--bits 4:8 --cycles 2 --steps 6 --quantize-inputs --lora-alpha 16 --resume " +
                                (d / "split/checkpoint").string());
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("lora_alpha: checkpoint 32.0, this run 16.0"), std::string::npos) << r.output;
}

// --eval-bits / --eval-data / --eval-ctx / --eval-chunks: before training the adapters are zero,
// so the fp32 perplexity equals calq eval's on the same chunks (another implementation: the
// engine); --seed makes a run reproducible (same bytes, and another seed gives others);
// --overwrite replaces an adapter; --grad-accum, --decay-lora and per-channel input ranges run;
// a step larger than the samples is refused.
TEST(TrainCli, EvalSeedOverwriteGradAccum) {
  const Env e = env();
  const fs::path wiki = shared_file("data/wikitext-2-raw/wiki.test.raw");
  if (!e.ok() || wiki.empty()) GTEST_SKIP() << "bench-qwen3-16m, calibration or WikiText-2 text not in ../shared";
  TempDir d;
  const std::string opts = "--bits 4:8 --cycles 1 --steps 2 --grad-accum 2 --decay-lora --quantize-inputs --input-granularity channel "
                           "--eval-bits fp32,4 --eval-data " + wiki.string() + " --eval-ctx 32 --eval-chunks 2";
  auto r = train(e, d / "a", opts + " --seed 3");
  ASSERT_EQ(r.rc, 0) << r.output;
  const std::string key = "before training: perplexity at fp32: ";
  const size_t at = r.output.find(key);
  ASSERT_NE(at, std::string::npos) << r.output;
  const double before = std::stod(r.output.substr(at + key.size()));
  EXPECT_NE(r.output.find("(2 chunks of 32 on " + wiki.string() + ")"), std::string::npos) << r.output;
  auto ev = run("CALQ_OFFLINE=1 " + calq_bin() + " -q eval --model " + e.model.string() + " --dataset " + wiki.string() +
                " --ctx 32 --chunks 2 --json " + (d / "ppl.json").string());
  ASSERT_EQ(ev.rc, 0) << ev.output;
  const double engine_ppl = read_json(d / "ppl.json")["ppl"];
  EXPECT_NEAR(before, engine_ppl, 1e-3 * engine_ppl) << "training model vs engine, untrained adapters";
  const auto log = read_json(d / "a/training_log.json");
  EXPECT_EQ(log["steps"], 2);
  ASSERT_EQ(log["eval"].size(), 2u);
  EXPECT_EQ(log["eval"][0]["bits"], 0);
  EXPECT_EQ(log["eval"][1]["bits"], 4);
  for (const auto& x : log["eval"]) EXPECT_TRUE(std::isfinite(x["ppl"].get<double>()));
  // The same seed into the same output: refused without --overwrite, the same bytes with it.
  const std::string first = read_file(d / "a/adapter_model.safetensors");
  r = train(e, d / "a", opts + " --seed 3");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  r = train(e, d / "a", opts + " --seed 3 --overwrite");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_file(d / "a/adapter_model.safetensors"), first);
  r = train(e, d / "b", opts + " --seed 4");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(read_file(d / "b/adapter_model.safetensors"), first);
  r = train(e, d / "c", "--cycles 1 --steps 2 --grad-accum 5");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--samples 8 is fewer than one step needs (--batch 2 x --grad-accum 5)"), std::string::npos)
      << r.output;
}

// --schedule epoch: the precision changes once per epoch (4 steps each here), following the cosine
// of the cyclic schedule over the epochs: one cycle of 2 epochs from 4 to 8 bits gives 4, then
// 4 + 4 (1 - cos(pi/2)) / 2 = 6. --input-bits 8 fixes the inputs' precision instead of following
// the weights' (another adapter).
TEST(TrainCli, EpochScheduleAndInputBits) {
  const Env e = env();
  if (!e.ok()) GTEST_SKIP() << "bench-qwen3-16m or calibration text not in ../shared";
  TempDir d;
  const std::string opts = "--bits 4:8 --cycles 1 --schedule epoch --epochs 2 --quantize-inputs";
  auto r = train(e, d / "a", opts);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto log = read_json(d / "a/training_log.json");
  EXPECT_EQ(log["bits"].get<std::vector<int>>(), (std::vector<int>{4, 4, 4, 4, 6, 6, 6, 6}));
  EXPECT_NE(r.output.find("8 steps (4 per epoch)"), std::string::npos) << r.output;
  r = train(e, d / "b", opts + " --input-bits 8");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(d / "b/training_log.json")["bits"], log["bits"]);
  EXPECT_NE(read_file(d / "b/adapter_model.safetensors"), read_file(d / "a/adapter_model.safetensors"));
}

TEST(TrainCli, BadInput) {
  const Env e = env();
  if (!e.ok()) GTEST_SKIP() << "bench-qwen3-16m or calibration text not in ../shared";
  TempDir d;
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"--bits 1:8 --steps 2", "outside 2..16"},
      {"--bits 4:17 --steps 2", "outside 2..16"},
      {"--bits 8:4 --steps 2", "the minimum is larger than the maximum"},
      {"--bits 4:8 --steps 2 --lora-targets c_attn", "matches no linear module"},
      {"--bits 4:8 --epochs 2 --cycles 4 --schedule epoch", "--schedule iter"},
      {"--bits 4:8 --steps 2 --data wikitext2:test", "must not be trained on"},
      {"--bits 4:8 --steps 2 --data /some/where/wiki.test.raw", "must not be trained on"},
      {"--bits 4:8 --steps 2 --lora-targets 'q_proj('", "not a valid regular expression"},
      {"--bits 4:8 --steps 2 --input-bits 8", "--input-bits needs --quantize-inputs"},
      {"--bits 4:8", "exactly one of --epochs N or --steps N"},
  };
  for (const auto& c : cases) {
    std::string args = c.args;
    auto r = train(e, d / "bad", args);
    EXPECT_EQ(r.rc, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << args << "\n" << r.output;
  }
  // --recalibrate-every 1: every precision used in epoch 0 is calibrated again when epoch 1 uses it.
  {
    auto r = train(e, d / "recal", "--bits 4:8 --cycles 2 --epochs 2 --quantize-inputs --recalibrate-every 1");
    EXPECT_EQ(r.rc, 0) << r.output;
    size_t n = 0;
    for (size_t p = r.output.find("Recalibrating"); p != std::string::npos; p = r.output.find("Recalibrating", p + 1)) ++n;
    EXPECT_EQ(n, 4u) << r.output;  // 4, 5, 6, 7 (T = 4 steps: 4 4.59 6 7.41)
  }
  // PRT prints its table and picks bounds within 2..MAX.
  {
    auto r = train(e, d / "prt", "--prt --bits 4:6 --steps 2 --cycles 1 --prt-batches 1");
    EXPECT_EQ(r.rc, 0) << r.output;
    EXPECT_NE(r.output.find("Precision range test"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("PRT bounds: "), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("Weight/Input calibrated bits: [2, 3, 4, 5, 6]"), std::string::npos) << r.output;
  }
  // NaN loss: stop with the step and the precision, keep the last good checkpoint.
  auto r = train(e, d / "nan", "--bits 6:6 --steps 5 --lr 1e30 --clip 0 --checkpoint-every 1");
  EXPECT_EQ(r.rc, 1) << r.output;
  const auto at = r.output.find("loss is NaN at step ");
  ASSERT_NE(at, std::string::npos) << r.output;
  const int step = std::stoi(r.output.substr(at + 20));
  EXPECT_NE(r.output.find(std::to_string(step) + " (precision 6-bit)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("The last good checkpoint is"), std::string::npos) << r.output;
  const auto st = nlohmann::json::parse(read_file(d / "nan/checkpoint/trainer_state.json"));
  EXPECT_EQ(st["step"], step - 1);  // the checkpoint of the last finite step, not overwritten
}

// --merged writes the base model with each adapter merged: every targeted weight is bf16(W +
// (alpha/r)·B·A) of the written adapter (a float64 reference, within half a bf16 step), untargeted
// weights are the base's bytes, trained norms (--train-norms) are the adapter's values in bf16; the
// merged model scores (calq eval, the engine) the perplexity the trainer measured with its
// adapters. What would refuse the merge is refused before training, with no adapter written: a
// head LoRA on a tied head, an existing --merged, --merged equal to --output.
TEST(TrainCli, MergedModelIsTheBasePlusTheScaledAdapters) {
  const Env e = env();
  const fs::path wiki = shared_file("data/wikitext-2-raw/wiki.test.raw");
  if (!e.ok() || wiki.empty()) GTEST_SKIP() << "bench-qwen3-16m, calibration or WikiText-2 text not in ../shared";
  TempDir d;
  auto r = train(e, d / "a",
                 "--bits 4:8 --cycles 1 --steps 4 --train-norms --merged " + (d / "m").string() +
                     " --eval-bits fp32 --eval-data " + wiki.string() + " --eval-ctx 32 --eval-chunks 2");
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto base = read_model_tensors(e.model), merged = read_model_tensors(d / "m");
  const auto ad = read_safetensors(d / "a/adapter_model.safetensors");
  ASSERT_EQ(base.size(), merged.size());
  const double scale = 32.0 / 2.0;  // lora_alpha / r
  int64_t changed = 0;
  for (const auto& [name, t] : base) {
    ASSERT_TRUE(merged.count(name)) << name;
    const auto& m = merged.at(name);
    EXPECT_EQ(m.dtype, t.dtype) << name;
    EXPECT_EQ(m.shape, t.shape) << name;
    const std::string stem = name.substr(0, name.size() - 7);  // without ".weight"
    const std::string key = "base_model.model." + stem;
    if (ad.count(key + ".lora_A.weight")) {
      const auto W = raw_to_float(t), M = raw_to_float(m);
      const auto A = raw_to_float(ad.at(key + ".lora_A.weight")), B = raw_to_float(ad.at(key + ".lora_B.weight"));
      const int64_t out = t.shape[0], in = t.shape[1], rank = ad.at(key + ".lora_A.weight").shape[0];
      int bad = 0;
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) {
          double ba = 0, mag = 0;
          for (int64_t k = 0; k < rank; ++k) {
            ba += static_cast<double>(B[o * rank + k]) * A[k * in + i];
            mag += std::fabs(static_cast<double>(B[o * rank + k]) * A[k * in + i]);
          }
          const double want = W[o * in + i] + scale * ba;
          const double got = M[o * in + i];
          changed += got != W[o * in + i];
          // Half a bf16 step of the result, plus the fp32 merge's rounding (cancellation).
          const double tol = std::ldexp(std::fabs(want), -8) + std::ldexp(std::fabs(W[o * in + i]) + scale * mag, -21);
          if (!(std::fabs(got - want) <= tol) && bad++ < 3)
            ADD_FAILURE() << name << "[" << o << "," << i << "] = " << got << ", W + s·BA = " << want;
        }
    } else if (ad.count(key + ".weight") && name.find("norm") != std::string::npos) {
      const auto N = raw_to_float(ad.at(key + ".weight")), M = raw_to_float(m);
      ASSERT_EQ(N.size(), M.size()) << name;
      for (size_t i = 0; i < N.size(); ++i)
        ASSERT_LE(std::fabs(M[i] - N[i]), std::ldexp(std::fabs(N[i]), -8)) << name << "[" << i << "]";
    } else {
      EXPECT_TRUE(m.bytes == t.bytes) << name << " is not the base's";
    }
  }
  EXPECT_GT(changed, 0) << "no merged weight moved (untrained adapters?)";
  const std::string key = "after training: perplexity at fp32: ";
  const size_t at = r.output.find(key);
  ASSERT_NE(at, std::string::npos) << r.output;
  const double trained = std::stod(r.output.substr(at + key.size()));
  auto ev = run("CALQ_OFFLINE=1 " + calq_bin() + " -q eval --model " + (d / "m").string() + " --dataset " + wiki.string() +
                " --ctx 32 --chunks 2 --json " + (d / "ppl.json").string());
  ASSERT_EQ(ev.rc, 0) << ev.output;
  const double merged_ppl = read_json(d / "ppl.json")["ppl"];
  std::printf("trainer (adapters, fp32) %.5f, merged model (bf16) %.5f\n", trained, merged_ppl);
  EXPECT_NEAR(merged_ppl, trained, 0.01 * trained);

  const struct {
    std::string args, expect;
  } refused[] = {{"--lora-head --merged " + (d / "m2").string(), "the head's LoRA cannot be merged into a head tied"},
                 {"--merged " + (d / "m").string(), "already exists; use --overwrite"},
                 {"--merged " + (d / "b").string() + "/", "must be a directory of its own"}};
  for (const auto& c : refused) {
    r = train(e, d / "b", "--bits 4:8 --cycles 1 --steps 2 " + c.args);
    EXPECT_EQ(r.rc, 1) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_EQ(r.output.find("train cpt:"), std::string::npos) << c.args << ": refused only after training";
    EXPECT_FALSE(fs::exists(d / "b/adapter_model.safetensors")) << c.args;
  }
}

// Optimizer and quantizer options reach the run: each gives a valid adapter other than the
// default's (--quantizer log, --gradient-ranges calibrated, --lora-dropout, --weight-decay with
// --decay-lora, --warmup, --min-lr), the fingerprint records the quantizer and the dropout, and
// --prt-threshold is the one the precision range test prints.
TEST(TrainCli, OptimizerAndQuantizerOptionsChangeTheRun) {
  const Env e = env();
  if (!e.ok()) GTEST_SKIP() << "bench-qwen3-16m or calibration text not in ../shared";
  TempDir d;
  const std::string opts = "--bits 4:8 --cycles 1 --steps 4 ";
  auto r = train(e, d / "base", opts);
  ASSERT_EQ(r.rc, 0) << r.output;
  const std::string first = read_file(d / "base/adapter_model.safetensors");
  int i = 0;
  for (const std::string v : {"--quantizer log", "--gradient-ranges calibrated", "--lora-dropout 0.2",
                              "--weight-decay 0.5 --decay-lora", "--warmup 2", "--min-lr 1e-3"}) {
    const fs::path out = d / ("v" + std::to_string(i++));
    r = train(e, out, opts + v);
    ASSERT_EQ(r.rc, 0) << v << "\n" << r.output;
    EXPECT_NE(read_file(out / "adapter_model.safetensors"), first) << v << " changed nothing";
    const auto fp = read_json(out / "training_log.json")["fingerprint"];
    if (v == "--quantizer log") EXPECT_EQ(fp["weight_quantizer"], "log");
    if (v == "--lora-dropout 0.2") EXPECT_DOUBLE_EQ(fp["lora_dropout"].get<double>(), 0.2);
  }
  r = train(e, d / "prt", opts + "--prt --prt-batches 1 --prt-threshold 0.25");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("threshold 0.25 top-1 accuracy"), std::string::npos) << r.output;
}
