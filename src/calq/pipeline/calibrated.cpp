#include "calq/pipeline/calibrated.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include "calq/calib/stats.h"
#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/data/fetch.h"
#include "calq/engine/engine.h"
#include "calq/io/atomic.h"
#include "calq/io/safetensors.h"
#include "calq/pipeline/module_quant.h"
#include "calq/quant/hessian.h"
#include "calq/text/tokenizer.h"

namespace calq::pipeline {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The calibration sequences embedded, in chunks of at most `batch` sequences.
std::vector<engine::Activations> embed_chunks(const engine::Model& m, const data::CalibrationSet& cs, int64_t batch) {
  CALQ_CHECK(batch >= 1, "calibration batch must be at least 1");
  std::vector<engine::Activations> out;
  const int64_t n = static_cast<int64_t>(cs.tokens.size());
  for (int64_t s0 = 0; s0 < n; s0 += batch) {
    const int64_t nb = std::min(batch, n - s0);
    engine::Batch b;
    b.batch = nb;
    b.seq = cs.seq_len;
    for (int64_t i = 0; i < nb; ++i) {
      b.tokens.insert(b.tokens.end(), cs.tokens[s0 + i].begin(), cs.tokens[s0 + i].end());
      b.lengths.push_back(cs.lengths[s0 + i]);
    }
    out.push_back(m.embed(b));
  }
  return out;
}

// Calls `fn` for every input the observer sees.
struct FnObserver : engine::Observer {
  std::function<void(const engine::LinearInput&)> fn;
  void on_linear_input(const engine::LinearInput& in) override { fn(in); }
};

// Row mask of the real tokens of an observed input (expert inputs only hold routed real tokens).
std::vector<uint8_t> real_mask(const engine::LinearInput& in) {
  std::vector<uint8_t> m(static_cast<size_t>(in.rows), 1);
  if (in.real)
    for (int64_t r = 0; r < in.rows; ++r) m[r] = in.real[r];
  return m;
}

}  // namespace

CalibrationInputs load_calibration(const fs::path& model_dir, const CalibrationSpec& spec) {
  auto tok = text::load_tokenizer(model_dir);
  auto ds = data::Dataset::load(spec.source, spec.load);
  CalibrationInputs ci;
  ci.set = data::make_calibration_set(ds, *tok, spec.select);
  json files = json::array();
  std::vector<std::string> paths;
  if (ds.metadata.contains("file")) paths.push_back(ds.metadata["file"]);
  if (ds.metadata.contains("files"))
    for (auto& f : ds.metadata["files"]) paths.push_back(f);
  if (paths.empty() && fs::is_regular_file(spec.source)) paths.push_back(spec.source);
  for (auto& p : paths) files.push_back({{"path", p}, {"sha256", data::sha256_file(p)}});
  ci.provenance = {{"source", spec.source},
                   {"dataset", ds.name},
                   {"files", files},
                   {"samples_in_source", ds.samples.size()},
                   {"sequences", ci.set.tokens.size()},
                   {"seq_len", ci.set.seq_len},
                   {"tokens", ci.set.real_tokens()},
                   {"packing", spec.select.packing == data::Packing::Concatenate ? "concatenate" : "per-sample"},
                   {"seed", spec.select.seed},
                   {"samples_used", ci.set.samples_used},
                   {"duplicates_removed", ci.set.duplicates_removed},
                   {"tokenizer", tok->describe()}};
  log_info("calibration: {} sequences × {} tokens from {} ({} real tokens)", ci.set.tokens.size(), ci.set.seq_len,
           spec.source, ci.set.real_tokens());
  return ci;
}

