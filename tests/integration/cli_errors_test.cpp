// Bad input end to end: every case must fail with a clear message naming the file, tensor or
// option, exit nonzero, and leave no output directory behind.
#include <cmath>

#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "support.h"

using namespace calq_test;

namespace {

class CliErrors : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    auto r = run(calq_bin() + " generate-model --config " +
                 (source_dir() / "tests/data/configs/tiny-qwen3.json").string() + " --output " +
                 (dir_->path() / "model").string() + " --dtype fp32 -q");
    ASSERT_EQ(r.rc, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static fs::path model() { return dir_->path() / "model"; }

  // A writable copy of the model.
  fs::path copy_model(const std::string& name) {
    fs::path p = tmp_.path() / name;
    fs::copy(model(), p, fs::copy_options::recursive);
    return p;
  }
  RunResult quantize(const fs::path& in, const fs::path& out, const std::string& extra = "") {
    return run(calq_bin() + " quantize -q --input " + in.string() + " --output " + out.string() + " " + extra);
  }
  void expect_failure(const RunResult& r, const std::vector<std::string>& needles, const fs::path& out) {
    EXPECT_NE(r.rc, 0) << r.output;
    EXPECT_NE(r.rc, 2) << "internal error instead of a clear one: " << r.output;
    for (const auto& n : needles) EXPECT_NE(r.output.find(n), std::string::npos) << "missing '" << n << "' in: " << r.output;
    EXPECT_FALSE(fs::exists(out)) << "partial output left at " << out;
    for (const auto& e : fs::directory_iterator(out.parent_path()))
      EXPECT_EQ(e.path().filename().string().find("calq-tmp"), std::string::npos) << "temp dir left: " << e.path();
  }

  static TempDir* dir_;
  TempDir tmp_;
};
TempDir* CliErrors::dir_ = nullptr;

TEST_F(CliErrors, ExistingOutputNeedsOverwrite) {
  fs::path out = tmp_ / "out";
  fs::create_directory(out);
  write_file(out / "keep.txt", "x");
  auto r = quantize(model(), out);
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(out / "keep.txt"));
  auto r2 = quantize(model(), out, "--overwrite");
  EXPECT_EQ(r2.rc, 0) << r2.output;
  EXPECT_FALSE(fs::exists(out / "keep.txt"));
  EXPECT_TRUE(fs::exists(out / "config.json"));
}

TEST_F(CliErrors, TruncatedShard) {
  fs::path m = copy_model("trunc");
  fs::path f = m / "model.safetensors";
  ASSERT_TRUE(fs::exists(f));
  fs::resize_file(f, fs::file_size(f) - 100);
  expect_failure(quantize(m, tmp_ / "out"), {"model.safetensors", "truncated"}, tmp_ / "out");
}

TEST_F(CliErrors, HeaderLiesAboutOffsets) {
  fs::path m = copy_model("lies");
  fs::path f = m / "model.safetensors";
  std::string all = read_file(f);
  uint64_t n;
  std::memcpy(&n, all.data(), 8);
  std::string header = all.substr(8, n);
  // Make the first tensor claim four bytes fewer than its shape needs.
  auto j = nlohmann::json::parse(header);
  std::string victim;
  for (auto& [k, v] : j.items())
    if (k != "__metadata__" && v["data_offsets"][0] == 0) victim = k;
  ASSERT_FALSE(victim.empty());
  j[victim]["data_offsets"][1] = j[victim]["data_offsets"][1].get<uint64_t>() - 4;
  std::string nh = j.dump();
  nh.resize(n, ' ');
  ASSERT_EQ(nh.size(), n);
  write_file(f, all.substr(0, 8) + nh + all.substr(8 + n));
  expect_failure(quantize(m, tmp_ / "out"), {"model.safetensors", victim}, tmp_ / "out");
}

TEST_F(CliErrors, UnknownDtype) {
  fs::path m = copy_model("dtype");
  fs::path f = m / "model.safetensors";
  std::string all = read_file(f);
  auto pos = all.find("\"F32\"");
  ASSERT_NE(pos, std::string::npos);
  all.replace(pos, 5, "\"Q7X\"");
  write_file(f, all);
  expect_failure(quantize(m, tmp_ / "out"), {"model.safetensors", "Q7X"}, tmp_ / "out");
}

