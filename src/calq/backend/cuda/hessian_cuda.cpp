// backend::GpuHessian and backend::cuda_power_sums (device.h): the Hessian Σ xᵀx of a module's
// inputs accumulated on the GPU, for observers that take the GPU engine's device inputs.
//
// Per add: the kept rows (mask ≠ 0) are listed on the host, their indices (and weights) uploaded,
// and a kernel gathers them — times the weight, converted to bf16 for BF16 — into the object's
// pending buffer of `block` rows; a full buffer is flushed: one block product in fp32 (F32:
// cublasSsyrk (the CPU's precision and blocks; cuBLAS's order of the sums); TF32 / BF16: cublasGemmEx on the tensor cores with fp32
// accumulation, the lower triangle in column panels) into a shared fp32 scratch, added into the
// object's fp64 sum by a kernel. In fp32 the blocks hold the same 512 rows as the CPU
// HessianAccumulator's, so it differs from it only by the summation order inside a block
// product; Exact (exact_kernels.h) computes each element of the block product in the CPU's order
// too, so it gives the CPU's bits; TF32 / BF16 take larger blocks (GpuHessian::default_block). Everything runs on one stream shared by all objects
// (one cuBLAS handle, atomics off: deterministic), ordered after the caller's stream by events.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <utility>

#include "calq/backend/cuda/exact_kernels.h"
#include "calq/backend/cuda/kernels.h"
#include "calq/backend/cuda/check.h"
#include "calq/backend/cuda/memory.h"
#include "calq/backend/device.h"
#include "calq/core/error.h"

