// Layer-wise calibrated runs: --resume after a kill gives the same bytes as an uninterrupted run,
// a resume with other options is refused, activations spilled beyond --max-memory and --layerwise
// change nothing in the output; activation-aware RTN folds its scales exactly and beats plain RTN.
// On the real bench-qwen3-16m model (skipped when ../shared is absent).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <set>

#include "support.h"

using namespace calq_test;
using nlohmann::json;

namespace {

// Every file of two output directories, byte for byte, except the report (times, paths).
std::string gptq_args(int samples = 6) {
  return " --method gptq --format int4 --samples " + std::to_string(samples) + " --seq-len 128 --calib-batch 2";
}
const std::string kGptq = gptq_args();

TEST(LongRun, ResumeAfterKillIsByteIdentical) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string in = " -i " + s.m16.string();
  auto r = run_calq("-q quantize" + in + " -o " + (t / "full").string() + kGptq, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_FALSE(fs::exists(t / "full.calq-work")) << "work directory left behind";

  // Killed after layer 1 (the process exits without cleanup, as with SIGKILL).
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq, d, "CALQ_TEST_ABORT_AFTER_LAYER=1");
  ASSERT_EQ(r.rc, 75) << r.output;
  ASSERT_TRUE(fs::exists(t / "res.calq-work" / "state.json"));
  EXPECT_EQ(read_json(t / "res.calq-work" / "state.json")["completed_layers"], 2);
  EXPECT_FALSE(fs::exists(t / "res"));

  // Without --resume the stale work directory is not silently reused or discarded.
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq, d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--resume"), std::string::npos) << r.output;

  // Other options: refused, naming what differs.
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq + " --damp 0.05 --resume", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("options.gptq.damp"), std::string::npos) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + gptq_args(4) + " --resume", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("calibration.sequences"), std::string::npos) << r.output;

  // A failure inside a layer after a resume (an error, not a kill): exit status 1, the layers
  // finished so far stay checkpointed, and the message says how to continue.
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq + " --resume", d, "CALQ_TEST_FAIL_AT_LAYER=4");
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("a failure injected in layer 4"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("4 of 8 layers are checkpointed"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--resume to continue from layer 4"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(t / "res.calq-work" / "state.json")["completed_layers"], 4);
  EXPECT_FALSE(fs::exists(t / "res"));

  // Resume with every activation chunk spilled to disk and weights streamed (--max-memory and
  // --layerwise are not part of the run's identity: they change where data lives, not results),
  // and without the persisted activations entering layer 4 (as a GPU-resident run leaves it): they
  // are recomputed from the embeddings and the 4 finished layers' quantized weights.
  fs::remove_all(t / "res.calq-work" / "acts_00004");
  r = run_calq("quantize" + in + " -o " + (t / "res").string() + kGptq + " --resume --max-memory 1KB --layerwise", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("spilled"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("recomputing the activations entering layer 4 from the 4 finished layers"),
            std::string::npos)
      << r.output;
  expect_same_files(t / "full", t / "res");
  auto rep = read_json(t / "res" / "calq_report.json");
  EXPECT_EQ(rep["gptq"]["modules"].size(), 56u);  // the report includes the layers done before the kill
  // The stages split this run's seconds; the recomputation of layer 4's inputs is one of them.
  const auto& stages = rep["gptq"]["stages"];
  double sum = 0;
  for (const char* k : {"load_model", "calibration_text", "calibration_embed", "resume_recompute", "calibration_forward",
                        "hessian_finalize", "quantize", "output_forward", "checkpoint", "other"}) {
    ASSERT_TRUE(stages.contains(k)) << k;
    EXPECT_GE(stages[k].get<double>(), k == std::string("other") ? -0.05 : 0.0) << k;
    sum += stages[k].get<double>();
  }
  EXPECT_GT(stages["resume_recompute"].get<double>(), 0.0);
  EXPECT_NEAR(sum, rep["gptq"]["seconds"].get<double>(), 0.05);
  EXPECT_FALSE(fs::exists(t / "res.calq-work"));
}

// --activation-precision bf16: activations rounded to bf16 at every layer boundary. A different
// computation from fp32 (other bytes), recorded in the report and the run's identity, and as
// resumable as fp32: killed after layer 1 and resumed without the persisted activations entering
// layer 2 (recomputed: embeddings and each replayed layer rounded as the run rounded them), the
// output is byte-identical to the uninterrupted run's.
TEST(LongRun, Bf16ActivationsResumeByteIdentical) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string in = " -i " + s.m16.string();
  const std::string bf16 = kGptq + " --activation-precision bf16";
  auto r = run_calq("-q quantize" + in + " -o " + (t / "full").string() + bf16, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "full" / "calq_report.json")["gptq"]["activation_precision"], "bf16");
  r = run_calq("-q quantize" + in + " -o " + (t / "fp32").string() + kGptq, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "fp32" / "calq_report.json")["gptq"]["activation_precision"], "fp32");
  EXPECT_NE(read_file(t / "full" / "model.safetensors"), read_file(t / "fp32" / "model.safetensors"))
      << "rounding the activations changed no code";

  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + bf16, d, "CALQ_TEST_ABORT_AFTER_LAYER=1");
  ASSERT_EQ(r.rc, 75) << r.output;
  // The precision is part of the run's identity.
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq + " --resume", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("activation_precision"), std::string::npos) << r.output;
  fs::remove_all(t / "res.calq-work" / "acts_00002");
  r = run_calq("quantize" + in + " -o " + (t / "res").string() + bf16 + " --resume", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("recomputing the activations entering layer 2"), std::string::npos) << r.output;
  expect_same_files(t / "full", t / "res");

  // Only the calibrated layer loops take it.
  r = run_calq("-q quantize" + in + " -o " + (t / "rtn").string() + " --method rtn --format int4 --activation-precision bf16", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--activation-precision applies to --method gptq and mr-gptq"), std::string::npos) << r.output;
}