TEST_F(CliErrors, MissingShard) {
  fs::path m = tmp_ / "sharded";
  auto r = run(calq_bin() + " quantize -q --input " + model().string() + " --output " + m.string() +
               " --format int8 --max-shard-size 200KB");
  ASSERT_EQ(r.rc, 0) << r.output;
  ASSERT_TRUE(fs::exists(m / "model.safetensors.index.json"));
  fs::path victim;
  for (const auto& e : fs::directory_iterator(m))
    if (e.path().filename().string().find("-of-") != std::string::npos) victim = e.path();
  ASSERT_FALSE(victim.empty());
  fs::remove(victim);
  auto r2 = run(calq_bin() + " inspect " + m.string());
  EXPECT_NE(r2.rc, 0);
  EXPECT_NE(r2.output.find(victim.filename().string()), std::string::npos) << r2.output;
  expect_failure(quantize(m, tmp_ / "out"), {victim.filename().string()}, tmp_ / "out");
}

TEST_F(CliErrors, UnknownArchitecture) {
  fs::path m = copy_model("arch");
  auto cfg = nlohmann::json::parse(read_file(m / "config.json"));
  cfg["model_type"] = "falcon_h9";
  write_file(m / "config.json", cfg.dump());
  expect_failure(quantize(m, tmp_ / "out"), {"falcon_h9", "config.json"}, tmp_ / "out");
}

TEST_F(CliErrors, IndivisibleGroupSize) {
  fs::path m = tmp_ / "odd";
  auto cfg = nlohmann::json::parse(read_file(source_dir() / "tests/data/configs/tiny-qwen3.json"));
  cfg["intermediate_size"] = 200;
  write_file(tmp_ / "odd.json", cfg.dump());
  auto g = run(calq_bin() + " generate-model -q --config " + (tmp_ / "odd.json").string() + " --output " + m.string());
  ASSERT_EQ(g.rc, 0) << g.output;
  expect_failure(quantize(m, tmp_ / "out", "--format int4 --group-size 128"),
                 {"model.layers.0.mlp.down_proj", "200", "128", "--on-indivisible"}, tmp_ / "out");
  auto ok = quantize(m, tmp_ / "out2", "--format int4 --group-size 128 --on-indivisible keep");
  EXPECT_EQ(ok.rc, 0) << ok.output;
  auto rep = nlohmann::json::parse(read_file(tmp_ / "out2" / "calq_report.json"));
  bool found = false;
  for (auto& t : rep["tensors"])
    if (t["name"] == "model.layers.1.mlp.down_proj.weight") {
      found = true;
      EXPECT_FALSE(t.contains("format"));
      EXPECT_NE(t["reason"].get<std::string>().find("on-indivisible"), std::string::npos);
    }
  EXPECT_TRUE(found);
}

TEST_F(CliErrors, NanWeight) {
  fs::path m = copy_model("nan");
  fs::path f = m / "model.safetensors";
  std::string all = read_file(f);
  uint64_t n;
  std::memcpy(&n, all.data(), 8);
  auto j = nlohmann::json::parse(all.substr(8, n));
  std::string name = "model.layers.1.self_attn.k_proj.weight";
  ASSERT_TRUE(j.contains(name));
  uint64_t off = j[name]["data_offsets"][0].get<uint64_t>() + 4 * 77;
  float nan = std::nanf("");
  std::memcpy(all.data() + 8 + n + off, &nan, 4);
  write_file(f, all);
  expect_failure(quantize(m, tmp_ / "out"), {name, "NaN"}, tmp_ / "out");
}

TEST_F(CliErrors, FailingWrite) {
  // A file-size limit makes the shard write fail part-way, like a full disk.
  fs::path out = tmp_ / "out";
  auto r = run("bash -c 'ulimit -f 64; " + calq_bin() + " quantize -q --input " + model().string() +
               " --output " + out.string() + " --format int8'");
  expect_failure(r, {"model.safetensors"}, out);
}

