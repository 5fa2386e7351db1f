// calq quantize + inspect end to end, for every format, on a generated model and (when ../shared
// is present) on bench-qwen3-16m, bench-qwen3-28m and stories260K-hf. The output files are read
// with the test's own safetensors reader and decoded by tests/decode_spec.h, a decoder written
// from docs/format.md independently of calq's unpack(), and compared with the original weights.
#include <cmath>

#include "decode_spec.h"
#include "support.h"

using namespace calq_test;

namespace {

struct Case {
  std::string format;   // CLI --format
  std::string extra;    // more CLI options
  std::string label;
};

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {"int2", "--group-size 64", "int2-g64"},         {"int3", "--group-size 128", "int3-g128"},
      {"int4", "--group-size 128", "int4-g128"},       {"int4", "--group-size 32 --asymmetric", "int4a-g32"},
      {"int8", "--group-size -1", "int8-pc"},          {"int8", "--group-size 128 --asymmetric", "int8a-g128"},
      {"int3", "--group-size 64 --asymmetric", "int3a-g64"},
      {"fp4", "", "fp4-g128"},                         {"nvfp4", "", "nvfp4"},
      {"mxfp4", "", "mxfp4"},                          {"nf4", "--group-size 64", "nf4-g64"},
      {"fp8", "", "fp8-pc"},                           {"int4", "--group-size 128 --clip-search", "int4-g128-clip"},
  };
  return c;
}

// Largest error a correctly decoded element may have, relative to the group's scale, plus a
// relative slack for the fp32 rounding of the decoded value.
double max_err(const DecodedModule& d, int64_t r, int64_t c) {
  double s = d.scale_at(r, c);
  return d.max_step_multiple * s * (1 + 1e-6) + 1e-30;
}

void check_output(const fs::path& input, const fs::path& out, const std::string& label) {
  auto orig = read_model_tensors(input);
  auto got = read_model_tensors(out);
  auto cfg = nlohmann::json::parse(read_file(out / "config.json"));
  ASSERT_TRUE(cfg.contains("quantization_config")) << label;
  const auto& qc = cfg["quantization_config"];
  auto rep = nlohmann::json::parse(read_file(out / "calq_report.json"));
  size_t nq = 0;
  for (const auto& t : rep["tensors"]) {
    std::string name = t["name"];
    ASSERT_TRUE(orig.count(name)) << name;
    if (!t.contains("format")) {
      // Kept tensors are byte-identical.
      ASSERT_TRUE(got.count(name)) << label << ": kept tensor missing: " << name;
      EXPECT_EQ(got[name].bytes, orig[name].bytes) << name;
      EXPECT_EQ(got[name].dtype, orig[name].dtype) << name;
      continue;
    }
    ++nq;
    std::string module = name.substr(0, name.size() - 7);
    DecodedModule d = decode_module(got, module, t["format"], t["symmetric"], t["group_size"], qc);
    if (label.find("clip") != std::string::npos) {
      // A clip factor down to 0.5 may clip the group's extremes by up to half their magnitude,
      // i.e. up to qmax steps (int) or 6 scale units (E2M1).
      std::string f = t["format"];
      d.max_step_multiple += f.rfind("int", 0) == 0 ? std::ldexp(1.0, f[3] - '0' - 1) : 6.0;
    }
    auto w = raw_to_float(orig[name]);
    ASSERT_EQ(static_cast<int64_t>(w.size()), d.rows * d.cols) << name;
    if (t.value("conv1d", false)) {
      // GPT-2 Conv1D: HF stores [in, out]; calq packs the [out, in] transpose.
      ASSERT_EQ(orig[name].shape, (std::vector<int64_t>{d.cols, d.rows})) << name;
      std::vector<float> tw(w.size());
      for (int64_t i = 0; i < d.cols; ++i)
        for (int64_t o = 0; o < d.rows; ++o) tw[o * d.cols + i] = w[i * d.rows + o];
      w = tw;
    }
    double worst = 0;
    for (int64_t r = 0; r < d.rows; ++r)
      for (int64_t c = 0; c < d.cols; ++c) {
        double e = std::fabs(static_cast<double>(w[r * d.cols + c]) - d.values[r * d.cols + c]);
        worst = std::max(worst, e / max_err(d, r, c));
        ASSERT_LE(e, max_err(d, r, c)) << label << " " << name << " [" << r << "," << c << "] w=" << w[r * d.cols + c]
                                       << " deq=" << d.values[r * d.cols + c] << " scale=" << d.scale_at(r, c);
      }
    if (t["format"] == "fp8")
      EXPECT_EQ(got[name].dtype, "F8_E4M3") << name;  // float-quantized keeps the name
    else
      EXPECT_FALSE(got.count(name)) << "quantized module still stores " << name;
  }
  EXPECT_GT(nq, 0u) << label;
  auto ins = run(calq_bin() + " inspect --json " + out.string());
  ASSERT_EQ(ins.rc, 0) << ins.output;
  auto j = nlohmann::json::parse(ins.output);
  EXPECT_TRUE(j["quantized"].get<bool>());
  EXPECT_EQ(j["quantized_tensors"].size(), nq);
  EXPECT_GT(j["bits_per_weight_quantized"].get<double>(), 1.9);
  auto in_ins = nlohmann::json::parse(run(calq_bin() + " inspect --json " + input.string()).output);
  EXPECT_EQ(j["parameters"], in_ins["parameters"]) << "parameter count must survive quantization";
}

