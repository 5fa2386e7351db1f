// Throughput of calq's gemm (src/calq/engine/gemm.h) per kernel on the shapes of the engine's
// linear modules at ctx 512 × 4 chunks (and one chunk): bench-qwen3-28m and Qwen3-1.7B, fp32 and bf16 weights.
//   build/release/bench/gemm_bench [--benchmark_filter=...]   (threads: OMP_NUM_THREADS)
// Kernels the CPU cannot run are skipped.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <random>
#include <vector>

#include "calq/core/dtype.h"
#include "calq/engine/gemm.h"

namespace {

using calq::engine::GemmKernel;

void BM_Gemm(benchmark::State& state) {
  const auto kernel = static_cast<GemmKernel>(state.range(0));
  const int64_t M = state.range(1), N = state.range(2), K = state.range(3);
  const bool bf16 = state.range(4) != 0;
  if (!calq::engine::gemm_kernel_supported(kernel)) {
    state.SkipWithError("kernel not supported on this CPU");
    return;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> A(static_cast<size_t>(M * K)), W(static_cast<size_t>(N * K)), C(static_cast<size_t>(M * N));
  for (auto& x : A) x = d(rng);
  for (auto& x : W) x = d(rng);
  std::vector<uint16_t> Wb(W.size());
  for (size_t i = 0; i < W.size(); ++i) Wb[i] = calq::f32_to_bf16(W[i]);
  calq::engine::GemmArgs g;
  g.M = M;
  g.N = N;
  g.K = K;
  g.A = A.data();
  g.lda = K;
  g.B = bf16 ? static_cast<const void*>(Wb.data()) : W.data();
  g.b_bf16 = bf16;
  g.ldb = K;
  g.C = C.data();
  g.ldc = N;
  for (auto _ : state) {
    calq::engine::gemm(g, kernel);
    benchmark::DoNotOptimize(C.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(M * N * K) * state.iterations(),
                                                 benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.SetLabel(std::string(calq::engine::gemm_kernel_name(kernel)) + (bf16 ? " bf16 B" : " f32 B"));
}

void shapes(benchmark::internal::Benchmark* b) {
  const int64_t shapes[][3] = {
      {2048, 512, 512},   {2048, 128, 512},   {2048, 1536, 512}, {2048, 512, 1536}, {1024, 8192, 512},  // 28m
      {2048, 2048, 2048}, {2048, 1024, 2048}, {2048, 6144, 2048}, {2048, 2048, 6144},                    // 1.7B
      // one sequence of 512 tokens (the engine's sequence-parallel layers run one per thread)
      {512, 512, 512},    {512, 1536, 512},   {512, 512, 1536},   {512, 2048, 2048},  {512, 6144, 2048},
      {512, 2048, 6144},
  };
  for (int k : {1, 2, 3})
    for (const auto& s : shapes)
      for (int bf : {0, 1}) b->Args({k, s[0], s[1], s[2], bf});
}
BENCHMARK(BM_Gemm)
    ->ArgNames({"kernel", "M", "N", "K", "bf16"})
    ->Apply(shapes)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(0.5);

}  // namespace

BENCHMARK_MAIN();
