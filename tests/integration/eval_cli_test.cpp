// calq eval, calibrate, data and quantize --method gptq end to end on the real bench models
// (skipped when ../shared is absent). Reference numbers come from transformers (fp32, on an H200,
// bench/hf_perplexity.py: bench/results/hf_ppl_bench-qwen3-28m.json).
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "calq/io/gguf.h"
#include "support.h"

using namespace calq_test;
using nlohmann::json;

TEST(EvalCli, PerplexityMatchesTransformersOnTheFirstChunk) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  auto r = run_calq("-q eval --model " + s.m28.string() + " --chunks 1 --json " + (t / "p.json").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto j = read_json(t / "p.json");
  // transformers fp32: the NLL sum of chunk 1's 255 scored tokens (bench/results/...json).
  auto ref = read_json(source_dir() / "bench/results/hf_ppl_bench-qwen3-28m.json");
  const double want = std::exp(ref["llama"]["first_chunk_nll_sum"].get<double>() / 255);
  EXPECT_EQ(j["tokens_scored"], 255);
  EXPECT_NEAR(j["ppl"].get<double>(), want, 1e-4 * want);
  for (const char* k : {"metric", "ppl", "ppl_stderr", "tokens_scored", "ctx", "chunks", "seconds"})
    EXPECT_TRUE(j.contains(k)) << k;
  // The stride method scores every token but the first of the evaluated windows.
  r = run_calq("-q eval --model " + s.m16.string() + " --method stride --ctx 128 --stride 64 --chunks 3 --json " +
               (t / "s.json").string(),
           d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "s.json")["tokens_scored"], 127 + 64 + 64);
}

// The automatic batch (one chunk per thread), explicit batches and thread counts that switch the
// engine between its sequence-parallel and batch-wide paths all give the same perplexity, to the
// last printed digit.
TEST(EvalCli, BatchAndThreadsDoNotChangeResults) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  double first = 0;
  for (const char* opts : {"--threads 1 --batch 1", "--threads 2", "--threads 3 --batch 2", "--threads 2 --batch 5",
                           "--threads 4 --batch 0"}) {
    const std::string o(opts);
    const std::string thr = o.substr(0, o.find(" --batch"));
    const std::string bat = o.find(" --batch") == std::string::npos ? "" : o.substr(o.find(" --batch"));
    auto r = run_calq("-q " + thr + " eval --model " + s.m16.string() + " --ctx 128 --chunks 7" + bat + " --json " +
                          (t / "b.json").string(),
                      d);
    ASSERT_EQ(r.rc, 0) << opts << "\n" << r.output;
    const double ppl = read_json(t / "b.json")["ppl"].get<double>();
    if (first == 0) first = ppl;
    EXPECT_EQ(ppl, first) << opts;
  }
  auto r = run_calq("-q eval --model " + s.m16.string() + " --chunks 1 --batch -1", d);
  EXPECT_NE(r.rc, 0);
}