void run_all(const fs::path& model, const std::string& model_label, const std::string& common) {
  TempDir tmp;
  for (const auto& c : cases()) {
    SCOPED_TRACE(model_label + " " + c.label);
    fs::path out = tmp / c.label;
    auto r = run(calq_bin() + " -q quantize --input " + model.string() + " --output " + out.string() +
                 " --format " + c.format + " " + c.extra + " " + common);
    ASSERT_EQ(r.rc, 0) << r.output;
    check_output(model, out, model_label + " " + c.label);
  }
}

TEST(QuantizeCli, GeneratedModelEveryFormat) {
  TempDir tmp;
  fs::path m = tmp / "model";
  auto g = run(calq_bin() + " -q generate-model --config " +
               (source_dir() / "tests/data/configs/tiny-qwen3.json").string() + " --output " + m.string() +
               " --outlier-rate 0.02 --outlier-scale 30");
  ASSERT_EQ(g.rc, 0) << g.output;
  run_all(m, "generated", "");
}

TEST(QuantizeCli, GeneratedGpt2Conv1D) {
  TempDir tmp;
  fs::path m = tmp / "gpt2";
  auto g = run(calq_bin() + " -q generate-model --config " +
               (source_dir() / "tests/data/configs/tiny-gpt2.json").string() + " --output " + m.string());
  ASSERT_EQ(g.rc, 0) << g.output;
  run_all(m, "gpt2", "");
  auto cfg = nlohmann::json::parse(read_file(tmp / "gpt2"/ "config.json"));
  EXPECT_EQ(cfg["model_type"], "gpt2");
}

TEST(QuantizeCli, BenchQwen3_16m) {
  fs::path m = shared_file("data/models/bench-qwen3-16m");
  if (m.empty()) GTEST_SKIP() << "../shared/data/models/bench-qwen3-16m not present";
  run_all(m, "bench-qwen3-16m", "");
}

TEST(QuantizeCli, BenchQwen3_28m) {
  fs::path m = shared_file("data/models/bench-qwen3-28m");
  if (m.empty()) GTEST_SKIP() << "../shared/data/models/bench-qwen3-28m not present";
  run_all(m, "bench-qwen3-28m", "");
}

