// calq quantize --device cuda end to end (ctest label gpu): a real CUDA error in the middle of a
// run leaves a valid layer checkpoint, and --resume continues to the same bytes as a run that
// never failed. Needs bench-qwen3-16m and the v3 calibration text (../shared, or
// CALQ_TEST_SHARED_DIR on a GPU machine) and a usable GPU; skips otherwise.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <set>

#include "gpu/gpu_support.h"
#include "support.h"

using namespace calq_test;

namespace {

// What these tests read: bench-qwen3-16m, the v3 calibration text, WikiText-2 test (not
// bench-qwen3-28m, which SharedData::ok also wants).
bool have_data(const SharedData& s) { return !s.m16.empty() && !s.v3.empty() && !s.wiki.empty(); }

// A usable GPU and the data, a temporary folder t, the CALQ_DATA folder d, and " -i MODEL" (in).
class GpuCli : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_GPU();
    if (!have_data(s)) GTEST_SKIP() << "../shared absent (set CALQ_TEST_SHARED_DIR)";
    d = calq_data_dir(t, s);
    in = " -i " + s.m16.string();
  }
  SharedData s;
  TempDir t;
  fs::path d;
  std::string in;
};

const std::string kGptq = " --method gptq --format int4 --samples 6 --seq-len 128 --calib-batch 2 --device cuda";

TEST_F(GpuCli, CudaErrorMidRunKeepsCheckpointAndResumes) {
  auto r = run_calq("-q quantize" + in + " -o " + (t / "full").string() + kGptq, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto rep = read_json(t / "full" / "calq_report.json");
  const size_t modules = rep["gptq"]["modules"].size();
  ASSERT_EQ(modules % 8, 0u) << "bench-qwen3-16m has 8 layers";
  const size_t per_layer = modules / 8;

  // GPTQ call number 2·per_layer + 3 (layer 2's fourth module) fails with a CUDA error (a launch
  // with 4096 threads per block, which CUDA 13 reports as cudaErrorInvalidValue).
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq, d,
               "CALQ_TEST_CUDA_FAULT=" + std::to_string(2 * per_layer + 3));
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("CUDA error in GPTQ in-block kernel"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("(cudaError"), std::string::npos) << r.output;  // the runtime's error name
  EXPECT_NE(r.output.find("2 of 8 layers are checkpointed"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--resume to continue from layer 2"), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(t / "res.calq-work" / "state.json"));
  EXPECT_EQ(read_json(t / "res.calq-work" / "state.json")["completed_layers"], 2);
  EXPECT_FALSE(fs::exists(t / "res"));

  // A fresh process resumes from layer 2 on the GPU and writes what the uninterrupted run wrote.
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + kGptq + " --resume", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_files(t / "full", t / "res");
  EXPECT_EQ(read_json(t / "res" / "calq_report.json")["gptq"]["modules"].size(), modules);
  EXPECT_FALSE(fs::exists(t / "res.calq-work"));
}

// --devices 0,0: two GPTQ workers on one GPU (what several GPUs do, on the one a test machine
// has): the same bytes as one worker, for GPTQ (dense groups in parallel) and MR-GPTQ (rotations
// on the workers' device too).
TEST_F(GpuCli, TwoWorkersGiveTheSameBytes) {
  for (const std::string method : {"gptq --format int4", "mr-gptq --format nvfp4"}) {
    const std::string args =
        " --method " + method + " --samples 6 --seq-len 128 --calib-batch 2 --device cuda --overwrite";
    auto r = run_calq("-q quantize" + in + " -o " + (t / "one").string() + args, d);
    ASSERT_EQ(r.rc, 0) << r.output;
    r = run_calq("-q quantize" + in + " -o " + (t / "two").string() + args + " --devices 0,0", d);
    ASSERT_EQ(r.rc, 0) << r.output;
    expect_same_files(t / "one", t / "two");
  }
  auto r = run_calq("-q quantize" + in + " -o " + (t / "bad").string() + kGptq + " --devices 0,99", d);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("GPU 99 does not exist"), std::string::npos) << r.output;
}

// --devices 0,1 on a machine with two GPUs (skipped with one): the bytes of a one-GPU run, for
// GPTQ (dense groups spread over the workers) and MR-GPTQ (rotations on each worker's GPU), and
// both GPUs did quantize modules (calq_report.json names each module's GPU).
TEST_F(GpuCli, TwoGpusGiveTheSameBytes) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 2) GTEST_SKIP() << count << " GPU(s) visible, 2 needed";
  for (const std::string method : {"gptq --format int4", "mr-gptq --format nvfp4"}) {
    const std::string args =
        " --method " + method + " --samples 6 --seq-len 128 --calib-batch 2 --device cuda --overwrite";
    auto r = run_calq("-q quantize" + in + " -o " + (t / "one").string() + args, d);
    ASSERT_EQ(r.rc, 0) << r.output;
    r = run_calq("-q quantize" + in + " -o " + (t / "two").string() + args + " --devices 0,1", d);
    ASSERT_EQ(r.rc, 0) << r.output;
    expect_same_files(t / "one", t / "two");
    std::set<int> used;
    for (const auto& m : read_json(t / "two" / "calq_report.json")["gptq"]["modules"]) used.insert(m["gpu"].get<int>());
    EXPECT_EQ(used, (std::set<int>{0, 1})) << method;
  }
}

