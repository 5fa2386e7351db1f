#include "calq/pipeline/quantize.h"

#include <omp.h>

#include <chrono>
#include <fstream>
#include <map>
#include <set>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/export/native.h"
#include "calq/io/atomic.h"
#include "calq/io/safetensors.h"
#include "calq/pipeline/module_quant.h"
#include "calq/quant/layout.h"

namespace calq::pipeline {

namespace fs = std::filesystem;

bool is_passthrough_file(const std::string& f) {
  static const std::set<std::string> exact = {
      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
      "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json", "vocab.txt",
      "chat_template.jinja", "chat_template.json", "qwen.tiktoken", "tokenizer.tiktoken",
      "encoder.json", "vocab.bpe", "preprocessor_config.json"};
  if (exact.count(f)) return true;
  auto ends = [&](std::string_view s) { return f.size() >= s.size() && f.compare(f.size() - s.size(), s.size(), s) == 0; };
  return ends(".tiktoken");
}

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// fp32 copy of a tensor in [out, in] layout (transposing GPT-2 Conv1D weights).
std::vector<float> load_linear(const io::Checkpoint& ck, const TensorPlan& p) {
  std::vector<float> w = to_f32_vector(ck.view(p.name));
  return p.conv1d ? transpose(w, p.shape[0], p.shape[1]) : w;
}

float tensor_absmax(const std::vector<float>& w) {
  float m = 0;
  for (float x : w) m = std::max(m, std::fabs(x));
  return m;
}

}  // namespace

