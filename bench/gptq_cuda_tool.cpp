// Per-module GPTQ timing, CUDA backend vs calq's CPU GPTQ in the same run, on Llama/Qwen-8B-like
// shapes (4096×4096: q/o; 14336×4096: gate/up). Random weights, a Hessian of `tokens` random
// inputs with a few outlier channels; both backends get the same W and H. Prints a markdown
// table with the machine. Usage: gptq_cuda_tool [tokens=8192] [reps=1]
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/quant/gptq.h"
#include "calq/quant/hessian.h"

using namespace calq;
using namespace calq::quant;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<float> random_inputs(int64_t n, int64_t cols, unsigned seed) {
  std::vector<float> X(static_cast<size_t>(n * cols));
#pragma omp parallel
  {
    std::mt19937 rng(seed + static_cast<unsigned>(omp_get_thread_num()));
    std::normal_distribution<float> d(0, 1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < cols; ++j) X[static_cast<size_t>(t * cols + j)] = d(rng) * (j % 97 == 0 ? 8.f : 1.f);
  }
  return X;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 8192;
    const std::string dev = backend::cuda_require("--device cuda");
    std::printf("machine: %s; CPU: %u hardware threads, OpenMP %d threads\n", dev.c_str(),
                std::thread::hardware_concurrency(), omp_get_max_threads());
    std::printf("calibration tokens per Hessian: %lld (random, every 97th channel ×8)\n\n",
                static_cast<long long>(tokens));
    const int64_t cols = 4096;
    const auto X = random_inputs(tokens, cols, 1);
    double t = now();
    HessianAccumulator acc(cols);
    acc.add(X.data(), tokens);
    const auto H = acc.hessian();
    const double cpu_h = now() - t;
    // Warm-up (CUDA context, cuBLAS/cuSOLVER handles), not timed.
    backend::cuda_hessian_sum(X.data(), 512, cols, nullptr, 512, nullptr);
    {
      // ... and cuSOLVER's and the GPTQ kernels' first use: one small GPTQ call.
      std::vector<float> w(64 * 256, 0.01f);
      std::vector<double> h(256 * 256, 0.0);
      for (int i = 0; i < 256; ++i) h[static_cast<size_t>(i) * 257] = 1.0;
      GptqOptions o;
      o.cuda = true;
      gptq_quantize(w.data(), 64, 256, h, Format::parse("int4", 128), o);
    }
    t = now();
    int64_t tk = 0;
    const auto Hg = backend::cuda_hessian_sum(X.data(), tokens, cols, nullptr, 512, &tk);
    const double gpu_h = now() - t;
    double worst = 0;
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = i; j < cols; ++j) {
        const double a = acc.sum()[static_cast<size_t>(i * cols + j)], b = Hg[static_cast<size_t>(i * cols + j)];
        worst = std::max(worst, std::fabs(a - b) / std::sqrt(acc.sum()[static_cast<size_t>(i * cols + i)] *
                                                            acc.sum()[static_cast<size_t>(j * cols + j)]));
      }
    std::printf("| step | shape | CPU s | GPU s | speedup | agreement |\n|---|---|---:|---:|---:|---|\n");
    std::printf("| Hessian XᵀX (fp32 blocks of 512 → fp64) | %lld×%lld tokens×features | %.3f | %.3f | %.1f× | "
                "max |ΔH|/√(HᵢᵢHⱼⱼ) = %.2g |\n",
                static_cast<long long>(tokens), static_cast<long long>(cols), cpu_h, gpu_h, cpu_h / gpu_h, worst);
    struct Shape {
      int64_t rows;
      const char* name;
    };
    std::vector<std::string> stage_rows;
    for (const Shape s : {Shape{4096, "q/o_proj"}, Shape{14336, "gate/up_proj"}}) {
      std::mt19937 rng(static_cast<unsigned>(s.rows));
      std::normal_distribution<float> d(0, 0.02f);
      std::vector<float> W(static_cast<size_t>(s.rows * cols));
      for (auto& v : W) v = d(rng);
      for (const bool act : {false, true}) {
        GptqOptions o;
        o.act_order = act;
        const Format f = Format::parse("int4", 128);
        const auto cpu = gptq_quantize(W.data(), s.rows, cols, H, f, o);
        o.cuda = true;
        const auto gpu = gptq_quantize(W.data(), s.rows, cols, H, f, o);
        size_t same = 0;
        for (size_t i = 0; i < cpu.q.codes.size(); ++i) same += cpu.q.codes[i] == gpu.q.codes[i];
        std::printf("| GPTQ int4 g128%s (%s) | %lld×%lld | %.3f | %.3f | %.1f× | codes %.4f%% identical, proxy loss "
                    "%.6g vs %.6g |\n",
                    act ? " act-order" : "", s.name, static_cast<long long>(s.rows), static_cast<long long>(cols),
                    cpu.seconds, gpu.seconds, cpu.seconds / gpu.seconds,
                    100.0 * static_cast<double>(same) / static_cast<double>(cpu.q.codes.size()), cpu.proxy_loss,
                    gpu.proxy_loss);
        std::fflush(stdout);
        const GptqStageTimes& st = gpu.stages;
        char row[512];
        std::snprintf(row, sizeof row,
                      "| %lld×%lld%s | %.3f | %.3f | %.3f | %.4f | %.4f | %.1f | %.4f | %.3f |\n",
                      static_cast<long long>(s.rows), static_cast<long long>(cols), act ? " act-order" : "",
                      st.prepare, st.setup, st.factor, st.block_loop, st.lazy_gemm, st.gemm_flops / st.lazy_gemm / 1e12,
                      st.download, gpu.seconds);
        stage_rows.push_back(row);
      }
    }
    std::printf("\nWhere the GPU time goes (seconds; prepare = host gptq_prepare; setup = handles, allocation, "
                "uploads; kernel = fused in-block loop, GEMM = lazy updates, both summed CUDA-event times; "
                "download = codes to layout + copies):\n\n");
    std::printf("| module | prepare | setup | factor | kernel | GEMM | GEMM TFLOP/s (fp64) | download | total |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (const auto& r : stage_rows) std::printf("%s", r.c_str());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "gptq_cuda_tool: %s\n", e.what());
    return 1;
  }
}