// --forward-precision bf16 (tensor-core forward passes in calibration): a valid run whose quality
// is close to the fp32 forward pass's (KLD within 10 % on 3 chunks of this small setting; 1.068×
// measured on the H200 — a sanity check, not a quality claim).
TEST_F(GpuCli, Bf16ForwardPassKeepsQuality) {
  auto r = run_calq("-q quantize" + in + " -o " + (t / "f32").string() + kGptq, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "b16").string() + kGptq + " --forward-precision bf16", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "b16" / "calq_report.json")["gptq"]["forward_precision"], "bf16");
  const double k32 = eval_kld(t / "f32", s.m16, d, t / "f32.json");
  const double k16 = eval_kld(t / "b16", s.m16, d, t / "b16.json");
  std::printf("KLD with fp32 forward passes %.6f, bf16 %.6f (ratio %.4f)\n", k32, k16, k16 / k32);
  EXPECT_LT(k16, 1.10 * k32);
  EXPECT_GT(k16, 0.90 * k32);
  // bf16-fast (one bf16 term per product input): the same sanity bound.
  r = run_calq("-q quantize" + in + " -o " + (t / "b16f").string() + kGptq + " --forward-precision bf16-fast", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "b16f" / "calq_report.json")["gptq"]["forward_precision"], "bf16-fast");
  const double kf = eval_kld(t / "b16f", s.m16, d, t / "b16f.json");
  std::printf("KLD with bf16-fast forward passes %.6f (ratio to fp32 %.4f)\n", kf, kf / k32);
  EXPECT_LT(kf, 1.10 * k32);
  EXPECT_GT(kf, 0.90 * k32);
}

// --gpu-layers: how many decoder layers' weights the GPU holds (default 1) does not change the
// output, and one layer at a time holds less GPU memory than the whole model.
TEST_F(GpuCli, GpuLayersDoNotChangeTheOutput) {
  const std::string args = kGptq + " --forward-precision bf16";
  auto r = run_calq("-q quantize" + in + " -o " + (t / "one").string() + args, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "all").string() + args + " --gpu-layers 0", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "two").string() + args + " --gpu-layers 2", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_files(t / "one", t / "all");
  expect_same_files(t / "one", t / "two");
  const auto one = read_json(t / "one" / "calq_report.json")["gpu"]["peak_bytes"].get<int64_t>();
  const auto all = read_json(t / "all" / "calq_report.json")["gpu"]["peak_bytes"].get<int64_t>();
  std::printf("peak GPU bytes: one layer at a time %lld, every layer %lld\n", static_cast<long long>(one),
              static_cast<long long>(all));
  EXPECT_LT(one, all);
}

// --forward-precision exact: the GPU's forward passes and (by default then) its Hessians in the
// CPU's order of operations, so the written model is the --device cpu run's, byte for byte, for
// GPTQ int4 (act-order) and MR-GPTQ nvfp4; the report names both precisions. And calq eval
// --gpu-precision exact gives the CPU's perplexity to the last digit.
TEST_F(GpuCli, ExactForwardGivesTheCpuBytes) {
  for (const std::string method : {"gptq --format int4 --act-order", "mr-gptq --format nvfp4"}) {
    const std::string args = " --method " + method + " --samples 6 --seq-len 128 --calib-batch 2 --overwrite";
    auto r = run_calq("-q quantize" + in + " -o " + (t / "cpu").string() + args + " --device cpu", d);
    ASSERT_EQ(r.rc, 0) << r.output;
    r = run_calq("-q quantize" + in + " -o " + (t / "gpu").string() + args + " --device cuda --forward-precision exact",
                 d);
    ASSERT_EQ(r.rc, 0) << r.output;
    const auto rep = read_json(t / "gpu" / "calq_report.json")["gptq"];
    EXPECT_EQ(rep["forward_precision"], "exact");
    EXPECT_EQ(rep["hessian_precision"], "exact");
    expect_same_files(t / "cpu", t / "gpu");
  }
  const auto ppl = [&](const std::string& device) {
    const fs::path json = t / ("ppl_" + device + ".json");
    const auto r = run_calq("-q eval --metric perplexity --model " + s.m16.string() + " --chunks 4 --json " +
                                json.string() + " --device " + device +
                                (device == "cuda" ? " --gpu-precision exact" : ""),
                            d);
    EXPECT_EQ(r.rc, 0) << r.output;
    return r.rc == 0 ? read_json(json)["ppl"].get<double>() : std::nan("");
  };
  const double p_cpu = ppl("cpu"), p_gpu = ppl("cuda");
  std::printf("perplexity, 4 chunks: cpu %.17g, cuda exact %.17g\n", p_cpu, p_gpu);
  EXPECT_EQ(p_cpu, p_gpu);
}