// --layer-cache-memory: the states a true-sequential layer's passes share (attention output,
// residual after attention, MLP activation) change where the passes start, not the output. On
// bench-qwen3-16m at 6 x 128 tokens the states take 768 rows x (384 + 384 + 1024) floats:
// 1.18 MB (attn), 2.36 MB (+ mid), 5.51 MB (all three); budgets between them keep a prefix.
TEST(LongRun, LayerCacheChangesNothing) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string in = " -i " + s.m16.string();
  struct Budget {
    const char* option;
    uint64_t bytes;
    int64_t attn, mid, act;  // runs started there, over 8 layers x 3 chunks
  };
  // Each layer: gate/up's pass starts at attn (o_proj changed), down's at mid, the output pass at
  // act; with a state missing, the run starts at the latest kept one.
  const Budget budgets[] = {{" --layer-cache-memory 0", 0, 0, 0, 0},
                            {" --layer-cache-memory 1.2MB", 1179648, 72, 0, 0},
                            {" --layer-cache-memory 2.4MB", 2359296, 24, 48, 0},
                            {"", 5505024, 24, 24, 24}};
  for (const std::string method : {" --method gptq --format int4", " --method mr-gptq --format nvfp4"}) {
    SCOPED_TRACE(method);
    const std::string args = method + " --samples 6 --seq-len 128 --calib-batch 2";
    fs::path first;
    for (const auto& b : budgets) {
      SCOPED_TRACE(b.option);
      const bool partial = b.bytes > 0 && !std::string(b.option).empty();
      if (partial && method.find("mr-gptq") != std::string::npos) continue;  // gptq covers the partial budgets
      const fs::path out = t / (std::string("lc") + std::to_string(b.bytes) + (method.find("mr") != std::string::npos ? "mr" : ""));
      auto r = run_calq("-q quantize" + in + " -o " + out.string() + args + b.option, d);
      ASSERT_EQ(r.rc, 0) << r.output;
      const auto lc = read_json(out / "calq_report.json")["gptq"]["layer_cache"];
      EXPECT_EQ(lc["bytes"], b.bytes);
      EXPECT_EQ(lc["runs_from_attn"], b.attn);
      EXPECT_EQ(lc["runs_from_mid"], b.mid);
      EXPECT_EQ(lc["runs_from_act"], b.act);
      if (first.empty())
        first = out;
      else
        expect_same_files(first, out);
    }
  }
  // Errors: the size, a method without passes to share, one pass per layer.
  auto r = run_calq("-q quantize" + in + " -o " + (t / "e").string() + kGptq + " --layer-cache-memory 3XB", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--layer-cache-memory '3XB'"), std::string::npos) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "e").string() + " --method rtn --format int4 --layer-cache-memory 1GB", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--layer-cache-memory applies to --method gptq and mr-gptq"), std::string::npos) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "e").string() + kGptq + " --no-true-sequential --layer-cache-memory 1GB", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--no-true-sequential"), std::string::npos) << r.output;
}