json calibrate_model(const CalibrateOptions& opt) {
  const double t0 = now_s();
  auto m = engine::Model::load(opt.input);
  auto ci = load_calibration(opt.input, opt.calib);
  auto hs = embed_chunks(m, ci.set, opt.calib.batch);
  calib::StatsCollector stats;
  std::map<std::string, quant::HessianAccumulator> hess;
  std::map<std::string, std::vector<std::string>> hess_modules;
  FnObserver obs;
  obs.fn = [&](const engine::LinearInput& in) {
    auto mask = real_mask(in);
    stats.add(in.modules, in.x, in.rows, in.cols, mask.data());
    if (opt.hessians) {
      auto it = hess.find(in.modules.front());
      if (it == hess.end()) {
        it = hess.emplace(in.modules.front(), quant::HessianAccumulator(in.cols)).first;
        hess_modules[in.modules.front()] = in.modules;
      }
      it->second.add(in.x, in.rows, mask.data());
    }
  };
  Progress bar("calibrate", static_cast<uint64_t>(m.num_layers()), "layers");
  for (int64_t l = 0; l < m.num_layers(); ++l) {
    for (auto& h : hs) m.run_layer(l, h, &obs);
    bar.advance(1);
  }
  bar.finish();

  io::AtomicDir out(opt.output, opt.overwrite);
  io::write_file_atomic(out.path() / "activation_ranges.json",
                        stats.activation_ranges(opt.percentile, opt.smooth_factor).dump(1) + "\n");
  io::write_file_atomic(out.path() / "ranges_minmax.json", stats.ranges_minmax().dump(1) + "\n");
  json rep = {{"calq_version", CALQ_VERSION},
              {"command", opt.command_line},
              {"model", fs::absolute(opt.input).string()},
              {"calibration", ci.provenance},
              {"modules", stats.modules().size()},
              {"percentile", opt.percentile}};
  if (opt.hessians) {
    io::SafetensorsWriter w(out.path(), 1ull << 40, {{"format", "calq-hessians"}});
    json index = json::object();
    for (auto& [key, acc] : hess) {
      w.declare(key + ".hessian", DType::F64, {acc.features(), acc.features()});
      index[key] = {{"modules", hess_modules[key]}, {"tokens", acc.tokens()}};
    }
    for (auto& [key, acc] : hess) {
      auto h = acc.hessian();
      w.write(key + ".hessian", h.data(), h.size() * sizeof(double));
    }
    auto files = w.finish();
    CALQ_CHECK(files.size() == 1, "hessians: expected one file");
    fs::rename(out.path() / files[0], out.path() / "hessians.safetensors");
    io::write_file_atomic(out.path() / "hessians.json", index.dump(1) + "\n");
    rep["hessians"] = {{"file", "hessians.safetensors"}, {"inputs", hess.size()}};
  }
  if (!opt.imatrix.empty()) {
    std::vector<std::string> names;
    for (auto& f : ci.provenance["files"]) names.push_back(fs::path(f["path"].get<std::string>()).filename().string());
    if (names.empty()) names.push_back(opt.calib.source);
    stats.write_imatrix(opt.imatrix, m.config(), names, static_cast<int64_t>(ci.set.tokens.size()), ci.set.seq_len);
    rep["imatrix"] = fs::absolute(opt.imatrix).string();
  }
  rep["seconds"] = now_s() - t0;
  rep["peak_rss_bytes"] = peak_rss_bytes();
  io::write_file_atomic(out.path() / "calq_calibration_report.json", rep.dump(2) + "\n");
  out.commit();
  return rep;
}