TEST(QuantizeCli, Stories260K) {
  // hidden 64, intermediate 172: down_proj (in 172) fits no group size, so it is kept explicitly.
  fs::path m = shared_file("data/models/stories260K-hf");
  if (m.empty()) GTEST_SKIP() << "../shared/data/models/stories260K-hf not present";
  TempDir tmp;
  auto r = run(calq_bin() + " -q quantize --input " + m.string() + " --output " + (tmp / "x").string() +
               " --format int4 --group-size 32");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find("172"), std::string::npos) << r.output;
  for (const auto& c : cases()) {
    SCOPED_TRACE("stories260K " + c.label);
    std::string extra = c.extra;
    for (const char* g : {"--group-size 128", "--group-size 64"}) {
      auto p = extra.find(g);
      if (p != std::string::npos) extra.replace(p, std::string(g).size(), "--group-size 32");
    }
    fs::path out = tmp / c.label;
    auto q = run(calq_bin() + " -q quantize --input " + m.string() + " --output " + out.string() + " --format " +
                 c.format + " " + (c.format == "fp4" ? "--group-size 32 " : "") + extra + " --on-indivisible keep");
    ASSERT_EQ(q.rc, 0) << q.output;
    check_output(m, out, "stories260K " + c.label);
  }
}

TEST(QuantizeCli, DeterministicBytes) {
  fs::path m = shared_file("data/models/bench-qwen3-16m");
  TempDir tmp;
  if (m.empty()) {
    m = tmp / "model";
    ASSERT_EQ(run(calq_bin() + " -q generate-model --config " +
                  (source_dir() / "tests/data/configs/tiny-qwen3.json").string() + " --output " + m.string()).rc, 0);
  }
  for (const char* f : {"nvfp4", "int4 --clip-search"}) {
    auto a = run(calq_bin() + " -q --threads 1 quantize --input " + m.string() + " --output " + (tmp / "a").string() +
                 " --format " + f + " --overwrite");
    auto b = run(calq_bin() + " -q --threads 2 quantize --input " + m.string() + " --output " + (tmp / "b").string() +
                 " --format " + f + " --overwrite");
    ASSERT_EQ(a.rc, 0) << a.output;
    ASSERT_EQ(b.rc, 0) << b.output;
    for (const auto& e : fs::directory_iterator(tmp / "a"))
      if (e.path().extension() == ".safetensors")
        EXPECT_EQ(read_file(e.path()), read_file(tmp / "b" / e.path().filename())) << f << " " << e.path();
  }
}

TEST(QuantizeCli, DryRunWritesNothingAndTokenizerIsCopied) {
  fs::path m = shared_file("data/models/bench-qwen3-16m");
  if (m.empty()) GTEST_SKIP() << "../shared/data/models/bench-qwen3-16m not present";
  TempDir tmp;
  auto d = run(calq_bin() + " quantize --input " + m.string() + " --output " + (tmp / "d").string() + " --dry-run");
  ASSERT_EQ(d.rc, 0) << d.output;
  EXPECT_FALSE(fs::exists(tmp / "d"));
  EXPECT_NE(d.output.find("model.layers.0.mlp.down_proj.weight"), std::string::npos);
  auto q = run(calq_bin() + " -q quantize --input " + m.string() + " --output " + (tmp / "q").string() +
               " --mixed-precision quality --keep 'layers\\.0\\.' --validate");
  ASSERT_EQ(q.rc, 0) << q.output;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
    EXPECT_EQ(read_file(m / f), read_file(tmp / "q" / f)) << f;
  auto rep = nlohmann::json::parse(read_file(tmp / "q" / "calq_report.json"));
  for (const auto& t : rep["tensors"]) {
    std::string n = t["name"];
    if (n.find("layers.0.") != std::string::npos) EXPECT_FALSE(t.contains("format")) << n;
    if (n.find("layers.1.self_attn.q_proj.weight") != std::string::npos) {
      EXPECT_EQ(t["group_size"], 32);
      EXPECT_TRUE(t.contains("error"));
      EXPECT_GT(t["error"]["rmse"].get<double>(), 0);
    }
  }
}

}  // namespace