TEST(LongRun, StorageOptionErrors) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string in = " -i " + s.m16.string();
  auto r = run_calq("-q quantize" + in + " -o " + (t / "c").string() + kGptq + " --max-memory 12XB", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--max-memory"), std::string::npos) << r.output;
  // Storage options need a calibrated method.
  r = run_calq("-q quantize" + in + " -o " + (t / "c").string() + " --format int4 --resume", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--calibration"), std::string::npos) << r.output;
  // --resume without an interrupted run.
  r = run_calq("-q quantize" + in + " -o " + (t / "c").string() + kGptq + " --resume", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("no interrupted run"), std::string::npos) << r.output;
  // An existing output is refused before any calibration work.
  fs::create_directories(t / "exists");
  r = run_calq("-q quantize" + in + " -o " + (t / "exists").string() + kGptq, d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
}

// Activation-aware RTN: the norm weights change (the scales are folded into them), the fold is
// exact (with int8, where quantization costs little, the model stays as close to the base as
// plain int8 RTN), and at int4 it beats plain RTN in KL divergence. Also from an
// activation_ranges.json written by calq calibrate.
TEST(LongRun, ActivationAwareRtn) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string in = " -i " + s.m16.string();
  auto kld = [&](const fs::path& m) { return eval_kld(m, s.m16, d, m.string() + ".json"); };
  const std::string cal = " --calibration bartowski-v3 --samples 12 --seq-len 256";
  auto r = run_calq("-q quantize" + in + " -o " + (t / "act4").string() + " --format int4" + cal, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "rtn4").string() + " --format int4", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto rep = read_json(t / "act4" / "calq_report.json");
  EXPECT_EQ(rep["method"], "rtn+act");
  int scaled = 0;
  for (auto& g : rep["act_scale"]["inputs"]) {
    if (!g["scaled"].get<bool>()) continue;
    ++scaled;
    EXPECT_LE(g["output_error"].get<double>(), g["output_error_rtn"].get<double>());
  }
  EXPECT_GT(scaled, 4);
  auto a = read_model_tensors(t / "act4"), b = read_model_tensors(s.m16);
  int changed = 0;
  for (auto& [name, tensor] : a)
    if (name.find("layernorm.weight") != std::string::npos && tensor.bytes != b.at(name).bytes) ++changed;
  EXPECT_GT(changed, 2) << "no norm weight absorbed the scales";
  const double k_act = kld(t / "act4"), k_rtn = kld(t / "rtn4");
  EXPECT_LT(k_act, 0.95 * k_rtn) << "act " << k_act << " rtn " << k_rtn;

  r = run_calq("-q quantize" + in + " -o " + (t / "act8").string() + " --format int8" + cal, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "rtn8").string() + " --format int8", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const double k8a = kld(t / "act8"), k8r = kld(t / "rtn8");
  EXPECT_LT(k8a, 2.0 * k8r + 1e-5) << k8a << " " << k8r;
  EXPECT_LT(k8a, 1e-3);

  // From calq calibrate's statistics (diagonal second moment).
  r = run_calq("-q calibrate --input " + s.m16.string() + " --output " + (t / "stats").string() +
                   " --samples 12 --seq-len 256",
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "acts").string() + " --format int4 --calibration " +
                   (t / "stats").string(),
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "acts" / "calq_report.json")["calibration"]["sha256"].get<std::string>().size(), 64u);
  EXPECT_LT(kld(t / "acts"), k_rtn);
  // Statistics of another model: refused.
  auto j = read_json(t / "stats" / "activation_ranges.json");
  j["detailed_stats"].erase("model.layers.0.self_attn.q_proj");
  write_file(t / "bad.json", j.dump());
  r = run_calq("-q quantize" + in + " -o " + (t / "x").string() + " --format int4 --calibration " +
                   (t / "bad.json").string(),
               d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("model.layers.0.self_attn.q_proj"), std::string::npos) << r.output;
}

}  // namespace

