#include "calq/pipeline/module_quant.h"

#include <chrono>
#include <cmath>

#include "calq/backend/device.h"
#include "calq/core/error.h"
#include "calq/quant/mr_gptq.h"

namespace calq::pipeline {

namespace {
// The CUDA GPTQ stage times of a module (quant::GptqStageTimes), for calq_report.json.
nlohmann::json stage_json(const quant::GptqStageTimes& t) {
  return {{"prepare", t.prepare}, {"setup", t.setup},         {"factor", t.factor},
          {"block_loop", t.block_loop}, {"lazy_gemm", t.lazy_gemm}, {"download", t.download},
          {"gemm_flops", t.gemm_flops}};
}
}  // namespace

void MomentAccumulator::add(const float* x, int64_t rows, int64_t cols, const uint8_t* mask) {
  double a1 = 0, a2 = 0, a3 = 0, a4 = 0;
  int64_t n = 0;
#pragma omp parallel for reduction(+ : a1, a2, a3, a4, n) schedule(static) if (rows >= 64)
  for (int64_t r = 0; r < rows; ++r) {
    if (mask && !mask[r]) continue;
    const float* row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const double v = row[c], v2 = v * v;
      a1 += v;
      a2 += v2;
      a3 += v2 * v;
      a4 += v2 * v2;
    }
    n += cols;
  }
  s1_ += a1;
  s2_ += a2;
  s3_ += a3;
  s4_ += a4;
  n_ += n;
}

double MomentAccumulator::kurtosis() const {
  if (n_ == 0) return 0;
  const double n = static_cast<double>(n_), mu = s1_ / n, e2 = s2_ / n, e3 = s3_ / n, e4 = s4_ / n;
  const double m2 = e2 - mu * mu;
  const double m4 = e4 - 4 * mu * e3 + 6 * mu * mu * e2 - 3 * mu * mu * mu * mu;
  if (!(m2 > 0)) return 0;
  return m4 / (m2 * m2);
}

void check_rotation_plan(const std::vector<TensorPlan>& plan, int64_t block) {
  std::string bad;
  for (const auto& p : plan) {
    if (!p.format) continue;
    const int64_t in = p.cols();
    if (block == 0) {
      if (!quant::hadamard_order_supported(in))
        bad += fmt::format("\n  {}: input width {} is not m·2^k with m in 1, 12, 20, 28, 40", p.module, in);
    } else if (in % block != 0) {
      bad += fmt::format("\n  {}: --hadamard-block {} does not divide its input width {}", p.module, block, in);
    }
  }
  if (bad.empty()) return;
  fail("these modules cannot be rotated:{}\nuse a block size that divides every input width, --hadamard-block full "
       "(full-width transform), --keep for these modules, or --no-hadamard",
       bad);
}

ModuleQuantizer::ModuleQuantizer(const quant::GptqOptions& gptq, const MrPipelineOptions& mr,
                                 const std::vector<TensorPlan>& plan)
    : gptq_(gptq), mr_(mr), plan_(plan) {
  if (mr_.enabled) {
    CALQ_CHECK(mr_.scale_search_p > 0, "--scale-search-p must be positive, got {}", mr_.scale_search_p);
    if (mr_.rotate) check_rotation_plan(plan_, mr_.hadamard_block);
  }
}

