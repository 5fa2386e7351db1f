// calq train --method cpt end to end on bench-qwen3-16m (skipped when ../shared lacks it): the
// PEFT adapter, the schedule actually run, resume reproducing an uninterrupted run byte for byte,
// and the bad-input errors of issue 8.
#include <gtest/gtest.h>

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