TEST_F(CliErrors, BadOptions) {
  fs::path out = tmp_ / "out";
  expect_failure(quantize(model(), out, "--format int5"), {"int5"}, out);
  expect_failure(quantize(model(), out, "--format int4 --group-size 100"), {"100"}, out);
  expect_failure(quantize(model(), out, "--format nvfp4 --group-size 32"), {"nvfp4"}, out);
  expect_failure(quantize(model(), out, "--format fp4 --asymmetric"), {"asym"}, out);
  expect_failure(quantize(model(), out, "--override 'q_proj=int9'"), {"int9"}, out);
  expect_failure(quantize(model(), out, "--keep '(['"), {"--keep"}, out);
  expect_failure(quantize(tmp_ / "nope", out), {"nope"}, out);
  expect_failure(quantize(model(), out, "--method awq"), {"awq"}, out);
  // GPTQ needs calibration text, so a model without a tokenizer is refused before any work.
  expect_failure(quantize(model(), out, "--method gptq"), {"tokenizer"}, out);
  // --device: only cpu|cuda, cuda only for GPTQ, and a clear error where this calq has no CUDA.
  expect_failure(quantize(model(), out, "--device gpu"), {"--device", "gpu"}, out);
  expect_failure(quantize(model(), out, "--method rtn --device cuda"), {"--device cuda applies to --method gptq"}, out);
  if (!calq::backend::cuda_built())
    expect_failure(quantize(model(), out, "--method gptq --device cuda"),
                   {"--device cuda: this calq was built without CUDA", "--device cpu"}, out);
  // --forward-device: only cpu|cuda, only for GPTQ, and cuda needs a usable GPU like --device.
  expect_failure(quantize(model(), out, "--forward-device gpu"), {"--forward-device", "gpu"}, out);
  expect_failure(quantize(model(), out, "--method rtn --forward-device cpu"), {"--forward-device applies to --method gptq"},
                 out);
  bool gpu = true;
  try {
    calq::backend::cuda_require();
  } catch (const calq::Error&) {
    gpu = false;
  }
  if (!gpu)
    expect_failure(quantize(model(), out, "--method gptq --forward-device cuda"), {"--forward-device cuda:", "--device cpu"},
                   out);
  // --forward-precision: fp32|bf16|bf16-fast|exact, only for GPU forward passes.
  expect_failure(quantize(model(), out, "--method gptq --forward-precision fp16"), {"--forward-precision", "fp16"}, out);
  expect_failure(quantize(model(), out, "--method gptq --forward-precision bf16"),
                 {"--forward-precision applies to GPU forward passes"}, out);
  expect_failure(quantize(model(), out, "--method gptq --forward-precision bf16-fast"),
                 {"--forward-precision applies to GPU forward passes"}, out);
  expect_failure(quantize(model(), out, "--method gptq --forward-precision exact"),
                 {"--forward-precision applies to GPU forward passes"}, out);
  expect_failure(quantize(model(), out, "--method gptq --gpu-layers 2"), {"--gpu-layers applies to GPU forward passes"},
                 out);
  // --devices: only with --device cuda; ordinals only, each a visible GPU.
  expect_failure(quantize(model(), out, "--method gptq --devices 0,1"), {"--devices applies to --device cuda"}, out);
  if (gpu) {
    expect_failure(quantize(model(), out, "--method gptq --device cuda --devices 0,x"), {"--devices '0,x'", "0,1"}, out);
    expect_failure(quantize(model(), out, "--method gptq --device cuda --devices 0,"), {"--devices '0,'"}, out);
    expect_failure(quantize(model(), out, "--method gptq --device cuda --devices 999"), {"GPU 999 does not exist"}, out);
  } else {
    expect_failure(quantize(model(), out, "--method gptq --device cuda --devices 0"), {"--device cuda", "--device cpu"},
                   out);
  }
  // --hessian-precision: only fp32|tf32|bf16|exact, only for GPTQ, and tf32/bf16/exact only where the
  // Hessians are on the GPU (--device cuda with the forward passes on the GPU).
  expect_failure(quantize(model(), out, "--method gptq --hessian-precision fp16"),
                 {"--hessian-precision must be fp32, tf32, bf16 or exact, got 'fp16'"}, out);
  expect_failure(quantize(model(), out, "--method rtn --hessian-precision fp32"),
                 {"--hessian-precision applies to --method gptq and mr-gptq"}, out);
  for (const char* p : {"tf32", "bf16", "exact"}) {
    expect_failure(quantize(model(), out, std::string("--method gptq --hessian-precision ") + p),
                   {std::string("--hessian-precision ") + p + ": Hessians accumulate on the GPU only with --device cuda",
                    "--device cpu"},
                   out);
    expect_failure(quantize(model(), out, std::string("--method mr-gptq --device cpu --hessian-precision ") + p),
                   {std::string("--hessian-precision ") + p + ":", "--device cpu"}, out);
    expect_failure(
        quantize(model(), out, std::string("--method gptq --device cuda --forward-device cpu --hessian-precision ") + p),
        {std::string("--hessian-precision ") + p + ": with --forward-device cpu the Hessians accumulate on the host"},
        out);
  }
}

}  // namespace