// --layer-cache-memory on the GPU engine's slots: the same bytes as without the cache (the default
// on the GPU), with the expected starts (8 layers x 3 chunks each: gate/up's pass from attn,
// down's from mid, the output pass from act) and a smaller budget keeping only attn.
TEST_F(GpuCli, LayerCacheChangesNothing) {
  auto r = run_calq("-q quantize" + in + " -o " + (t / "off").string() + kGptq, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(read_json(t / "off" / "calq_report.json")["gptq"]["layer_cache"]["bytes"], 0);
  r = run_calq("-q quantize" + in + " -o " + (t / "on").string() + kGptq + " --layer-cache-memory 1GB", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  auto lc = read_json(t / "on" / "calq_report.json")["gptq"]["layer_cache"];
  EXPECT_EQ(lc["bytes"], 5505024);  // 768 rows x (384 + 384 + 1024) floats
  EXPECT_EQ(lc["runs_from_attn"], 24);
  EXPECT_EQ(lc["runs_from_mid"], 24);
  EXPECT_EQ(lc["runs_from_act"], 24);
  expect_same_files(t / "off", t / "on");
  r = run_calq("-q quantize" + in + " -o " + (t / "attn").string() + kGptq + " --layer-cache-memory 1.2MB", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  lc = read_json(t / "attn" / "calq_report.json")["gptq"]["layer_cache"];
  EXPECT_EQ(lc["bytes"], 1179648);
  EXPECT_EQ(lc["runs_from_attn"], 72);
  expect_same_files(t / "off", t / "attn");
}

// --activation-precision bf16 on the GPU: the activation slots hold bf16 (less peak GPU memory),
// the quality stays (the same sanity bound as bf16 forward passes), and a run stopped by a CUDA
// error resumes — recomputing the resident activations on the host path, rounded the same way —
// to the bytes of the uninterrupted run.
TEST_F(GpuCli, Bf16ActivationsKeepQualityAndResume) {
  const std::string bf16 = kGptq + " --activation-precision bf16";
  auto r = run_calq("-q quantize" + in + " -o " + (t / "f32").string() + kGptq, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run_calq("-q quantize" + in + " -o " + (t / "b16").string() + bf16, d);
  ASSERT_EQ(r.rc, 0) << r.output;
  const auto rep = read_json(t / "b16" / "calq_report.json");
  EXPECT_EQ(rep["gptq"]["activation_precision"], "bf16");
  const auto p32 = read_json(t / "f32" / "calq_report.json")["gpu"]["peak_bytes"].get<int64_t>();
  const auto p16 = rep["gpu"]["peak_bytes"].get<int64_t>();
  const double k32 = eval_kld(t / "f32", s.m16, d, t / "f32.json");
  const double k16 = eval_kld(t / "b16", s.m16, d, t / "b16.json");
  std::printf("bf16 activations: KLD %.6f against %.6f with fp32 (ratio %.4f); peak GPU bytes %lld against %lld\n", k16,
              k32, k16 / k32, static_cast<long long>(p16), static_cast<long long>(p32));
  EXPECT_LT(k16, 1.10 * k32);
  EXPECT_GT(k16, 0.90 * k32);
  EXPECT_LT(p16, p32);
  const size_t per_layer = rep["gptq"]["modules"].size() / 8;
  r = run_calq("-q quantize" + in + " -o " + (t / "res").string() + bf16, d,
               "CALQ_TEST_CUDA_FAULT=" + std::to_string(2 * per_layer + 3));
  EXPECT_EQ(r.rc, 1) << r.output;
  r = run_calq("quantize" + in + " -o " + (t / "res").string() + bf16 + " --resume", d);
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("recomputing the activations entering layer 2"), std::string::npos) << r.output;
  expect_same_files(t / "b16", t / "res");
}

}  // namespace
