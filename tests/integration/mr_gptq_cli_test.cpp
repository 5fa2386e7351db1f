// calq quantize --method mr-gptq / --method rtn --hadamard-block end to end: rotation metadata
// and sign vectors in the output (checked against docs/format.md with the test's own reader and
// its own SplitMix64), the report's kurtosis decisions, eval and GGUF export of rotated outputs,
// and the errors of the issue (block not dividing, kurtosis without calibration, missing signs).
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "calq/export/native.h"
#include "calq/io/gguf.h"
#include "support.h"

using namespace calq_test;
using nlohmann::json;

namespace {

// docs/format.md: sign i is −1 when the top bit of the i-th SplitMix64 output (state starting at
// the seed) is set.
std::vector<float> spec_signs(int64_t n, uint64_t seed) {
  std::vector<float> s;
  uint64_t st = seed;
  for (int64_t i = 0; i < n; ++i) {
    st += 0x9e3779b97f4a7c15ull;
    uint64_t z = st;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    s.push_back((z >> 63) ? -1.f : 1.f);
  }
  return s;
}

fs::path generated(const TempDir& t) {
  fs::path m = t / "model";
  auto g = run(calq_bin() + " -q generate-model --config " +
               (source_dir() / "tests/data/configs/tiny-qwen3.json").string() + " --output " + m.string() +
               " --dtype fp32 --outlier-rate 0.02 --outlier-scale 30");
  EXPECT_EQ(g.rc, 0) << g.output;
  return m;
}

double rel_fro(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}


}  // namespace

TEST(RotationCli, RtnWithRotationRecordsSignsAndUnrotates) {
  TempDir t;
  const fs::path m = generated(t);
  for (const std::string block : {"64", "full"}) {
    SCOPED_TRACE(block);
    const fs::path out = t / ("r" + block);
    auto r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + out.string() +
                 " --format int8 --group-size -1 --hadamard-block " + block + " --hadamard-seed 5");
    ASSERT_EQ(r.rc, 0) << r.output;
    auto cfg = read_json(out / "config.json");
    const auto& rots = cfg["quantization_config"]["calq"]["rotations"];
    auto rep = read_json(out / "calq_report.json");
    auto tensors = read_model_tensors(out);
    auto orig = calq::native::Model::open(m);
    auto q = calq::native::Model::open(out);
    size_t nq = 0;
    for (const auto& tr : rep["tensors"]) {
      if (!tr.contains("format")) continue;
      ++nq;
      const std::string mod = tr["name"].get<std::string>().substr(0, tr["name"].get<std::string>().size() - 7);
      ASSERT_TRUE(rots.contains(mod)) << mod;
      const int64_t in = tr["shape"][1];
      EXPECT_EQ(rots[mod]["type"], "hadamard");
      EXPECT_EQ(rots[mod]["seed"], 5);
      if (block == "full") EXPECT_EQ(rots[mod]["block"], "full");
      else EXPECT_EQ(rots[mod]["block"], 64);
      EXPECT_EQ(tr["rotation"], rots[mod]);
      // The sign tensor, read with the test's reader, is the documented SplitMix64 sequence.
      const auto& st = tensors.at(mod + ".rotation_signs");
      EXPECT_EQ(st.dtype, "F32");
      EXPECT_EQ(raw_to_float(st), spec_signs(in, 5)) << mod;
      // Stored weights are in the rotated basis (far from W); unrotated, within int8 error of W.
      auto w = orig.load_f32(tr["name"]);
      EXPECT_GT(rel_fro(q.load_f32(tr["name"]), w), 0.5) << mod;
      EXPECT_LT(rel_fro(q.load_f32_unrotated(tr["name"]), w), 0.02) << mod;
    }
    EXPECT_EQ(rots.size(), nq);
    EXPECT_GT(nq, 0u);
    auto ins = run(calq_bin() + " inspect " + out.string());
    ASSERT_EQ(ins.rc, 0) << ins.output;
    EXPECT_NE(ins.output.find(block == "full" ? "hadamard full 768 seed 5" : "hadamard b64 seed 5"),
              std::string::npos)
        << ins.output;
  }
}