std::map<std::string, quant::QuantizedWeight> run_gptq(const fs::path& model_dir, const std::vector<TensorPlan>& plan,
                                                       const GptqPipelineOptions& opt, json& report,
                                                       std::map<std::string, quant::Rotation>* rotations) {
  const double t0 = now_s();
  auto m = engine::Model::load(model_dir);
  std::map<std::string, const TensorPlan*> by_module;
  for (auto& p : plan)
    if (p.format) by_module[p.module] = &p;
  auto ci = load_calibration(model_dir, opt.calib);
  report["calibration"] = ci.provenance;
  auto hs = embed_chunks(m, ci.set, opt.calib.batch);

  // nvfp4: fused modules (q/k/v, gate/up) share the global scale of their original weights.
  std::map<std::string, float> fused_global;
  for (auto& p : plan) {
    if (!p.format || p.format->family != quant::Family::NVFP4 || p.fuse_group.empty()) continue;
    float amax = 0;
    for (float v : m.weight(p.module)) amax = std::max(amax, std::fabs(v));
    fused_global[p.fuse_group] = std::max(fused_global[p.fuse_group], amax);
  }
  for (auto& [g, a] : fused_global) a = quant::nvfp4_global_scale(a);

  std::map<std::string, quant::QuantizedWeight> results;
  ModuleQuantizer quantizer(opt.gptq, opt.mr, plan);  // GPTQ or MR-GPTQ per module (module_quant.h)
  json modules = json::array();
  Progress bar("gptq", static_cast<uint64_t>(m.num_layers()), "layers");
  for (int64_t l = 0; l < m.num_layers(); ++l) {
    // The inputs of this layer, in execution order, restricted to planned modules.
    std::vector<std::vector<std::string>> groups;
    {
      std::set<std::string> seen;
      FnObserver rec;
      rec.fn = [&](const engine::LinearInput& in) {
        std::vector<std::string> g;
        for (auto& mod : in.modules)
          if (by_module.count(mod)) g.push_back(mod);
        if (!g.empty() && seen.insert(g.front()).second) groups.push_back(g);
      };
      engine::Activations probe = hs.front();
      m.run_layer(l, probe, &rec);
    }
    std::vector<engine::Activations> next;
    if (!opt.quantized_inputs) {
      next = hs;
      for (auto& h : next) m.run_layer(l, h);
    }
    // Steps: each group alone (true-sequential) or all groups from one pass.
    std::vector<std::vector<size_t>> steps;
    if (opt.true_sequential)
      for (size_t g = 0; g < groups.size(); ++g) steps.push_back({g});
    else {
      steps.emplace_back();
      for (size_t g = 0; g < groups.size(); ++g) steps.back().push_back(g);
    }
    for (auto& step : steps) {
      std::map<std::string, quant::HessianAccumulator> acc;
      std::map<std::string, MomentAccumulator> moments;  // MR-GPTQ: input kurtosis
      std::set<std::string> wanted;
      for (size_t g : step) wanted.insert(groups[g].front());
      FnObserver obs;
      obs.fn = [&](const engine::LinearInput& in) {
        std::string key;
        for (auto& mod : in.modules)
          if (by_module.count(mod)) { key = mod; break; }
        if (key.empty() || !wanted.count(key)) return;
        auto mask = real_mask(in);
        auto it = acc.find(key);
        if (it == acc.end()) it = acc.emplace(key, quant::HessianAccumulator(in.cols)).first;
        it->second.add(in.x, in.rows, mask.data());
        if (opt.mr.enabled) moments[key].add(in.x, in.rows, in.cols, mask.data());
      };
      for (auto& h : hs) {
        engine::Activations copy = h;
        m.run_layer(l, copy, &obs);
      }
      for (size_t g : step) {
        const auto& mods = groups[g];
        auto it = acc.find(mods.front());
        const int64_t tokens = it == acc.end() ? 0 : it->second.tokens();
        CALQ_CHECK(tokens >= opt.min_tokens,
                   "{} saw {} calibration tokens, fewer than --min-tokens {}: use more --samples or a lower --min-tokens",
                   mods.front(), tokens, opt.min_tokens);
        const auto H = it->second.hessian();
        for (auto& mod : mods) {
          const TensorPlan& p = *by_module.at(mod);
          std::optional<float> global;
          if (p.format->family == quant::Family::NVFP4 && fused_global.count(p.fuse_group))
            global = fused_global[p.fuse_group];
          auto mit = moments.find(mods.front());
          auto r = quantizer.quantize(m, p, H, mit == moments.end() ? nullptr : &mit->second, global);
          m.set_weight(mod, std::move(r.w_hat));  // Ŵ in the original basis: no input transform needed
          json entry = {{"module", mod}, {"tokens", tokens}};
          entry.update(r.report);
          modules.push_back(entry);
          results.emplace(p.name, std::move(r.q));
          if (r.rotation) {
            CALQ_CHECK(rotations, "{}: MR-GPTQ rotated the module but the caller takes no rotations", mod);
            rotations->emplace(mod, std::move(*r.rotation));
          }
        }
      }
    }
    if (opt.quantized_inputs)
      for (auto& h : hs) m.run_layer(l, h);
    else
      hs = std::move(next);
    bar.advance(1, 0, fmt::format("layer {}", l));
  }
  bar.finish();
  // Planned modules the engine never fed (e.g. a quantized lm_head) fall back to RTN in the writer.
  for (auto& [mod, p] : by_module)
    if (!results.count(p->name)) log_warn("{}: no calibration input reaches it; quantized with RTN", mod);
  report["gptq"] = {{"damp", opt.gptq.damp},
                    {"block_size", opt.gptq.block_size},
                    {"act_order", opt.gptq.act_order},
                    {"static_groups", opt.gptq.static_groups},
                    {"true_sequential", opt.true_sequential},
                    {"quantized_inputs", opt.quantized_inputs},
                    {"seconds", now_s() - t0},
                    {"modules", modules}};
  if (opt.mr.enabled)
    report["mr_gptq"] = {{"hadamard", opt.mr.rotate},
                         {"hadamard_block", opt.mr.hadamard_block == 0 ? json("full") : json(opt.mr.hadamard_block)},
                         {"hadamard_seed", opt.mr.seed},
                         {"kurtosis_threshold", opt.mr.kurtosis_threshold ? json(*opt.mr.kurtosis_threshold) : json(nullptr)},
                         {"scale_search", {{"p", opt.mr.scale_search_p}, {"points", opt.mr.scale_grid}, {"min_shrink", opt.mr.scale_min}}},
                         {"act_order", true},
                         {"static_groups", true}};
  return results;
}