ModuleQuantResult ModuleQuantizer::quantize(engine::Model& m, const TensorPlan& p, const std::vector<double>& H,
                                            const MomentAccumulator* moments, std::optional<float> global_scale,
                                            int device, const double* h_device) {
  ModuleQuantResult out;
  const auto t0 = std::chrono::steady_clock::now();
  auto since = [](std::chrono::steady_clock::time_point a) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
  };
  quant::GptqOptions go = gptq_;
  go.global_scale = global_scale;
  // GPTQ on the GPU reads the GPU engine's copy of the weights where it can (no host copy);
  // static group parameters and an nvfp4 scale of the tensor itself read them on the host.
  const quant::Format& f = *p.format;
  const bool device_ok = go.cuda && !mr_.enabled && f.group_size > 0 && !(go.act_order && go.static_groups) &&
                         !(f.family == quant::Family::NVFP4 && !go.global_scale);
  std::unique_lock<std::mutex> lock(mu_);
  const engine::Model::DeviceWeight dw = device_ok ? m.device_weight(p.module) : engine::Model::DeviceWeight{};
  std::vector<float> w;
  if (!dw.data) w = m.weight(p.module);
  lock.unlock();
  go.weight_device = dw.data;
  go.weight_device_bf16 = dw.bf16;
  // The engine then also takes Ŵ on the GPU (Model::set_weight_device): no host dequantization.
  go.w_hat_on_device = dw.data != nullptr;
  const double weights_in = since(t0);
  if (device >= 0) go.device = device;
  CALQ_CHECK(!h_device || (go.cuda && !mr_.enabled), "internal: {}: a Hessian on the GPU is for GPTQ on the GPU",
             p.module);
  go.hessian_device = h_device;
  go.hessian_device_ordinal = 0;
  // The GPU work of this call (MR-GPTQ's rotations, GPTQ) on this thread goes to go.device.
  backend::CudaDeviceScope device_scope(go.cuda ? go.device : -1);
  if (!mr_.enabled) {
    const auto t1 = std::chrono::steady_clock::now();
    auto r = quant::gptq_quantize(w.empty() ? nullptr : w.data(), p.rows(), p.cols(), H, *p.format, go, p.module);
    const double call = since(t1);
    const auto t2 = std::chrono::steady_clock::now();
    if (r.w_hat_device) {
      out.w_hat_device = std::move(r.w_hat_device);
      out.w_hat_device_ordinal = r.w_hat_device_ordinal;
      auto q = std::make_shared<const quant::QuantizedWeight>(r.q);
      out.w_hat_host = [q] { return q->dequantize(); };
    } else {
      out.w_hat = r.q.dequantize();
    }
    out.report = {{"proxy_loss", r.proxy_loss}, {"seconds", r.seconds}, {"damp", r.damp_used},
                  {"dead_inputs", r.dead_inputs}};
    if (go.cuda) {
      out.report["gpu"] = go.device;  // the ordinal that ran it (--devices)
      // The host work around the GPU call, beside its own stages: reading the weights, the
      // call's wall time outside its stages, the dequantized copy for the engine.
      auto st = stage_json(r.stages);
      st["weights_in"] = weights_in;
      st["call_other"] = call - r.seconds;
      st["dequantize"] = since(t2);
      out.report["stages"] = std::move(st);
    }
    out.q = std::move(r.q);
    return out;
  }
  quant::MrGptqOptions mo;
  mo.gptq = go;
  mo.gptq.act_order = true;
  mo.gptq.static_groups = true;
  mo.hadamard_block = mr_.hadamard_block;
  mo.seed = mr_.seed;
  mo.scale_search_p = mr_.scale_search_p;
  mo.scale_grid = mr_.scale_grid;
  mo.scale_min = mr_.scale_min;
  mo.rotate = mr_.rotate;
  nlohmann::json extra;
  if (moments) {
    const double k = moments->kurtosis();
    extra["kurtosis"] = k;
    if (mr_.kurtosis_threshold && mr_.rotate) {
      mo.rotate = k > *mr_.kurtosis_threshold;
      extra["kurtosis_threshold"] = *mr_.kurtosis_threshold;
    }
  }
  extra["rotated"] = mo.rotate;
  if (mo.rotate && p.format->family == quant::Family::NVFP4 && !p.fuse_group.empty()) {
    std::lock_guard<std::mutex> guard(mu_);
    auto it = rotated_global_.find(p.fuse_group);
    if (it == rotated_global_.end()) {
      // Every module of the group still holds its original weight here: the group's modules
      // share one input and are quantized one after another, starting with this call.
      float amax = 0;
      const auto rot = quant::Rotation::make(p.cols(), mr_.hadamard_block, mr_.seed);
      for (const auto& q : plan_) {
        if (q.fuse_group != p.fuse_group || !q.format || q.format->family != quant::Family::NVFP4) continue;
        CALQ_CHECK(q.cols() == p.cols(), "{} and {} are fused but have input widths {} and {}", p.module, q.module,
                   p.cols(), q.cols());
        auto wq = m.weight(q.module);
        rot.apply_rows(wq.data(), q.rows());
        for (float v : wq) amax = std::max(amax, std::fabs(v));
      }
      it = rotated_global_.emplace(p.fuse_group, quant::nvfp4_global_scale(amax)).first;
    }
    mo.gptq.global_scale = it->second;
  } else if (mo.rotate && p.format->family == quant::Family::NVFP4) {
    mo.gptq.global_scale.reset();  // the tensor's own scale, of its rotated weights
  }
  auto r = quant::mr_gptq_quantize(w.data(), p.rows(), p.cols(), H, *p.format, mo, p.module);
  out.w_hat = quant::mr_gptq_dequantize(r);
  out.report = {{"proxy_loss", r.gptq.proxy_loss}, {"seconds", r.gptq.seconds}, {"damp", r.gptq.damp_used},
                {"dead_inputs", r.gptq.dead_inputs}};
  out.report.update(extra);
  if (mo.gptq.cuda) {
    out.report["stages"] = stage_json(r.gptq.stages);
    out.report["gpu"] = mo.gptq.device;
  }
  if (r.rotation) out.report["rotation"] = r.rotation->describe();
  out.q = std::move(r.gptq.q);
  out.rotation = std::move(r.rotation);
  return out;
}

}  // namespace calq::pipeline
