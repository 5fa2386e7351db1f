// Prompt processing speed of the CPU engine: full forward (embed, every layer, head) of one batch
// of random tokens on bench-qwen3-28m (or the model in CALQ_BENCH_MODEL), reported as tokens/s.
//   build/release/bench/engine_bench [--benchmark_filter=...]   (from the repository root)
// Threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS (the context line prints what was used).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "calq/engine/engine.h"

namespace {

std::filesystem::path model_dir() {
  if (const char* p = std::getenv("CALQ_BENCH_MODEL")) return p;
  return "../shared/data/models/bench-qwen3-28m";  // run from the repository root
}

void BM_Prefill(benchmark::State& state) {
  const int64_t batch = state.range(0), ctx = state.range(1);
  const bool cache = state.range(2) != 0;
  calq::engine::Options o;
  o.cache_weights = cache;
  auto m = calq::engine::Model::load(model_dir(), o);
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(m.config().vocab_size - 1));
  calq::engine::Batch b{batch, ctx, std::vector<int32_t>(static_cast<size_t>(batch * ctx)), {}};
  for (auto& t : b.tokens) t = tok(rng);
  if (cache) m.forward(b);  // warm the cache outside the timing
  for (auto _ : state) {
    auto logits = m.forward(b);
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(batch * ctx * state.iterations()),
                                               benchmark::Counter::kIsRate);
  state.SetLabel(cache ? "fp32 weights cached" : "weights converted per layer");
}
BENCHMARK(BM_Prefill)
    ->ArgNames({"batch", "ctx", "cache"})
    ->Args({1, 512, 0})
    ->Args({1, 512, 1})
    ->Args({4, 512, 0})
    ->Args({1, 128, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace

int main(int argc, char** argv) {
  std::string cpu = "unknown";
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  benchmark::AddCustomContext("cpu", cpu);
  benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
  benchmark::AddCustomContext("model", model_dir().string());
  if (!std::filesystem::exists(model_dir())) {
    std::fprintf(stderr, "model %s absent (set CALQ_BENCH_MODEL)\n", model_dir().c_str());
    return 1;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