QuantizeResult quantize_model(const QuantizeOptions& opt) {
  double t0 = now_s();
  CALQ_CHECK(opt.method == "rtn" || opt.method == "rtn+act" || opt.method == "gptq" || opt.method == "mr-gptq",
             "--method {} is not supported; supported: rtn, gptq, mr-gptq", opt.method);
  CALQ_CHECK(fs::exists(opt.input), "--input {}: no such file or directory", opt.input.string());
  CALQ_CHECK(!opt.output.empty(), "--output is required");
  {
    std::error_code ec;
    if (fs::exists(opt.output) && fs::equivalent(opt.input, opt.output, ec))
      fail("--output {} is the input directory; choose another path", opt.output.string());
  }
  io::ModelConfig cfg = io::load_config(opt.input);
  io::Checkpoint ck = io::Checkpoint::open(opt.input);

  std::vector<TensorDesc> descs;
  for (const auto& n : ck.names()) {
    const auto& i = ck.info(n);
    descs.push_back({n, i.dtype, i.shape});
  }
  QuantizeResult res;
  res.plan = make_plan(descs, cfg, opt.plan);
  if (opt.dry_run) return res;

  // Input rotations by module: given with the weights (MR-GPTQ), or made here (RTN + rotation).
  std::map<std::string, quant::Rotation> rotations = opt.rotations;
  if (opt.rotate_block) {
    check_rotation_plan(res.plan, *opt.rotate_block);
    for (const auto& p : res.plan)
      if (p.format) rotations.emplace(p.module, quant::Rotation::make(p.cols(), *opt.rotate_block, opt.rotate_seed));
  }
  auto rotation_of = [&](const TensorPlan& p) -> const quant::Rotation* {
    auto it = rotations.find(p.module);
    return it == rotations.end() || !p.format ? nullptr : &it->second;
  };

  io::AtomicDir out(opt.output, opt.overwrite);
  io::SafetensorsWriter writer(out.path(), opt.max_shard_bytes, {{"format", "pt"}});

  uint64_t in_bytes = 0, out_bytes = 0, q_params = 0, total_params = 0;
  double q_bits = 0;
  for (const auto& p : res.plan) {
    const auto& info = ck.info(p.name);
    total_params += static_cast<uint64_t>(shape_numel(p.shape));
    if (!p.format) {
      writer.declare(p.name, info.dtype, info.shape);
      out_bytes += info.end - info.begin;
      continue;
    }
    for (const auto& d : quant::packed_layout(*p.format, p.rows(), p.cols(), opt.with_g_idx && opt.with_g_idx(p))) {
      writer.declare(p.module + "." + d.suffix, d.dtype, d.shape);
      out_bytes += static_cast<uint64_t>(shape_numel(d.shape)) * dtype_size(d.dtype);
    }
    if (const auto* r = rotation_of(p)) {
      CALQ_CHECK(r->dim == p.cols(), "{}: rotation of width {} for input width {}", p.module, r->dim, p.cols());
      writer.declare(native::rotation_signs_name(p.module), DType::F32, {r->dim});
      out_bytes += static_cast<uint64_t>(r->dim) * 4;
    }
  }

  // nvfp4: modules that engines fuse into one GEMM (q/k/v, gate/up) must share the global scale,
  // so it is computed from the absmax over the whole fused group (of the rotated weights, when
  // the group is rotated: RTN + rotation rotates every module).
  std::map<std::string, float> fused_global;
  auto global_scale_for = [&](const TensorPlan& p) -> std::optional<float> {
    if (p.format->family != quant::Family::NVFP4) return std::nullopt;
    if (p.fuse_group.empty()) return std::nullopt;
    auto it = fused_global.find(p.fuse_group);
    if (it != fused_global.end()) return it->second;
    float amax = 0;
    for (const auto& q : res.plan)
      if (q.fuse_group == p.fuse_group && q.format && q.format->family == quant::Family::NVFP4)
      {
        auto wq = load_linear(ck, q);
        if (const auto* r = rotation_of(q)) r->apply_rows(wq.data(), q.rows());
        amax = std::max(amax, tensor_absmax(wq));
      }
    float g = quant::nvfp4_global_scale(amax);
    fused_global[p.fuse_group] = g;
    return g;
  };

  Progress bar("quantize", res.plan.size(), "tensors");
  bar.set_total_bytes(ck.total_bytes());
  for (const auto& p : res.plan) {
    const auto& info = ck.info(p.name);
    uint64_t nbytes = info.end - info.begin;
    in_bytes += nbytes;
    TensorResult tr;
    tr.name = p.name;
    double ts = now_s();
    if (!p.format) {
      std::optional<Tensor> r;
      if (opt.replace) r = opt.replace(p);
      if (r) {
        CALQ_CHECK(r->dtype == info.dtype && r->shape == info.shape, "{}: replacement has another dtype or shape",
                   p.name);
        writer.write(p.name, *r);
      } else {
        auto v = ck.view(p.name);
        writer.write(p.name, v.data, v.nbytes);
      }
    } else {
      std::optional<quant::QuantizedWeight> provided;
      if (opt.quantizer) provided = opt.quantizer(p);
      const quant::Rotation* rot = rotation_of(p);
      // The weights in fp32 only where something reads them: RTN, --validate.
      std::vector<float> w;
      if (!provided || opt.validate) w = load_linear(ck, p);
      if (rot) {
        if (!w.empty()) rot->apply_rows(w.data(), p.rows());  // W·R: what is quantized (and validated against)
        writer.write(native::rotation_signs_name(p.module), rot->signs.data(), rot->signs.size() * sizeof(float));
        tr.rotation = native::rotation_json(*rot, p.module);
      }
      quant::RtnOptions ro = opt.rtn;
      if (!ro.global_scale) ro.global_scale = global_scale_for(p);
      quant::QuantizedWeight q =
          provided ? std::move(*provided) : quant::rtn_quantize(w.data(), p.rows(), p.cols(), *p.format, ro, p.name);
      tr.saturated_scales = q.saturated_scales;
      if (q.saturated_scales > 0)
        log_warn("{}: {} group scale(s) exceeded the {} scale range and were clamped; their largest "
                 "weights clip (consider --override with fp8 or int8 for this module)",
                 p.name, q.saturated_scales, dtype_name(p.format->scale_dtype()));
      if (opt.validate) {
        auto deq = q.dequantize();
        tr.error = quant::weight_error(w.data(), deq.data(), static_cast<int64_t>(w.size()));
        tr.validated = true;
      }
      auto packed = quant::pack(q);
      for (auto& [suffix, t] : packed) writer.write(p.module + "." + suffix, t);
      tr.format = p.format->describe();
      tr.bits_per_weight = p.format->bits_per_weight();
      q_params += static_cast<uint64_t>(p.rows() * p.cols());
      q_bits += tr.bits_per_weight * static_cast<double>(p.rows() * p.cols());
    }
    ck.release(p.name);
    tr.seconds = now_s() - ts;
    res.tensors.push_back(tr);
    bar.advance(1, nbytes, p.name);
  }
  bar.finish();
  auto files = writer.finish();

  // config.json: the input's config with quantization_config added.
  std::vector<native::QuantizedModule> qmods;
  std::vector<std::string> ignored;
  for (const auto& p : res.plan) {
    if (p.format) qmods.push_back({p.module, *p.format, p.conv1d});
    else if (p.shape.size() == 2 && p.name.size() > 7 && p.name.compare(p.name.size() - 7, 7, ".weight") == 0)
      ignored.push_back(p.module);
  }
  nlohmann::json calq_extra = {{"version", CALQ_VERSION}, {"method", opt.method}};
  if (!rotations.empty()) {
    nlohmann::json rj = nlohmann::json::object();
    for (const auto& p : res.plan)
      if (const auto* r = rotation_of(p)) rj[p.module] = native::rotation_json(*r, p.module);
    calq_extra["rotations"] = rj;
  }
  for (auto& [k, v] : opt.config_extra.items()) calq_extra[k] = v;
  nlohmann::json cfg_out = cfg.raw;
  cfg_out["quantization_config"] = native::make_quantization_config(qmods, ignored, calq_extra);
  io::write_file_atomic(out.path() / "config.json", cfg_out.dump(2) + "\n");

  std::vector<std::string> copied;
  fs::path in_dir = fs::is_directory(opt.input) ? opt.input : opt.input.parent_path();
  for (const auto& e : fs::directory_iterator(in_dir)) {
    std::string fname = e.path().filename().string();
    if (e.is_regular_file() && is_passthrough_file(fname)) {
      fs::copy_file(e.path(), out.path() / fname, fs::copy_options::overwrite_existing);
      copied.push_back(fname);
    }
  }
  std::sort(copied.begin(), copied.end());

  // calq_report.json
  res.seconds = now_s() - t0;
  nlohmann::json rep;
  rep["calq_version"] = CALQ_VERSION;
  rep["command"] = opt.command_line;
  rep["input"] = fs::absolute(opt.input).string();
  rep["method"] = opt.method;
  rep["format"] = opt.plan.format.describe();
  rep["mixed_precision"] = opt.plan.preset.empty() ? nlohmann::json(nullptr) : nlohmann::json(opt.plan.preset);
  rep["clip_search"] = opt.rtn.clip_search;
  if (opt.rtn.clip_search)
    rep["clip_search_grid"] = {{"points", opt.rtn.clip_grid}, {"min_shrink", opt.rtn.clip_min}, {"norm", opt.rtn.clip_norm}};
  rep["files"] = files;
  rep["copied_files"] = copied;
  rep["total_params"] = total_params;
  rep["quantized_params"] = q_params;
  rep["bits_per_weight_quantized"] = q_params ? q_bits / static_cast<double>(q_params) : 0.0;
  rep["input_bytes"] = in_bytes;
  rep["output_tensor_bytes"] = out_bytes;
  rep["seconds"] = res.seconds;
  rep["peak_rss_bytes"] = peak_rss_bytes();
  rep["threads"] = omp_get_max_threads();
  nlohmann::json tens = nlohmann::json::array();
  for (size_t i = 0; i < res.plan.size(); ++i) {
    const auto& p = res.plan[i];
    const auto& r = res.tensors[i];
    nlohmann::json t = {{"name", p.name}, {"kind", kind_name(p.kind)}, {"shape", p.shape},
                        {"dtype", dtype_name(p.dtype)}, {"reason", p.reason}};
    if (p.format) {
      t["format"] = p.format->name();
      t["symmetric"] = p.format->symmetric;
      t["group_size"] = p.format->group_size;
      t["bits_per_weight"] = r.bits_per_weight;
      t["rotation"] = r.rotation;
      if (p.conv1d) t["conv1d"] = true;
      if (r.saturated_scales) t["saturated_scales"] = r.saturated_scales;
      if (r.validated)
        t["error"] = {{"rmse", r.error.rmse}, {"rel_fro", r.error.rel_fro}, {"max_abs", r.error.max_abs}};
    }
    t["seconds"] = r.seconds;
    tens.push_back(t);
  }
  rep["tensors"] = tens;
  for (auto& [k, v] : opt.report_extra.items()) rep[k] = v;
  io::write_file_atomic(out.path() / "calq_report.json", rep.dump(2) + "\n");
  res.report = rep;
  out.commit();
  return res;
}

}  // namespace calq::pipeline