std::vector<LayerErrorRow> layer_error(const fs::path& quantized, const fs::path& base, const CalibrationSpec& spec) {
  auto bm = engine::Model::load(base);
  auto qm = engine::Model::load(quantized);
  auto ci = load_calibration(base, spec);
  auto hs = embed_chunks(bm, ci.set, spec.batch);
  struct Acc {
    double num = 0, den = 0;
    int64_t tokens = 0;
  };
  std::map<std::string, Acc> acc;
  std::map<std::string, std::pair<std::vector<float>, std::vector<float>>> weights;
  std::vector<std::string> order;
  FnObserver obs;
  obs.fn = [&](const engine::LinearInput& in) {
    auto mask = real_mask(in);
    for (auto& mod : in.modules) {
      auto wit = weights.find(mod);
      if (wit == weights.end()) {
        auto wq = qm.weight(mod);
        if (const auto* r = qm.source().rotation(mod))  // stored as W·R: back to the original basis
          r->apply_rows_inverse(wq.data(), static_cast<int64_t>(wq.size()) / r->dim);
        wit = weights.emplace(mod, std::make_pair(bm.weight(mod), std::move(wq))).first;
        order.push_back(mod);
      }
      const auto& [w, wq] = wit->second;
      const int64_t out = static_cast<int64_t>(w.size()) / in.cols;
      std::vector<float> y(static_cast<size_t>(in.rows * out)), yq(y.size());
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(in.rows), static_cast<int>(out),
                  static_cast<int>(in.cols), 1.f, in.x, static_cast<int>(in.cols), w.data(), static_cast<int>(in.cols),
                  0.f, y.data(), static_cast<int>(out));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(in.rows), static_cast<int>(out),
                  static_cast<int>(in.cols), 1.f, in.x, static_cast<int>(in.cols), wq.data(), static_cast<int>(in.cols),
                  0.f, yq.data(), static_cast<int>(out));
      Acc& a = acc[mod];
      for (int64_t r = 0; r < in.rows; ++r) {
        if (!mask[r]) continue;
        ++a.tokens;
        for (int64_t o = 0; o < out; ++o) {
          const double d = static_cast<double>(y[r * out + o]) - yq[r * out + o];
          a.num += d * d;
          a.den += static_cast<double>(y[r * out + o]) * y[r * out + o];
        }
      }
    }
  };
  Progress bar("layer-error", static_cast<uint64_t>(bm.num_layers()), "layers");
  for (int64_t l = 0; l < bm.num_layers(); ++l) {
    for (auto& h : hs) bm.run_layer(l, h, &obs);
    for (auto it = weights.begin(); it != weights.end();) it = weights.erase(it);  // free this layer's copies
    bar.advance(1);
  }
  bar.finish();
  std::vector<LayerErrorRow> rows;
  for (auto& mod : order) {
    const Acc& a = acc[mod];
    rows.push_back({mod, a.den > 0 ? std::sqrt(a.num / a.den) : 0.0, a.tokens});
  }
  return rows;
}

}  // namespace calq::pipeline