// nvfp4: q/k/v (and gate/up) share one fp32 tensor scale, computed from the rotated weights.
TEST(RotationCli, Nvfp4FusedGlobalScaleFromRotatedWeights) {
  TempDir t;
  const fs::path m = generated(t);
  const fs::path out = t / "nv";
  auto r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + out.string() +
               " --format nvfp4 --hadamard-block 32 --hadamard-seed 11");
  ASSERT_EQ(r.rc, 0) << r.output;
  auto tensors = read_model_tensors(out);
  auto orig = calq::native::Model::open(m);
  for (const std::vector<std::string>& group :
       {std::vector<std::string>{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
        std::vector<std::string>{"mlp.gate_proj", "mlp.up_proj"}}) {
    float amax_rot = 0, amax = 0;
    std::vector<float> g;
    for (const auto& mm : group) {
      const std::string mod = "model.layers.1." + mm;
      auto w = orig.load_f32(mod + ".weight");
      const int64_t in = orig.entry(mod + ".weight").shape[1];
      for (float v : w) amax = std::max(amax, std::fabs(v));
      // W·R from the documented definition: signs, then 32-wide Walsh–Hadamard blocks.
      const auto s = spec_signs(in, 11);
      for (size_t row = 0; row < w.size() / in; ++row)
        for (int64_t b0 = 0; b0 < in; b0 += 32)
          for (int64_t j = 0; j < 32; ++j) {
            double acc = 0;
            for (int64_t k = 0; k < 32; ++k)
              acc += w[row * in + b0 + k] * s[b0 + k] * ((__builtin_popcountll(j & k) & 1) ? -1.0 : 1.0);
            amax_rot = std::max(amax_rot, static_cast<float>(std::fabs(acc / std::sqrt(32.0))));
          }
      g.push_back(raw_to_float(tensors.at(mod + ".weight_global_scale"))[0]);
    }
    for (float x : g) EXPECT_EQ(x, g[0]);
    EXPECT_NEAR(g[0], 2688.f / amax_rot, 1e-5 * g[0]);
    EXPECT_GT(std::fabs(g[0] - 2688.f / amax), 1e-3 * g[0]);  // not the unrotated weights' scale
  }
}

TEST(RotationCli, BadInput) {
  TempDir t;
  const fs::path m = generated(t);
  // 512 divides no input width of tiny-qwen3 (256, 768): every module is named with its sizes.
  auto r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + (t / "x").string() +
               " --format nvfp4 --hadamard-block 512");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("model.layers.0.mlp.down_proj: --hadamard-block 512 does not divide its input width 768"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("--hadamard-block full"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "x"));
  r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + (t / "x").string() +
          " --format nvfp4 --hadamard-block 96");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("power of two"), std::string::npos) << r.output;
  // A kurtosis threshold needs calibration data.
  r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + (t / "x").string() +
          " --format nvfp4 --hadamard-block 64 --hadamard-kurtosis-threshold 5");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("calibration"), std::string::npos) << r.output;
  r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + (t / "x").string() +
          " --method gptq --format nvfp4 --hadamard-block 64");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--method mr-gptq"), std::string::npos) << r.output;
  // A rotation recorded without its sign vector: the model does not load.
  const fs::path out = t / "ok";
  r = run(calq_bin() + " -q quantize -i " + m.string() + " -o " + out.string() +
          " --format int8 --group-size -1 --hadamard-block 64");
  ASSERT_EQ(r.rc, 0) << r.output;
  auto cfg = read_json(out / "config.json");
  cfg["quantization_config"]["calq"]["rotations"]["model.layers.0.mlp.down_proj"]["signs"] = "nope.rotation_signs";
  write_file(out / "config.json", cfg.dump(1));
  r = run(calq_bin() + " inspect " + out.string());
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("sign vector nope.rotation_signs is missing"), std::string::npos) << r.output;
}