namespace {

// calq eval --device: bad values, and where this calq cannot run on a GPU (no CUDA build, or no GPU
// visible, as on CI) the clear error before any work.
TEST_F(CliErrors, EvalDevice) {
  const fs::path none = tmp_ / "none";
  auto eval = [&](const std::string& extra) {
    return run(calq_bin() + " eval -q --offline --model " + model().string() + " --dataset /nonexistent " + extra);
  };
  expect_failure(eval("--device gpu"), {"--device must be cpu or cuda, got 'gpu'"}, none);
  expect_failure(eval("--device cuda --gpu-precision fp16"), {"--gpu-precision must be fp32, bf16, bf16-fast or exact, got 'fp16'"},
                 none);
  expect_failure(eval("--gpu-precision bf16"), {"--gpu-precision bf16 applies to --device cuda only"}, none);
  expect_failure(eval("--gpu-precision exact"), {"--gpu-precision exact applies to --device cuda only"}, none);
  expect_failure(eval("--gpu-layers 1"), {"--gpu-layers applies to --device cuda only"}, none);
  std::string why;
  try {
    calq::backend::cuda_require();
  } catch (const calq::Error& e) {
    why = e.what();
  }
  if (why.empty()) GTEST_SKIP() << "a GPU is visible: tests/gpu cover --device cuda";
  if (!calq::backend::cuda_built())
    expect_failure(eval("--device cuda"), {"--device cuda: this calq was built without CUDA", "--device cpu"}, none);
  else
    expect_failure(eval("--device cuda --gpu-precision bf16"), {"--device cuda: no CUDA GPU is visible", "--device cpu"},
                   none);
}

}  // namespace

namespace {

// calq re-executes itself with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES (huge pages for its
// large host allocations; docs/cli.md "Memory"): the debug log shows what the process runs with.
TEST_F(CliErrors, HugePageTunableIsAddedOnce) {
  const std::string cmd = calq_bin() + " -v inspect " + model().string();
  auto tunables = [](const std::string& out) {
    const size_t p = out.find("GLIBC_TUNABLES=");
    return p == std::string::npos ? std::string("(none)") : out.substr(p + 15, out.find('\n', p) - p - 15);
  };
  auto r = run("env -u GLIBC_TUNABLES -u CALQ_THP " + cmd);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(tunables(r.output), "glibc.malloc.hugetlb=1") << r.output;
  r = run("env -u CALQ_THP GLIBC_TUNABLES=glibc.malloc.check=0 " + cmd);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(tunables(r.output), "glibc.malloc.check=0:glibc.malloc.hugetlb=1") << r.output;
  r = run("env -u CALQ_THP GLIBC_TUNABLES=glibc.malloc.hugetlb=0 " + cmd);  // the user's choice stays
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(tunables(r.output), "glibc.malloc.hugetlb=0") << r.output;
  r = run("env -u GLIBC_TUNABLES CALQ_THP=0 " + cmd);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(tunables(r.output), "(none)") << r.output;
}

}  // namespace