TEST(EvalCli, KlDivergenceSelfZeroSavedLogitsAndErrors) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  auto r = run_calq("-q eval --metric kl-divergence --model " + s.m16.string() + " --reference " + s.m16.string() +
                    " --chunks 2 --ctx 256 --json " + (t / "self.json").string(),
                d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto self = read_json(t / "self.json");
  EXPECT_EQ(self["kld_mean"].get<double>(), 0.0);
  EXPECT_EQ(self["kld_max"].get<double>(), 0.0);
  EXPECT_EQ(self["same_top_p"].get<double>(), 1.0);
  EXPECT_EQ(self["ppl"], self["ppl_base"]);

  // A quantized model against the base, in process and through a saved file.
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "q").string() + " --format int3 --group-size 64", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q eval --metric kl-divergence --model " + (t / "q").string() + " --reference " + s.m16.string() +
               " --chunks 2 --ctx 256 --json " + (t / "k.json").string(),
           d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto k = read_json(t / "k.json");
  EXPECT_GT(k["kld_mean"].get<double>(), 1e-3);
  EXPECT_LT(k["same_top_p"].get<double>(), 1.0);
  r = run_calq("-q eval --metric kl-divergence --model " + s.m16.string() + " --save-logits " +
               (t / "base.lp").string() + " --chunks 2 --ctx 256",
           d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q eval --metric kl-divergence --model " + (t / "q").string() + " --reference-logits " +
               (t / "base.lp").string() + " --chunks 2 --ctx 256 --json " + (t / "kf.json").string(),
           d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto kf = read_json(t / "kf.json");
  EXPECT_NEAR(kf["kld_mean"].get<double>(), k["kld_mean"].get<double>(), 5e-4);
  EXPECT_NEAR(kf["ppl_base"].get<double>(), k["ppl_base"].get<double>(), 1e-3 * k["ppl_base"].get<double>());
  // Another context: the saved file's tokens differ.
  r = run_calq("-q eval --metric kl-divergence --model " + (t / "q").string() + " --reference-logits " +
               (t / "base.lp").string() + " --chunks 2 --ctx 128",
           d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("other tokens"), std::string::npos) << r.output;
  // Truncated file.
  const std::string bytes = read_file(t / "base.lp");
  write_file(t / "cut.lp", bytes.substr(0, bytes.size() / 2));
  r = run_calq("-q eval --metric kl-divergence --model " + (t / "q").string() + " --reference-logits " +
               (t / "cut.lp").string() + " --chunks 2 --ctx 256",
           d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("truncated"), std::string::npos) << r.output;
  // A reference with another vocabulary is refused.
  r = run_calq("-q eval --metric kl-divergence --model " + s.m16.string() + " --reference " +
               shared_file("data/models/stories260K-hf").string() + " --chunks 1 --ctx 64",
           d);
  EXPECT_EQ(r.rc, 1) << r.output;
  // Context beyond the model, and a text shorter than one chunk.
  r = run_calq("-q eval --model " + s.m16.string() + " --ctx 8192 --chunks 1", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--allow-long-context"), std::string::npos) << r.output;
  write_file(t / "short.txt", "Too short for a chunk.\n");
  r = run_calq("-q eval --model " + s.m16.string() + " --dataset " + (t / "short.txt").string(), d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("fewer than one chunk"), std::string::npos) << r.output;
}

TEST(CalibrateCli, StatisticsHessiansAndImatrix) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  auto r = run_calq("-q calibrate -i " + s.m16.string() + " -o " + (t / "cal").string() +
                    " --samples 4 --seq-len 128 --hessians --imatrix " + (t / "imatrix.gguf").string(),
                d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto ar = read_json(t / "cal" / "activation_ranges.json");
  const std::string q0 = "model.layers.0.self_attn.q_proj";
  ASSERT_TRUE(ar["layer_ranges"].contains(q0));
  EXPECT_EQ(ar["layer_ranges"][q0], ar["layer_ranges"]["model.layers.0.self_attn.k_proj"]);
  EXPECT_EQ(ar["detailed_stats"][q0]["tokens"], 4 * 128);
  EXPECT_EQ(ar["detailed_stats"][q0]["channel_absmax"].size(), 384u);
  EXPECT_EQ(ar["layer_ranges"].size(), 7u * 8u);  // 7 linear modules × 8 layers
  auto mm = read_json(t / "cal" / "ranges_minmax.json");
  EXPECT_EQ(mm[q0]["min"], ar["layer_ranges"][q0][0]);
  auto rep = read_json(t / "cal" / "calq_calibration_report.json");
  EXPECT_EQ(rep["calibration"]["tokens"], 4 * 128);
  EXPECT_EQ(rep["calibration"]["files"][0]["sha256"],
            "200e109bcd2b599fabcceaada7f52bbd1e7c8f9ae030b8dc59c011de039a8026");
  EXPECT_TRUE(fs::exists(t / "cal" / "hessians.safetensors"));
  calq::io::GgufReader g(t / "imatrix.gguf");
  EXPECT_EQ(g.find("general.type")->as_str(), "imatrix");
  ASSERT_NE(g.tensor("blk.7.ffn_down.weight.in_sum2"), nullptr);
  EXPECT_EQ(g.tensor("blk.7.ffn_down.weight.in_sum2")->ne[0], 1024);
}

TEST(QuantizeGptqCli, BeatsRtnAndReportsCalibration) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  auto r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "g").string() +
                    " --method gptq --format int4 --samples 8 --seq-len 256",
                d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto rep = read_json(t / "g" / "calq_report.json");
  EXPECT_EQ(rep["method"], "gptq");
  EXPECT_EQ(rep["calibration"]["tokens"], 8 * 256);
  EXPECT_EQ(rep["gptq"]["modules"].size(), 56u);
  EXPECT_GT(rep["gptq"]["modules"][0]["proxy_loss"].get<double>(), 0.0);
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "r").string() + " --format int4", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const double kld_g = eval_kld(t / "g", s.m16, d, t / "g.json"), kld_r = eval_kld(t / "r", s.m16, d, t / "r.json");
  EXPECT_LT(kld_g, 0.8 * kld_r) << "gptq " << kld_g << " rtn " << kld_r;
  // Too few calibration tokens for --min-tokens.
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "x").string() +
               " --method gptq --samples 1 --seq-len 64 --min-tokens 1000",
           d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--min-tokens"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "x"));
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "y").string() + " --damp 0.1", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--method gptq"), std::string::npos) << r.output;
}

TEST(DataCli, InspectV3AndWikitext) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  auto r = run_calq("-q data inspect --calibration bartowski-v3 --tokenizer " + s.m28.string() +
                    " --samples 128 --seq-len 512 --json " + (t / "v3.json").string(),
                d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto j = read_json(t / "v3.json");
  EXPECT_GT(j["samples"].get<int>(), 400);
  EXPECT_GT(j["tokens"].get<int>(), 80000);
  EXPECT_EQ(j["selection"]["sequences"], 128);
  int dom = 0;
  for (auto& [k, v] : j["domains"].items()) dom += v.get<int>();
  EXPECT_EQ(dom, j["samples"].get<int>());
  EXPECT_GT(j["domains"]["code"].get<int>(), 10);
  r = run_calq("-q data inspect --calibration " + s.wiki.string() + " --json " + (t / "w.json").string(), d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_GT(read_json(t / "w.json")["samples"].get<int>(), 1000);
  r = run_calq("data inspect --calibration c4", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("c4-validation.00000-of-00008.json.gz"), std::string::npos) << r.output;
}