namespace calq::backend {

namespace {

using backend::cuda::check_cuda;
using backend::cuda::check_cublas;
using backend::cuda::libs;


// Allocates `bytes` into p (counted), or fails naming what needed them and the free bytes.
void* device_alloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  if (cuda::tracked_malloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();
    size_t f = 0, t = 0;
    cudaMemGetInfo(&f, &t);
    fail("--device cuda: out of GPU memory: {} needs {} bytes, {} bytes are free on GPU 0; quantize on a GPU with more "
         "memory, use --forward-device cpu (Hessians on the host), or --device cpu",
         what, bytes, f);
  }
  return p;
}

// Device memory that grows (contents not kept); the stream is synchronized before a buffer that
// queued work may still use is freed.
struct Grow {
  void* p = nullptr;
  size_t bytes = 0;
  void ensure(size_t need, cudaStream_t s, const char* what) {
    if (need <= bytes && p) return;
    check_cuda(cudaStreamSynchronize(s), what);
    cuda::tracked_free(p, bytes);
    p = nullptr;
    bytes = 0;
    p = device_alloc(need, what);
    bytes = need;
  }
};

// The stream, cuBLAS handle and scratch buffers every GpuHessian shares (created on first use,
// never destroyed: it lives as long as the CUDA context).
struct Context {
  std::mutex mu;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  Grow tmp;      // n × n fp32 block product
  Grow idx;      // row indices (int64) then weights (fp32) of one add
  Grow stage;    // rows uploaded by add_host
  Grow partial;  // power sums per thread block
  Context() {
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cublas(libs().cublasCreate_v2(&blas), "cublasCreate");
    check_cublas(libs().cublasSetStream_v2(blas, stream), "cublasSetStream");
    check_cublas(libs().cublasSetAtomicsMode(blas, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
    check_cublas(libs().cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  }
};

Context& context() {
  static Context* c = new Context();
  return *c;
}

// The kept rows of a call (mask ≠ 0) and their weights, uploaded to ctx.idx: returns the device
// pointers (weights null when w is null).
struct Rows {
  int64_t count = 0;
  const int64_t* d_idx = nullptr;
  const float* d_w = nullptr;
  double weight = 0;  // Σ w² in double (count when unweighted)
};
Rows upload_rows(Context& c, int64_t rows, const uint8_t* mask, const float* w) {
  std::vector<int64_t> idx;
  std::vector<float> wk;
  idx.reserve(static_cast<size_t>(rows));
  Rows r;
  for (int64_t i = 0; i < rows; ++i) {
    if (mask && !mask[i]) continue;
    idx.push_back(i);
    if (w) {
      const float wi = w[i];
      CALQ_CHECK(std::isfinite(wi) && wi >= 0, "Hessian: token weight {} is not a finite non-negative number", wi);
      wk.push_back(wi);
      r.weight += static_cast<double>(wi) * wi;
    } else {
      r.weight += 1;
    }
  }
  r.count = static_cast<int64_t>(idx.size());
  if (r.count == 0) return r;
  const size_t ib = idx.size() * sizeof(int64_t), wb = wk.size() * sizeof(float);
  c.idx.ensure(ib + wb, c.stream, "Hessian row indices");
  // Pageable host memory: the copies return once the data is staged, so idx / wk may go away.
  check_cuda(cudaMemcpyAsync(c.idx.p, idx.data(), ib, cudaMemcpyHostToDevice, c.stream), "cudaMemcpy(row indices)");
  r.d_idx = static_cast<const int64_t*>(c.idx.p);
  if (w) {
    char* wp = static_cast<char*>(c.idx.p) + ib;
    check_cuda(cudaMemcpyAsync(wp, wk.data(), wb, cudaMemcpyHostToDevice, c.stream), "cudaMemcpy(row weights)");
    r.d_w = reinterpret_cast<const float*>(wp);
  }
  return r;
}

}  // namespace

struct GpuHessian::Impl {
  int64_t n = 0, block = 0;
  HessianPrecision prec = HessianPrecision::F32;
  double* sum = nullptr;  // n × n fp64; the upper triangle accumulates
  void* pending = nullptr;  // block × n rows (fp32, or bf16 bits)
  size_t sum_bytes = 0, pending_bytes = 0;
  int64_t pending_rows = 0, tokens = 0;
  double weight = 0;
  bool finished = false;  // finish_on_device: `sum` holds Σ / weight, mirrored
  unsigned int nonfinite = 0;
  cudaEvent_t ready = nullptr, done = nullptr;  // ordering with the caller's stream
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> timing;
  double seconds = 0;

  size_t elem() const { return prec == HessianPrecision::BF16 ? 2 : 4; }
  // Width of the lower triangle's column panels: the whole matrix below 1024 features, else an
  // eighth of it rounded up to 128 columns (aligned operands for the tensor cores).
  static int64_t panel_width(int64_t n) { return n < 1024 ? n : (n / 8 + 127) / 128 * 128; }

  ~Impl() {
    Context& c = context();
    std::lock_guard<std::mutex> lock(c.mu);
    cudaStreamSynchronize(c.stream);
    for (auto& [a, b] : timing) {
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
    if (ready) cudaEventDestroy(ready);
    if (done) cudaEventDestroy(done);
    cuda::tracked_free(sum, sum_bytes);
    cuda::tracked_free(pending, pending_bytes);
  }

  // One block product of the pending rows into the fp64 sum (under the context lock).
  void flush(Context& c) {
    if (pending_rows == 0) return;
    const size_t N = static_cast<size_t>(n);
    c.tmp.ensure(N * N * sizeof(float), c.stream, "the Hessian's block product (n × n fp32)");
    float* tmp = static_cast<float*>(c.tmp.p);
    const float one = 1.f, zero = 0.f;
    const int ni = static_cast<int>(n), k = static_cast<int>(pending_rows);
    // The pending rows (k × n, row-major) are Xᵀ column-major (n × k): tmp = Xᵀ·X, whose
    // column-major lower triangle is the row-major upper one.
    if (prec == HessianPrecision::Exact) {
      // tmp[i][j] = Σ_r x[r][i]·x[r][j] as the CPU's gemm: A(i, r) = pending[r·n + i], B(r, j) =
      // pending[r·n + j]; the upper triangle (row-major) is the one added below.
      cuda::launch_exact_gemm(n, n, k, 1.0f, 0.0f, static_cast<const float*>(pending), 1, n, pending, false, n, 1,
                              tmp, n, true, c.stream);
    } else if (prec == HessianPrecision::F32) {
      check_cublas(libs().cublasSsyrk_v2(c.blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, ni, k, &one,
                               static_cast<const float*>(pending), ni, &zero, tmp, ni),
                   "cublasSsyrk");
    } else {
      // Only the lower triangle is needed: column panels [j0, j1) of rows [j0, n), each one GEMM
      // (about 9/16 of the full product's work with 8 panels).
      const bool bf16 = prec == HessianPrecision::BF16;
      const cudaDataType_t t = bf16 ? CUDA_R_16BF : CUDA_R_32F;
      const char* x = static_cast<const char*>(pending);
      const int64_t w = panel_width(n);
      for (int64_t j0 = 0; j0 < n; j0 += w) {
        const int pw = static_cast<int>(std::min(w, n - j0)), m = static_cast<int>(n - j0);
        const void* a = x + static_cast<size_t>(j0) * elem();
        check_cublas(libs().cublasGemmEx(c.blas, CUBLAS_OP_N, CUBLAS_OP_T, m, pw, k, &one, a, t, ni, a, t, ni, &zero,
                                  tmp + static_cast<size_t>(j0) * N + static_cast<size_t>(j0), CUDA_R_32F, ni,
                                  bf16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT),
                     bf16 ? "cublasGemmEx (bf16 Hessian block)" : "cublasGemmEx (tf32 Hessian block)");
      }
    }
    cuda::launch_add_upper_f32_to_f64(tmp, sum, n, c.stream);
    check_cuda(cudaGetLastError(), "Hessian accumulation kernel");
    pending_rows = 0;
  }

  void fold_timing() {  // under the context lock
    if (timing.empty()) return;
    check_cuda(cudaEventSynchronize(timing.back().second), "Hessian timing");
    for (auto& [a, b] : timing) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, a, b) == cudaSuccess) seconds += 1e-3 * ms;
      else cudaGetLastError();
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
    timing.clear();
  }

  void begin_timing(Context& c) {
    if (timing.size() >= 256) fold_timing();
    cudaEvent_t a = nullptr, b = nullptr;
    check_cuda(cudaEventCreate(&a), "cudaEventCreate");
    if (cudaEventCreate(&b) != cudaSuccess) {
      cudaEventDestroy(a);
      check_cuda(cudaGetLastError(), "cudaEventCreate");
    }
    timing.emplace_back(a, b);
    check_cuda(cudaEventRecord(a, c.stream), "cudaEventRecord");
  }
  void end_timing(Context& c) { check_cuda(cudaEventRecord(timing.back().second, c.stream), "cudaEventRecord"); }
  // The rows still buffered go into the sum (timed); under the context lock.
  void flush_pending(Context& c) {
    if (pending_rows == 0) return;
    begin_timing(c);
    flush(c);
    end_timing(c);
  }
  bool empty() const { return tokens == 0 || !(weight > 0); }

  // add() under the context lock.
  void add(Context& c, const float* x, int64_t rows, const uint8_t* mask, const float* w, cudaStream_t s) {
    CALQ_CHECK(rows >= 0, "Hessian: {} rows", rows);
    if (rows == 0) return;
    CALQ_CHECK(x, "Hessian: null device input of {} rows", rows);
    if (s && s != c.stream) {
      check_cuda(cudaEventRecord(ready, s), "cudaEventRecord(input ready)");
      check_cuda(cudaStreamWaitEvent(c.stream, ready, 0), "cudaStreamWaitEvent");
    }
    const Rows r = upload_rows(c, rows, mask, w);  // checks the weights first
    begin_timing(c);
    for (int64_t done_rows = 0; done_rows < r.count;) {
      const int64_t cnt = std::min(block - pending_rows, r.count - done_rows);
      const size_t off = static_cast<size_t>(pending_rows * n);
      const float* wp = r.d_w ? r.d_w + done_rows : nullptr;
      if (prec == HessianPrecision::BF16)
        cuda::launch_gather_rows_bf16(x, r.d_idx + done_rows, wp, static_cast<uint16_t*>(pending) + off, cnt, n,
                                      c.stream);
      else
        cuda::launch_gather_rows_f32(x, r.d_idx + done_rows, wp, static_cast<float*>(pending) + off, cnt, n,
                                     c.stream);
      check_cuda(cudaGetLastError(), "Hessian row gather");
      done_rows += cnt;
      pending_rows += cnt;
      if (done_rows == r.count && s && s != c.stream) {
        // x is read: the caller's stream may overwrite it from here on.
        check_cuda(cudaEventRecord(done, c.stream), "cudaEventRecord(input read)");
        check_cuda(cudaStreamWaitEvent(s, done, 0), "cudaStreamWaitEvent");
      }
      if (pending_rows == block) flush(c);
    }
    end_timing(c);
    tokens += r.count;
    weight += r.weight;
    if (!s) check_cuda(cudaStreamSynchronize(c.stream), "Hessian rows");
  }
};

GpuHessian::GpuHessian(int64_t features, HessianPrecision precision, int64_t block) {
  cuda_require("--device cuda");
  CALQ_CHECK(features > 0 && block >= 0, "Hessian of {} features, block {}", features, block);
  CALQ_CHECK(features <= INT32_MAX && block <= INT32_MAX, "Hessian of {} features: too wide for cuBLAS", features);
  Context& c = context();
  // Allocated before taking the context lock: an Impl that fails half-way is destroyed on the
  // way out, and its destructor takes the lock.
  auto im = std::make_unique<Impl>();
  im->n = features;
  im->block = block > 0 ? block : GpuHessian::default_block(features, precision);
  im->prec = precision;
  const size_t N = static_cast<size_t>(features);
  const std::string what = fmt::format("the Hessian of a {}-feature input", features);
  im->sum_bytes = N * N * sizeof(double);
  im->sum = static_cast<double*>(device_alloc(im->sum_bytes, what + " (fp64 sum)"));
  im->pending_bytes = static_cast<size_t>(im->block) * N * im->elem();
  im->pending = device_alloc(im->pending_bytes, what + " (row block)");
  check_cuda(cudaEventCreateWithFlags(&im->ready, cudaEventDisableTiming), "cudaEventCreate");
  check_cuda(cudaEventCreateWithFlags(&im->done, cudaEventDisableTiming), "cudaEventCreate");
  {
    std::lock_guard<std::mutex> lock(c.mu);
    check_cuda(cudaMemsetAsync(im->sum, 0, im->sum_bytes, c.stream), "cudaMemset(Hessian)");
  }
  impl_ = std::move(im);
}

GpuHessian::GpuHessian(GpuHessian&&) noexcept = default;
GpuHessian& GpuHessian::operator=(GpuHessian&&) noexcept = default;
GpuHessian::~GpuHessian() = default;

void GpuHessian::add(const float* x_device, int64_t rows, const uint8_t* mask, const float* weight, void* stream) {
  CALQ_CHECK(!impl_->finished, "GpuHessian: add after finish_on_device");
  Context& c = context();
  std::lock_guard<std::mutex> lock(c.mu);
  impl_->add(c, x_device, rows, mask, weight, static_cast<cudaStream_t>(stream));
}

void GpuHessian::add_host(const float* x, int64_t rows, const uint8_t* mask, const float* weight) {
  CALQ_CHECK(!impl_->finished, "GpuHessian: add after finish_on_device");
  Context& c = context();
  std::lock_guard<std::mutex> lock(c.mu);
  const int64_t n = impl_->n, chunk = std::max<int64_t>(impl_->block, 8192);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t cnt = std::min(chunk, rows - r0);
    const size_t bytes = static_cast<size_t>(cnt * n) * sizeof(float);
    c.stage.ensure(bytes, c.stream, "Hessian input rows");
    check_cuda(cudaMemcpyAsync(c.stage.p, x + r0 * n, bytes, cudaMemcpyHostToDevice, c.stream),
               "cudaMemcpy(Hessian rows)");
    // Ordered on the shared stream: the next chunk's upload waits for this one's gathers.
    impl_->add(c, static_cast<const float*>(c.stage.p), cnt, mask ? mask + r0 : nullptr,
               weight ? weight + r0 : nullptr, c.stream);
  }
  check_cuda(cudaStreamSynchronize(c.stream), "Hessian rows");
}

int64_t GpuHessian::features() const { return impl_->n; }
int64_t GpuHessian::tokens() const { return impl_->tokens; }
double GpuHessian::weight() const { return impl_->weight; }
HessianPrecision GpuHessian::precision() const { return impl_->prec; }

std::vector<double> GpuHessian::hessian() const {
  Context& c = context();
  std::lock_guard<std::mutex> lock(c.mu);
  Impl& im = *impl_;
  const size_t N = static_cast<size_t>(im.n);
  im.flush_pending(c);
  std::vector<double> h(N * N, 0.0);
  if (im.empty()) {
    check_cuda(cudaStreamSynchronize(c.stream), "Hessian");
    return h;
  }
  // The lower triangle is only ever overwritten from the upper one, which keeps accumulating.
  if (!im.finished) {
    cuda::launch_mirror_upper(im.sum, im.n, c.stream);
    check_cuda(cudaGetLastError(), "Hessian mirror kernel");
  }
  check_cuda(cudaMemcpyAsync(h.data(), im.sum, N * N * sizeof(double), cudaMemcpyDeviceToHost, c.stream),
             "cudaMemcpy(Hessian)");
  check_cuda(cudaStreamSynchronize(c.stream), "Hessian");
  im.fold_timing();
  if (im.finished) return h;  // already Σ / weight
  // As HessianAccumulator::hessian: every entry times the same 1 / weight.
  const double inv = 1.0 / im.weight;
#pragma omp parallel for schedule(static) if (N >= 512)
  for (size_t i = 0; i < N * N; ++i) h[i] *= inv;
  return h;
}

GpuHessian::OnDevice GpuHessian::finish_on_device() {
  Context& c = context();
  std::lock_guard<std::mutex> lock(c.mu);
  Impl& im = *impl_;
  const size_t N = static_cast<size_t>(im.n);
  im.flush_pending(c);
  OnDevice d;
  if (im.empty()) {
    check_cuda(cudaStreamSynchronize(c.stream), "Hessian");
    return d;
  }
  if (!im.finished) {
    cuda::launch_mirror_upper(im.sum, im.n, c.stream);
    void* bad = nullptr;
    check_cuda(cuda::tracked_malloc(&bad, sizeof(unsigned int)), "cudaMalloc(count)");
    unsigned int nbad = 0;
    try {
      check_cuda(cudaMemsetAsync(bad, 0, sizeof(unsigned int), c.stream), "cudaMemset(count)");
      // As hessian(): every entry times the same 1 / weight.
      cuda::launch_scale_count_nonfinite(im.sum, static_cast<int64_t>(N * N), 1.0 / im.weight,
                                         static_cast<unsigned int*>(bad), c.stream);
      check_cuda(cudaGetLastError(), "Hessian scale kernel");
      check_cuda(cudaMemcpyAsync(&nbad, bad, sizeof nbad, cudaMemcpyDeviceToHost, c.stream), "cudaMemcpy(count)");
      check_cuda(cudaStreamSynchronize(c.stream), "Hessian");
    } catch (...) {
      cuda::tracked_free(bad, sizeof(unsigned int));
      throw;
    }
    cuda::tracked_free(bad, sizeof(unsigned int));
    im.finished = true;
    im.nonfinite = nbad;
  }
  d.data = im.sum;
  d.finite = im.nonfinite == 0;
  d.diag.resize(N);
  check_cuda(cudaMemcpy2DAsync(d.diag.data(), sizeof(double), im.sum, (N + 1) * sizeof(double), sizeof(double), N,
                               cudaMemcpyDeviceToHost, c.stream),
             "cudaMemcpy(Hessian diagonal)");
  check_cuda(cudaStreamSynchronize(c.stream), "Hessian");
  im.fold_timing();
  return d;
}

double GpuHessian::gpu_seconds() const {
  Context& c = context();
  std::lock_guard<std::mutex> lock(c.mu);
  impl_->fold_timing();
  return impl_->seconds;
}

PowerSums cuda_power_sums(const float* x_device, int64_t rows, int64_t cols, const uint8_t* mask, void* stream) {
  cuda_require("--device cuda");
  CALQ_CHECK(rows >= 0 && cols > 0, "power sums of {} × {}", rows, cols);
  Context& c = context();
  std::lock_guard<std::mutex> lock(c.mu);
  auto s = static_cast<cudaStream_t>(stream);
  PowerSums out;
  if (rows == 0) return out;
  cudaEvent_t ready = nullptr;
  if (s && s != c.stream) {
    check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
    const cudaError_t e1 = cudaEventRecord(ready, s);
    const cudaError_t e2 = e1 == cudaSuccess ? cudaStreamWaitEvent(c.stream, ready, 0) : e1;
    cudaEventDestroy(ready);
    check_cuda(e2, "cudaStreamWaitEvent");
  }
  const Rows r = upload_rows(c, rows, mask, nullptr);
  if (r.count > 0) {
    const int nb = cuda::power_sum_blocks();
    c.partial.ensure(static_cast<size_t>(nb) * 4 * sizeof(double), c.stream, "power sums");
    cuda::launch_power_sums(x_device, r.d_idx, r.count, cols, static_cast<double*>(c.partial.p), c.stream);
    check_cuda(cudaGetLastError(), "power sums kernel");
    std::vector<double> p(static_cast<size_t>(nb) * 4);
    check_cuda(cudaMemcpyAsync(p.data(), c.partial.p, p.size() * sizeof(double), cudaMemcpyDeviceToHost, c.stream),
               "cudaMemcpy(power sums)");
    check_cuda(cudaStreamSynchronize(c.stream), "power sums");
    for (int b = 0; b < nb; ++b) {
      out.s1 += p[static_cast<size_t>(b) * 4];
      out.s2 += p[static_cast<size_t>(b) * 4 + 1];
      out.s3 += p[static_cast<size_t>(b) * 4 + 2];
      out.s4 += p[static_cast<size_t>(b) * 4 + 3];
    }
    out.n = r.count * cols;
  }
  // Synchronized above: the caller's stream needs no event to overwrite x.
  if (r.count == 0) check_cuda(cudaStreamSynchronize(c.stream), "power sums");
  return out;
}

}  // namespace calq::backend
