// Hessian accumulation on the CPU: calq's HessianAccumulator (block products on calq's own GEMM
// kernels, src/calq/quant/hessian.cpp) against the same accumulation with OpenBLAS's ssyrk for the
// block products (what calq used before 2026-12-04: ssyrk into an fp32 block, added into fp64), in
// the same process on the same inputs. Rows = tokens, n = input features (the widths of the
// bench models' and Qwen3-8B's linear inputs). Prints a markdown table with both times, the
// speedup as a ratio and the largest difference between the two results, and the machine.
//   build/release/bench/hessian_tool [rows (16384)] [repeats (3)]   (threads: OMP_NUM_THREADS)
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "calq/engine/gemm.h"
#include "calq/quant/hessian.h"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// The former accumulation: ssyrk per block of 512 rows into fp32, then into the fp64 upper triangle.
std::vector<double> ssyrk_sum(const std::vector<float>& x, int64_t rows, int64_t n) {
  std::vector<double> sum(static_cast<size_t>(n * n), 0.0);
  std::vector<float> tmp(static_cast<size_t>(n * n));
  for (int64_t r0 = 0; r0 < rows; r0 += 512) {
    const int64_t k = std::min<int64_t>(512, rows - r0);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(n), static_cast<int>(k), 1.0f,
                x.data() + r0 * n, static_cast<int>(n), 0.0f, tmp.data(), static_cast<int>(n));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) sum[static_cast<size_t>(i * n + j)] += tmp[static_cast<size_t>(i * n + j)];
  }
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 16384;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 3;
  std::printf("machine: %s, %d threads; calq GEMM kernel: %s; %lld rows, best of %d\n\n", cpu_name().c_str(),
              omp_get_max_threads(), std::string(calq::engine::gemm_kernel_name(calq::engine::gemm_kernel())).c_str(),
              static_cast<long long>(rows), repeats);
  std::printf("| n (features) | OpenBLAS ssyrk blocks, s | calq HessianAccumulator, s | speedup | GFLOP/s (calq, n²·rows) | max difference / max entry |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|\n");
  for (const int64_t n : {384, 512, 1024, 1536, 3072, 4096}) {
    std::vector<float> x(static_cast<size_t>(rows * n));
    std::mt19937 rng(static_cast<unsigned>(n));
    std::normal_distribution<float> d(0, 1);
    for (auto& v : x) v = d(rng);
    double t_ref = 1e30, t_calq = 1e30;
    std::vector<double> ref, got;
    for (int rep = 0; rep < repeats; ++rep) {
      double t0 = now();
      ref = ssyrk_sum(x, rows, n);
      t_ref = std::min(t_ref, now() - t0);
      t0 = now();
      calq::quant::HessianAccumulator acc(n);
      acc.add(x.data(), rows);
      (void)acc.hessian();  // flushes the last block (the mirror is once per module, included)
      got = acc.sum();
      t_calq = std::min(t_calq, now() - t0);
    }
    // The largest difference relative to the largest entry (a diagonal one).
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) {
        const double a = ref[static_cast<size_t>(i * n + j)], b = got[static_cast<size_t>(i * n + j)];
        worst = std::max(worst, std::fabs(a - b));
        scale = std::max(scale, std::fabs(a));
      }
    worst /= scale;
    std::printf("| %lld | %.3f | %.3f | %.2fx | %.0f | %.1e |\n", static_cast<long long>(n), t_ref, t_calq, t_ref / t_calq,
                static_cast<double>(rows) * n * n / t_calq / 1e9, worst);
  }
  return 0;
}
