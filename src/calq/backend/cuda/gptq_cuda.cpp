// The CUDA backend of GPTQ and Hessian accumulation (built with CALQ_CUDA; docs/cuda.md).
//
// What runs where, for gptq_quantize(opt.cuda):
//   host:  input checks, dead inputs, the nvfp4 global scale, static group parameters, the
//          act-order permutation (quant::detail::gptq_prepare, the CPU code's exact steps);
//   GPU:   damping, P·H·P, Cholesky (cusolverDnDpotrf) and triangular inverse (cusolverDnXtrtri)
//          in fp64 → U; per block, the column loop (gptq_kernel.cu: quantize a column with the
//          element code of calq/quant/element.h, the CPU's own functions, scale its error by
//          1/U_kk, propagate it inside the block; choose a group's parameters when it starts) and
//          the lazy update of all later columns (cublasDgemm, fp64). W, the errors, the codes and
//          the group parameters stay on the GPU until the end.
// The arithmetic is the CPU's (fp64 weights, fp64 U, fp64 updates, same order inside a row); only
// the summation order of the factorization and of the GEMM differ, so codes agree except for
// values within an ulp of a rounding boundary (tests/gpu/cuda_backend_test.cpp).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "calq/backend/cuda/engine_kernels.h"
#include "calq/backend/cuda/gptq_kernel.h"
#include "calq/backend/cuda/kernels.h"
#include "calq/backend/cuda/check.h"
#include "calq/backend/cuda/memory.h"
#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/core/log.h"