namespace {

// GPTQ on a small random Qwen3-MoE: every expert is quantized from its own routed tokens (also
// experts the first calibration chunk never reaches), experts of a layer batched per stage; an
// expert with too few (or no) routed tokens gets a blended Hessian (--moe-min-tokens), never RTN,
// and the report names it.
TEST(LongRun, MoeExpertsGetGptq) {
  SharedData s;
  const fs::path cfg30 = shared_file("data/configs/Qwen3-30B-A3B/config.json");
  const fs::path m28 = shared_file("data/models/bench-qwen3-28m");
  if (!s.ok || cfg30.empty() || m28.empty()) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  json c = read_json(cfg30);
  c["hidden_size"] = 128;
  c["num_attention_heads"] = 4;
  c["num_key_value_heads"] = 2;
  c["head_dim"] = 32;
  c["moe_intermediate_size"] = 64;
  c["intermediate_size"] = 256;
  c["num_experts"] = 8;
  c["num_experts_per_tok"] = 2;
  c["num_hidden_layers"] = 2;
  c["max_window_layers"] = 2;
  c["vocab_size"] = 8192;
  c["tie_word_embeddings"] = false;
  c.erase("layer_types");
  fs::create_directories(t / "cfg");
  write_file(t / "cfg" / "config.json", c.dump());
  auto r = run(calq_bin() + " -q generate-model --config " + (t / "cfg").string() + " --output " + (t / "moe").string());
  ASSERT_EQ(r.rc, 0) << r.output;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) fs::copy_file(m28 / f, t / "moe" / f);
  const std::string q = "-q quantize -i " + (t / "moe").string() + " --method gptq --format int4 --group-size 32";
  r = run_calq(q + " -o " + (t / "q").string() + " --samples 4 --seq-len 64", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto rep = read_json(t / "q" / "calq_report.json");
  std::set<std::string> mods;
  for (auto& m : rep["gptq"]["modules"]) {
    mods.insert(m["module"].get<std::string>());
    EXPECT_GT(m["tokens"].get<int>(), 0);
    EXPECT_FALSE(m.contains("fallback"));
  }
  EXPECT_EQ(mods.size(), 2u * (4 + 8 * 3));
  EXPECT_TRUE(mods.count("model.layers.1.mlp.experts.7.down_proj"));
  EXPECT_FALSE(mods.count("model.layers.0.mlp.gate")) << "the router must stay unquantized";
  // Three calibration tokens (six routings) cannot reach all eight experts: those without tokens
  // blend (here: take the every-token Hessian), by GPTQ, and the report lists them.
  r = run_calq(q + " -o " + (t / "q2").string() + " --samples 1 --seq-len 3 --min-tokens 0", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const json rep2 = read_json(t / "q2" / "calq_report.json");  // named: a temporary would dangle in the loop
  std::set<std::string> blended;
  for (auto& m : rep2["gptq"]["modules"]) {
    EXPECT_FALSE(m.contains("fallback") && m.contains("expert")) << "an expert fell back to RTN: " << m.dump();
    if (m.value("hessian", "") == "blend") blended.insert(m["module"].get<std::string>());
  }
  EXPECT_GE(blended.size(), 2u * 3 * 2) << "at least two experts per layer got no token";
  std::set<std::string> listed;
  for (auto& f : rep2["moe"]["fallback"]) listed.insert(f["module"].get<std::string>());
  EXPECT_EQ(listed, blended);
  EXPECT_NE(r.output.find("blended"), std::string::npos) << r.output;
  // With the default --min-tokens the same run is an error naming the module.
  r = run_calq(q + " -o " + (t / "q3").string() + " --samples 1 --seq-len 8", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--min-tokens"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "q3.calq-work")) << "a run failing in its first layer leaves no work directory";
  // The MoE options: bad values and the wrong method are refused, naming the option.
  const std::string rtn = "-q quantize -i " + (t / "moe").string() + " --format int4 --group-size 32 -o " +
                          (t / "q4").string();
  for (const auto& [extra, needle] : std::vector<std::pair<std::string, std::string>>{
           {" --method rtn --moe-hessian shared", "--moe-hessian applies to --method gptq"},
           {" --method gptq --moe-min-tokens many", "--moe-min-tokens 'many'"},
           {" --method gptq --moe-min-tokens -3", "--moe-min-tokens '-3'"},
           {" --method gptq --moe-calibration some", "--moe-calibration"},
           {" --method gptq --moe-hessian-memory lots", "--moe-hessian-memory 'lots'"}}) {
    r = run_calq(rtn + extra, d);
    EXPECT_NE(r.rc, 0) << extra;
    EXPECT_NE(r.output.find(needle), std::string::npos) << extra << ": " << r.output;
    EXPECT_FALSE(fs::exists(t / "q4"));
  }
}

}  // namespace

namespace {

// MR-GPTQ's rotations survive a kill: they are recorded per layer in the work directory, and the
// resumed output (sign tensors and config included) equals an uninterrupted run's.
TEST(LongRun, MrGptqResumeKeepsRotations) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string q = "-q quantize -i " + s.m16.string() + " --method mr-gptq --format nvfp4 --samples 4 --seq-len 64";
  auto r = run_calq(q + " -o " + (t / "full").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq(q + " -o " + (t / "res").string(), d, "CALQ_TEST_ABORT_AFTER_LAYER=3");
  ASSERT_EQ(r.rc, 75) << r.output;
  r = run_calq(q + " -o " + (t / "res").string() + " --hadamard-seed 5 --resume", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("options.mr_gptq.seed"), std::string::npos) << r.output;
  r = run_calq(q + " -o " + (t / "res").string() + " --resume", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_files(t / "full", t / "res");
  const json cfg = read_json(t / "res" / "config.json");
  EXPECT_FALSE(cfg["quantization_config"]["calq"]["rotations"].empty());
}

}  // namespace