TEST(MrGptqCli, KurtosisGateEvalAndGgufExport) {
  SharedData s;
  if (!s.ok) GTEST_SKIP() << "../shared absent";
  TempDir t;
  auto d = calq_data_dir(t, s);
  const std::string cal = " --samples 8 --seq-len 256";
  auto r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "mr").string() +
                        " --method mr-gptq --format nvfp4 --hadamard-block 64 --hadamard-seed 3" + cal,
                    d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto rep = read_json(t / "mr" / "calq_report.json");
  EXPECT_EQ(rep["method"], "mr-gptq");
  ASSERT_EQ(rep["gptq"]["modules"].size(), 56u);
  std::vector<double> ks;
  for (const auto& mj : rep["gptq"]["modules"]) {
    EXPECT_TRUE(mj["rotated"].get<bool>());
    EXPECT_GT(mj["kurtosis"].get<double>(), 1.0);  // β₂ ≥ 1 for any distribution
    ks.push_back(mj["kurtosis"].get<double>());
  }
  EXPECT_EQ(read_json(t / "mr" / "config.json")["quantization_config"]["calq"]["rotations"].size(), 56u);
  // Gate at the median kurtosis: exactly the modules above it are rotated, and only those carry
  // sign vectors.
  std::vector<double> sorted = ks;
  std::sort(sorted.begin(), sorted.end());
  const double K = sorted[sorted.size() / 2];
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "gate").string() +
                   " --method mr-gptq --format nvfp4 --hadamard-block 64 --hadamard-seed 3 "
                   "--hadamard-kurtosis-threshold " + fmt::format("{:.17g}", K) + cal,
               d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto grep = read_json(t / "gate" / "calq_report.json");
  auto grots = read_json(t / "gate" / "config.json")["quantization_config"]["calq"]["rotations"];
  size_t nrot = 0;
  for (const auto& mj : grep["gptq"]["modules"]) {
    const bool want = mj["kurtosis"].get<double>() > K;
    EXPECT_EQ(mj["rotated"].get<bool>(), want) << mj.dump();
    EXPECT_EQ(grots.contains(mj["module"].get<std::string>()), want) << mj.dump();
    nrot += want;
  }
  EXPECT_GT(nrot, 0u);
  EXPECT_LT(nrot, 56u);
  // eval of the rotated output against the base and RTN nvfp4.
  r = run_calq("-q quantize -i " + s.m16.string() + " -o " + (t / "rtn").string() + " --format nvfp4", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const double kld_mr = eval_kld(t / "mr", s.m16, d, t / "mr.json"), kld_r = eval_kld(t / "rtn", s.m16, d, t / "rtn.json");
  EXPECT_LT(kld_mr, 0.8 * kld_r) << "mr-gptq " << kld_mr << " rtn " << kld_r;
  // GGUF export dequantizes rotated modules back to the original basis (Ŵ = Q·Rᵀ).
  r = run_calq("-q export -i " + (t / "mr").string() + " -o " + (t / "mr.gguf").string() + " --outtype f32", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  calq::io::GgufReader g(t / "mr.gguf");
  const auto* gt = g.tensor("blk.2.ffn_down.weight");
  ASSERT_NE(gt, nullptr);
  auto b = g.read(*gt);
  std::vector<float> got(b.size() / 4);
  std::memcpy(got.data(), b.data(), b.size());
  auto base = calq::native::Model::open(s.m16);
  auto w = base.load_f32("model.layers.2.mlp.down_proj.weight");
  ASSERT_EQ(got.size(), w.size());
  EXPECT_LT(rel_fro(got, w), 0.25);  // nvfp4 error; the rotated basis would be ≈ 1.4
}