namespace calq::backend {

namespace {

using backend::cuda::check_cuda;
using backend::cuda::check_cublas;
using backend::cuda::libs;
using backend::cuda::check_cusolver;


// Device memory owned by one call; freed on every path (errors throw).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cuda::tracked_free(p_, bytes_); }
  void reset() {
    cuda::tracked_free(p_, bytes_);
    p_ = nullptr;
    bytes_ = 0;
  }
  void alloc(size_t bytes, const char* what) {
    reset();
    const cudaError_t e = cuda::tracked_malloc(&p_, bytes);
    if (e != cudaSuccess) p_ = nullptr;
    check_cuda(e, what);
    bytes_ = bytes;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

struct Handles {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  Handles() {
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cublas(libs().cublasCreate_v2(&blas), "cublasCreate");
    check_cublas(libs().cublasSetStream_v2(blas, stream), "cublasSetStream");
    // Bit-reproducible GEMMs from run to run (no atomics-based reductions).
    check_cublas(libs().cublasSetAtomicsMode(blas, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
    check_cublas(libs().cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    check_cusolver(libs().cusolverDnCreate(&solver), "cusolverDnCreate");
    check_cusolver(libs().cusolverDnSetStream(solver, stream), "cusolverDnSetStream");
  }
  Handles(const Handles&) = delete;
  Handles& operator=(const Handles&) = delete;
  ~Handles() {
    if (solver) libs().cusolverDnDestroy(solver);
    if (blas) libs().cublasDestroy_v2(blas);
    if (stream) cudaStreamDestroy(stream);
  }
  void sync(const char* what) const { check_cuda(cudaStreamSynchronize(stream), what); }
};

// Fails, naming the bytes needed, unless `bytes` fit in the free device memory.
void require_memory(size_t bytes, const std::string& what) {
  size_t free_b = 0, total_b = 0;
  check_cuda(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  if (bytes > free_b)
    fail("{}: out of GPU memory: --device cuda needs {} bytes ({:.2f} GiB) on the GPU, {} bytes ({:.2f} GiB) are free "
         "of {:.2f} GiB; free the GPU, quantize smaller modules, or use --device cpu",
         what, bytes, static_cast<double>(bytes) / (1 << 30), free_b, static_cast<double>(free_b) / (1 << 30),
         static_cast<double>(total_b) / (1 << 30));
}

}  // namespace

bool cuda_built() { return true; }

std::string cuda_require(std::string_view option) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    fail("{}: no CUDA GPU is visible ({}); check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu", option,
         e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
  cudaDeviceProp p{};
  check_cuda(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
  if (p.major < 8)
    fail("{}: GPU 0 ({}) has compute capability {}.{}; calq's CUDA backend needs 8.0 or newer (Ampere, Hopper), or "
         "use --device cpu",
         option, p.name, p.major, p.minor);
  return fmt::format("{}, sm_{}{}, {:.1f} GiB", p.name, p.major, p.minor,
                     static_cast<double>(p.totalGlobalMem) / (1 << 30));
}

std::vector<int> cuda_parse_devices(std::string_view list, std::string_view option) {
  cuda_require(option);
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  std::vector<int> out;
  size_t pos = 0;
  while (pos <= list.size()) {
    const size_t comma = std::min(list.find(',', pos), list.size());
    const std::string_view item = list.substr(pos, comma - pos);
    int d = -1;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), d);
    if (item.empty() || ec != std::errc() || end != item.data() + item.size() || d < 0)
      fail("{} '{}': expected GPU ordinals separated by commas, such as 0,1", option, list);
    if (d >= count)
      fail("{} '{}': GPU {} does not exist ({} visible; check CUDA_VISIBLE_DEVICES)", option, list, d, count);
    cudaDeviceProp p{};
    check_cuda(cudaGetDeviceProperties(&p, d), "cudaGetDeviceProperties");
    if (p.major < 8)
      fail("{}: GPU {} ({}) has compute capability {}.{}; calq's CUDA backend needs 8.0 or newer", option, d, p.name,
           p.major, p.minor);
    out.push_back(d);
    pos = comma + 1;
  }
  return out;
}

uint64_t cuda_free_bytes() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return free_b;
}

CudaDeviceScope::CudaDeviceScope(int device) {
  if (device < 0) return;
  int cur = 0;
  check_cuda(cudaGetDevice(&cur), "cudaGetDevice");
  if (cur == device) return;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  previous_ = cur;
}

CudaDeviceScope::~CudaDeviceScope() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

std::vector<double> cuda_hessian_sum(const float* x, int64_t rows, int64_t n, const uint8_t* mask, int64_t block,
                                     int64_t* tokens) {
  cuda_require();
  CALQ_CHECK(n > 0 && block > 0 && rows >= 0, "Hessian of {} features, block {}, {} rows", n, block, rows);
  CALQ_CHECK(n <= INT32_MAX && block <= INT32_MAX, "Hessian of {} features: too wide for cuBLAS", n);
  // The unmasked rows, compacted (the CPU accumulator buffers exactly these, `block` at a time).
  std::vector<int64_t> keep;
  keep.reserve(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    if (!mask || mask[r]) keep.push_back(r);
  if (tokens) *tokens = static_cast<int64_t>(keep.size());
  const size_t N = static_cast<size_t>(n);
  const size_t need = N * N * (sizeof(double) + sizeof(float)) + static_cast<size_t>(block) * N * sizeof(float);
  require_memory(need, "Hessian");
  Handles hd;
  DeviceBuffer d_sum, d_tmp, d_x;
  d_sum.alloc(N * N * sizeof(double), "cudaMalloc(Hessian sum)");
  d_tmp.alloc(N * N * sizeof(float), "cudaMalloc(Hessian block)");
  d_x.alloc(static_cast<size_t>(block) * N * sizeof(float), "cudaMalloc(Hessian rows)");
  check_cuda(cudaMemsetAsync(d_sum.as<double>(), 0, N * N * sizeof(double), hd.stream), "cudaMemset");
  std::vector<float> buf(static_cast<size_t>(block) * N);
  for (size_t b0 = 0; b0 < keep.size(); b0 += static_cast<size_t>(block)) {
    const size_t cnt = std::min(keep.size() - b0, static_cast<size_t>(block));
    for (size_t i = 0; i < cnt; ++i) std::memcpy(buf.data() + i * N, x + keep[b0 + i] * n, N * sizeof(float));
    // On the stream, so it waits for the previous block's SYRK still reading d_x; the sync after
    // the launches below keeps buf from being refilled before the copy has read it.
    check_cuda(cudaMemcpyAsync(d_x.as<float>(), buf.data(), cnt * N * sizeof(float), cudaMemcpyHostToDevice,
                               hd.stream),
               "cudaMemcpy(Hessian rows)");
    // X (cnt × n, row-major) is Xᵀ column-major (n × cnt): tmp = Xᵀ·X, column-major lower =
    // row-major upper, as the CPU's row-major upper ssyrk.
    const float one = 1.f, zero = 0.f;
    check_cublas(libs().cublasSsyrk_v2(hd.blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(cnt),
                             &one, d_x.as<float>(), static_cast<int>(n), &zero, d_tmp.as<float>(), static_cast<int>(n)),
                 "cublasSsyrk");
    cuda::launch_add_upper_f32_to_f64(d_tmp.as<float>(), d_sum.as<double>(), n, hd.stream);
    check_cuda(cudaGetLastError(), "Hessian accumulation kernel");
    hd.sync("Hessian block");
  }
  std::vector<double> sum(N * N);
  check_cuda(cudaMemcpyAsync(sum.data(), d_sum.as<double>(), N * N * sizeof(double), cudaMemcpyDeviceToHost, hd.stream),
             "cudaMemcpy(Hessian)");
  hd.sync("Hessian");
  for (size_t i = 0; i < N; ++i)
    for (size_t j = i + 1; j < N; ++j) sum[j * N + i] = sum[i * N + j];
  return sum;
}

quant::GptqResult cuda_gptq_quantize(const float* w_in, int64_t rows, int64_t cols, const std::vector<double>& h_in,
                                     const quant::Format& f, const quant::GptqOptions& o, const std::string& what) {
  using namespace quant;
  using clock = std::chrono::steady_clock;
  auto secs = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
  const auto t0 = clock::now();
  cuda_require();
  CudaDeviceScope device_scope(o.device);
  CALQ_CHECK(rows <= INT32_MAX && cols <= INT32_MAX, "{}: {}×{} is too large for cuBLAS", what, rows, cols);
  // Tests of the error path: CALQ_TEST_CUDA_FAULT=N makes this process's call number N (from 0)
  // fail with a real CUDA error at its first in-block kernel launch.
  static std::atomic<int64_t> calls{0};
  const int64_t call = calls++;
  const char* fault_env = std::getenv("CALQ_TEST_CUDA_FAULT");
  const bool inject_fault = fault_env && std::atoll(fault_env) == call;
  // Host preparation: the CPU's (quant::detail::gptq_prepare), except the permuted fp64 copies of
  // W and H, which are built on the GPU from the uploaded inputs with the same functions.
  auto prep = detail::gptq_prepare(w_in, rows, cols, h_in, f, o, what, /*permuted_copies=*/false);
  const auto t_prep = clock::now();
  const size_t R = static_cast<size_t>(rows), C = static_cast<size_t>(cols);
  GptqResult& res = prep.res;
  QuantizedWeight& q = res.q;
  const double mean_diag = prep.mean_diag;
  const int64_t G = prep.groups, gs = prep.group_len;
  const size_t NG = static_cast<size_t>(G);
  CALQ_CHECK(prep.static_params || gs <= 256, "internal: GPTQ group of {} columns chosen inside the loop", gs);

  // GPU memory: H (kept undamped, then U), the factor's workspace, Wp, the error block, codes (in
  // processing order and in the weight's layout), group parameters, per-row loss, the permutation.
  Handles hd;
  const int64_t B = o.block_size;
  int64_t lwork_potrf = 0;
  size_t trtri_dev = 0, trtri_host = 0;
  DeviceBuffer d_h, d_u, d_w, d_e, d_work, d_info, d_codes_k, d_codes, d_params, d_loss, d_perm, d_stage, d_wf, d_dead,
      d_wb, d_bad;
  {
    const int n32 = static_cast<int>(cols);
    int lw = 0;
    check_cusolver(libs().cusolverDnDpotrf_bufferSize(hd.solver, CUBLAS_FILL_MODE_LOWER, n32, nullptr, n32, &lw),
                   "cusolverDnDpotrf_bufferSize");
    lwork_potrf = lw;
    check_cusolver(libs().cusolverDnXtrtri_bufferSize(hd.solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, cols,
                                               CUDA_R_64F, nullptr, cols, &trtri_dev, &trtri_host),
                   "cusolverDnXtrtri_bufferSize");
  }
  // The in-block kernel stages a row's columns [i1, i2 + group_len) in shared memory; when that
  // does not fit (very large --block-size), in a global scratch of rows × width doubles.
  const int64_t width_max = std::min<int64_t>(cols, B + (prep.static_params ? 0 : gs));
  const bool staged_global = cuda::gptq_block_shared_bytes(width_max) > cuda::gptq_block_shared_limit();
  const size_t work_bytes = std::max(static_cast<size_t>(lwork_potrf) * sizeof(double), trtri_dev);
  const size_t need = 2 * C * C * sizeof(double) + R * C * (sizeof(double) + sizeof(float)) +
                      R * static_cast<size_t>(B) * sizeof(double) + 2 * R * C + R * NG * sizeof(GroupParams) +
                      R * sizeof(double) + C * (sizeof(int32_t) + 1) +
                      (staged_global ? R * static_cast<size_t>(width_max) * sizeof(double) : 0) + work_bytes +
                      sizeof(int) + (o.weight_device && o.weight_device_bf16 ? R * C * sizeof(uint16_t) : 0) +
                      (o.w_hat_on_device ? R * C * sizeof(float) : 0);
  require_memory(need, what);
  d_h.alloc(C * C * sizeof(double), "cudaMalloc(H)");
  d_u.alloc(C * C * sizeof(double), "cudaMalloc(U)");
  d_w.alloc(R * C * sizeof(double), "cudaMalloc(W)");
  d_e.alloc(R * static_cast<size_t>(B) * sizeof(double), "cudaMalloc(errors)");
  d_work.alloc(work_bytes, "cudaMalloc(cuSOLVER workspace)");
  d_info.alloc(sizeof(int), "cudaMalloc(info)");
  d_codes_k.alloc(R * C, "cudaMalloc(codes)");
  d_codes.alloc(R * C, "cudaMalloc(codes)");
  d_params.alloc(R * NG * sizeof(GroupParams), "cudaMalloc(group parameters)");
  d_loss.alloc(R * sizeof(double), "cudaMalloc(loss)");
  d_perm.alloc(C * sizeof(int32_t), "cudaMalloc(permutation)");
  if (staged_global) d_stage.alloc(R * static_cast<size_t>(width_max) * sizeof(double), "cudaMalloc(block stage)");
  std::vector<unsigned char> trtri_host_buf(std::max<size_t>(trtri_host, 1));
  d_wf.alloc(R * C * sizeof(float), "cudaMalloc(W input)");
  d_dead.alloc(C, "cudaMalloc(dead inputs)");
  // The inputs as given (W fp32, H fp64) and the permutation; the permuted fp64 copies Wp and Hp
  // are made on the GPU (d_u holds the raw H until the factorization needs it).
  if (!o.hessian_device)
    check_cuda(cudaMemcpyAsync(d_u.as<double>(), h_in.data(), C * C * sizeof(double), cudaMemcpyHostToDevice,
                               hd.stream),
               "cudaMemcpy(H)");
  else if (o.hessian_device_ordinal == o.device)
    check_cuda(cudaMemcpyAsync(d_u.as<double>(), o.hessian_device, C * C * sizeof(double), cudaMemcpyDeviceToDevice,
                               hd.stream),
               "cudaMemcpy(H, on the GPU)");
  else
    check_cuda(cudaMemcpyPeerAsync(d_u.as<double>(), o.device, o.hessian_device, o.hessian_device_ordinal,
                                   C * C * sizeof(double), hd.stream),
               "cudaMemcpyPeer(H)");
  if (o.weight_device) {
    // The weights on a GPU already (the engine's copy, as stored): copied here (peer copy from
    // another GPU), widened from bf16, and checked for non-finite values on the device.
    cudaPointerAttributes at{};
    check_cuda(cudaPointerGetAttributes(&at, o.weight_device), "cudaPointerGetAttributes(W)");
    CALQ_CHECK(at.type == cudaMemoryTypeDevice, "internal: {}: the device weights are not device memory", what);
    const size_t wbytes = R * C * (o.weight_device_bf16 ? sizeof(uint16_t) : sizeof(float));
    void* dst = d_wf.as<void>();
    if (o.weight_device_bf16) {
      d_wb.alloc(wbytes, "cudaMalloc(W, bf16)");
      dst = d_wb.as<void>();
    }
    if (at.device == o.device)
      check_cuda(cudaMemcpyAsync(dst, o.weight_device, wbytes, cudaMemcpyDeviceToDevice, hd.stream),
                 "cudaMemcpy(W, on the GPU)");
    else
      check_cuda(cudaMemcpyPeerAsync(dst, o.device, o.weight_device, at.device, wbytes, hd.stream),
                 "cudaMemcpyPeer(W)");
    if (o.weight_device_bf16)
      cuda::launch_bf16_to_f32(d_wb.as<uint16_t>(), d_wf.as<float>(), rows * cols, hd.stream);
    d_bad.alloc(sizeof(unsigned int), "cudaMalloc(count)");
    check_cuda(cudaMemsetAsync(d_bad.as<unsigned int>(), 0, sizeof(unsigned int), hd.stream), "cudaMemset(count)");
    cuda::launch_count_nonfinite(d_wf.as<float>(), rows * cols, d_bad.as<unsigned int>(), hd.stream);
    check_cuda(cudaGetLastError(), "GPTQ weight check");
    unsigned int nonfinite = 0;
    check_cuda(cudaMemcpyAsync(&nonfinite, d_bad.as<unsigned int>(), sizeof nonfinite, cudaMemcpyDeviceToHost,
                               hd.stream),
               "cudaMemcpy(count)");
    hd.sync("GPTQ weight check");
    if (nonfinite) {  // the first one in memory order names itself, as on the host
      std::vector<float> w(R * C);
      check_cuda(cudaMemcpy(w.data(), d_wf.as<float>(), R * C * sizeof(float), cudaMemcpyDeviceToHost),
                 "cudaMemcpy(W)");
      const size_t bad = static_cast<size_t>(
          std::find_if(w.begin(), w.end(), [](float v) { return !std::isfinite(v); }) - w.begin());
      fail("{}: weight {} at row {}, column {} is not finite", what, w[bad], bad / C, bad % C);
    }
    d_wb.reset();
  } else {
    check_cuda(cudaMemcpyAsync(d_wf.as<float>(), w_in, R * C * sizeof(float), cudaMemcpyHostToDevice, hd.stream),
               "cudaMemcpy(W)");
  }
  check_cuda(cudaMemcpyAsync(d_dead.as<uint8_t>(), prep.dead.data(), C, cudaMemcpyHostToDevice, hd.stream),
             "cudaMemcpy(dead inputs)");
  std::vector<int32_t> perm32(C);
  for (size_t k = 0; k < C; ++k) perm32[k] = static_cast<int32_t>(prep.perm[k]);
  check_cuda(cudaMemcpyAsync(d_perm.as<int32_t>(), perm32.data(), C * sizeof(int32_t), cudaMemcpyHostToDevice,
                             hd.stream),
             "cudaMemcpy(permutation)");
  cuda::launch_permute_hessian(d_u.as<double>(), d_dead.as<uint8_t>(), d_perm.as<int32_t>(), d_h.as<double>(), cols,
                               hd.stream);
  cuda::launch_permute_weights(d_wf.as<float>(), d_dead.as<uint8_t>(), d_perm.as<int32_t>(), d_w.as<double>(), rows,
                               cols, hd.stream);
  check_cuda(cudaGetLastError(), "GPTQ permutation kernels");
  // Group parameters on the device are group-major (params[g·rows + r]: a warp's rows side by side).
  std::vector<GroupParams> params_t(R * NG);
  if (prep.static_params)
    for (size_t r = 0; r < R; ++r)
      for (size_t g = 0; g < NG; ++g) params_t[g * R + r] = q.params[r * NG + g];
  check_cuda(cudaMemcpyAsync(d_params.as<GroupParams>(), params_t.data(), R * NG * sizeof(GroupParams),
                             cudaMemcpyHostToDevice, hd.stream),
             "cudaMemcpy(group parameters)");
  check_cuda(cudaMemsetAsync(d_loss.as<double>(), 0, R * sizeof(double), hd.stream), "cudaMemset(loss)");
  hd.sync("GPTQ uploads");
  d_wf.reset();
  const auto t_setup = clock::now();

  // 2. + 4. on the GPU: U = P·L⁻¹·P, L the lower Cholesky factor of P·(H + λI)·P; the damping
  // retries of the CPU code (×10, at most 3 times) when the factorization fails.
  double damp = o.damp;
  for (int attempt = 0;; ++attempt) {
    res.damp_value = damp * mean_diag;
    cuda::launch_reverse(d_h.as<double>(), d_u.as<double>(), cols, hd.stream);
    cuda::launch_add_diagonal(d_u.as<double>(), cols, res.damp_value, hd.stream);
    check_cuda(cudaGetLastError(), "GPTQ damping kernels");
    check_cusolver(libs().cusolverDnDpotrf(hd.solver, CUBLAS_FILL_MODE_LOWER, static_cast<int>(cols), d_u.as<double>(),
                                    static_cast<int>(cols), d_work.as<double>(), static_cast<int>(lwork_potrf),
                                    d_info.as<int>()),
                   "cusolverDnDpotrf");
    int info = 0;
    check_cuda(cudaMemcpyAsync(&info, d_info.as<int>(), sizeof(int), cudaMemcpyDeviceToHost, hd.stream),
               "cudaMemcpy(info)");
    hd.sync("cusolverDnDpotrf");
    if (info == 0) {
      check_cusolver(libs().cusolverDnXtrtri(hd.solver, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, cols, CUDA_R_64F,
                                      d_u.as<double>(), cols, d_work.as<void>(), trtri_dev, trtri_host_buf.data(),
                                      trtri_host, d_info.as<int>()),
                     "cusolverDnXtrtri");
      check_cuda(cudaMemcpyAsync(&info, d_info.as<int>(), sizeof(int), cudaMemcpyDeviceToHost, hd.stream),
                 "cudaMemcpy(info)");
      hd.sync("cusolverDnXtrtri");
      if (info == 0) break;
    }
    const double next = damp > 0 ? damp * 10 : 0.01;
    if (attempt == 3 || !(mean_diag > 0))
      fail("{}: the Hessian is not positive definite even with damping λ = {:.3g} (damp {}): use a larger --damp "
           "or more calibration data",
           what, res.damp_value, damp);
    log_warn("{}: the Hessian is not positive definite with damp {}; retrying with damp {} (set --damp to choose)",
             what, damp, next);
    damp = next;
  }
  res.damp_used = damp;
  // d_h is free now: it receives U (row-major upper).
  cuda::launch_reversed_lower_to_upper(d_u.as<double>(), d_h.as<double>(), cols, hd.stream);
  check_cuda(cudaGetLastError(), "GPTQ factor kernel");
  hd.sync("GPTQ factorization");
  const auto t_factor = clock::now();
  const double* d_U = d_h.as<double>();

  // 5. Blocks, all on the GPU: the fused in-block kernel (codes, group parameters, errors), then
  // the lazy update of the later columns with one GEMM. Nothing returns to the host until the end.
  cuda::GptqBlockArgs a;
  a.w = d_w.as<double>();
  a.u = d_U;
  a.err = d_e.as<double>();
  a.codes = d_codes_k.as<uint8_t>();
  a.params = d_params.as<GroupParams>();
  a.perm = d_perm.as<int32_t>();
  a.loss = d_loss.as<double>();
  a.stage = staged_global ? d_stage.as<double>() : nullptr;
  a.rows = rows;
  a.cols = cols;
  a.group_len = gs;
  a.spec = f.spec();
  a.global = prep.global;
  a.static_params = prep.static_params;
  a.per_channel = prep.per_channel;
  a.dynamic_act = prep.dynamic_act;
  a.clip = o.clip_search;
  a.clip_grid = o.clip_grid;
  a.clip_min = o.clip_min;
  a.clip_norm = o.clip_norm;
  const int64_t nblocks = (cols + B - 1) / B;
  std::vector<cudaEvent_t> ev(static_cast<size_t>(3 * nblocks), nullptr);
  struct EventGuard {
    std::vector<cudaEvent_t>& v;
    ~EventGuard() {
      for (auto e : v)
        if (e) cudaEventDestroy(e);
    }
  } ev_guard{ev};
  for (auto& e : ev) check_cuda(cudaEventCreate(&e), "cudaEventCreate");
  double gemm_flops = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t i1 = b * B, i2 = std::min(i1 + B, cols), count = i2 - i1;
    a.i1 = i1;
    a.i2 = i2;
    // The columns the kernel reads: the block, and the rest of the last group starting in it
    // (whose parameters see its current values) when that group reaches past the block.
    const int64_t last_start = (i2 - 1) / gs * gs;
    a.hi = prep.static_params || last_start < i1 ? i2 : std::max(i2, std::min(cols, last_start + gs));
    check_cuda(cudaEventRecord(ev[3 * b], hd.stream), "cudaEventRecord");
    if (b == 0 && inject_fault) cuda::launch_invalid_for_test(hd.stream);
    cuda::launch_gptq_block(a, hd.stream);
    check_cuda(cudaGetLastError(), "GPTQ in-block kernel");
    check_cuda(cudaEventRecord(ev[3 * b + 1], hd.stream), "cudaEventRecord");
    if (i2 < cols) {
      // Row-major Wp[:, i2:] -= E[:, :count] · U[i1:i2, i2:]; in cuBLAS's column-major view
      // (Wp[:, i2:])ᵀ -= (U[i1:i2, i2:])ᵀ · Eᵀ, with E stored count × rows (column-major rows × count).
      const double minus_one = -1.0, one = 1.0;
      check_cublas(libs().cublasDgemm_v2(hd.blas, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(cols - i2), static_cast<int>(rows),
                               static_cast<int>(count), &minus_one, d_U + i1 * cols + i2, static_cast<int>(cols),
                               d_e.as<double>(), static_cast<int>(rows), &one, d_w.as<double>() + i2,
                               static_cast<int>(cols)),
                   "cublasDgemm(lazy update)");
      gemm_flops += 2.0 * static_cast<double>(rows) * static_cast<double>(cols - i2) * static_cast<double>(count);
    }
    check_cuda(cudaEventRecord(ev[3 * b + 2], hd.stream), "cudaEventRecord");
  }
  cuda::launch_scatter_codes(d_codes_k.as<uint8_t>(), d_codes.as<uint8_t>(), d_perm.as<int32_t>(), rows, cols,
                             hd.stream);
  check_cuda(cudaGetLastError(), "GPTQ codes kernel");
  if (o.w_hat_on_device) {
    // Ŵ for the GPU engine, kept past this call (freed on this device with its last reference).
    void* p = nullptr;
    const size_t bytes = R * C * sizeof(float);
    check_cuda(cuda::tracked_malloc(&p, bytes), "cudaMalloc(dequantized weights)");
    const int dev = o.device;
    res.w_hat_device = std::shared_ptr<const float>(static_cast<const float*>(p), [bytes, dev](const float* q) {
      CudaDeviceScope scope(dev);
      cuda::tracked_free(const_cast<float*>(q), bytes);
    });
    res.w_hat_device_ordinal = dev;
    cuda::launch_dequantize(d_codes_k.as<uint8_t>(), d_params.as<GroupParams>(), d_perm.as<int32_t>(),
                            static_cast<float*>(p), rows, cols, gs, f.spec(), prep.global, prep.dynamic_act,
                            prep.per_channel, hd.stream);
    check_cuda(cudaGetLastError(), "GPTQ dequantization kernel");
  }
  hd.sync("GPTQ blocks");
  const auto t_loop = clock::now();
  for (int64_t b = 0; b < nblocks; ++b) {
    float ms_kernel = 0, ms_gemm = 0;
    check_cuda(cudaEventElapsedTime(&ms_kernel, ev[3 * b], ev[3 * b + 1]), "cudaEventElapsedTime");
    check_cuda(cudaEventElapsedTime(&ms_gemm, ev[3 * b + 1], ev[3 * b + 2]), "cudaEventElapsedTime");
    res.stages.block_loop += 1e-3 * ms_kernel;
    res.stages.lazy_gemm += 1e-3 * ms_gemm;
  }
  res.stages.gemm_flops = gemm_flops;

  // Codes, group parameters and the per-row losses to the host, once.
  check_cuda(cudaMemcpyAsync(q.codes.data(), d_codes.as<uint8_t>(), R * C, cudaMemcpyDeviceToHost, hd.stream),
             "cudaMemcpy(codes)");
  std::vector<double> loss_rows(R);
  check_cuda(cudaMemcpyAsync(loss_rows.data(), d_loss.as<double>(), R * sizeof(double), cudaMemcpyDeviceToHost,
                             hd.stream),
             "cudaMemcpy(loss)");
  if (!prep.static_params)
    check_cuda(cudaMemcpyAsync(params_t.data(), d_params.as<GroupParams>(), R * NG * sizeof(GroupParams),
                               cudaMemcpyDeviceToHost, hd.stream),
               "cudaMemcpy(group parameters)");
  hd.sync("GPTQ download");
  if (!prep.static_params)
    for (size_t r = 0; r < R; ++r)
      for (size_t g = 0; g < NG; ++g) q.params[r * NG + g] = params_t[g * R + r];
  double loss = 0;
  for (double l : loss_rows) loss += l;
  res.proxy_loss = loss;
  const auto t_end = clock::now();
  res.stages.prepare = secs(t0, t_prep);
  res.stages.setup = secs(t_prep, t_setup);
  res.stages.factor = secs(t_setup, t_factor);
  res.stages.download = secs(t_loop, t_end);
  res.seconds = secs(t0, t_end);
  return std::move(res);
}

}  // namespace calq::backend
