#include "calq/pipeline/calibrated.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <exception>
#include <chrono>
#include <cmath>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>

#include "calq/backend/device.h"
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

// Calibration sequences [s0, s0 + batch) (fewer at the end) as one batch.
engine::Batch chunk_batch(const data::CalibrationSet& cs, int64_t s0, int64_t batch) {
  const int64_t nb = std::min(batch, static_cast<int64_t>(cs.tokens.size()) - s0);
  engine::Batch b;
  b.batch = nb;
  b.seq = cs.seq_len;
  for (int64_t i = 0; i < nb; ++i) {
    b.tokens.insert(b.tokens.end(), cs.tokens[s0 + i].begin(), cs.tokens[s0 + i].end());
    b.lengths.push_back(cs.lengths[s0 + i]);
  }
  return b;
}

// The calibration sequences embedded, in chunks of at most `batch` sequences.
std::vector<engine::Activations> embed_chunks(const engine::Model& m, const data::CalibrationSet& cs, int64_t batch) {
  CALQ_CHECK(batch >= 1, "calibration batch must be at least 1");
  std::vector<engine::Activations> out;
  const int64_t n = static_cast<int64_t>(cs.tokens.size());
  for (int64_t s0 = 0; s0 < n; s0 += batch) out.push_back(m.embed(chunk_batch(cs, s0, batch)));
  return out;
}

// Calls `fn` for every input the observer sees.
struct FnObserver : engine::Observer {
  std::function<void(const engine::LinearInput&)> fn;
  std::function<bool(int64_t, int64_t)> all;  // engine::Observer::all_tokens (null: never)
  bool device = false;                        // engine::Observer::device_input
  std::function<bool(const engine::LinearInput&)> done;  // engine::Observer::done_after (null: never)
  void on_linear_input(const engine::LinearInput& in) override { fn(in); }
  bool done_after(const engine::LinearInput& in) const override { return done && done(in); }
  bool all_tokens(int64_t layer, int64_t expert) const override { return all && all(layer, expert); }
  bool device_input() const override { return device; }
};

// The Hessian of one shared input: a quant::HessianAccumulator fed with host inputs, or a
// backend::GpuHessian fed with the GPU engine's device inputs (same contract).
class InputHessian {
 public:
  static constexpr int64_t kExpertBlock = 512;
  explicit InputHessian(backend::HessianPrecision p) : prec_(p) {}
  // weight: null, or the rows' token weights (HessianAccumulator::add_weighted).
  void add(const engine::LinearInput& in, const uint8_t* mask, const float* weight) {
    if (in.x_device) {
      CALQ_CHECK(!host_, "{}: host and device inputs for one Hessian", in.modules.front());
      // An expert's accumulator takes 512-row blocks whatever the precision: a layer holds one per
      // expert input, and the larger tf32/bf16 blocks (up to 256 MiB of pending rows each) would
      // multiply by the expert count; an expert's routed rows rarely fill even 512 per pass.
      if (!gpu_) gpu_.emplace(in.cols, prec_, in.expert >= 0 ? kExpertBlock : 0);
      gpu_->add(in.x_device, in.rows, mask, weight, in.stream);
      return;
    }
    CALQ_CHECK(!gpu_, "{}: host and device inputs for one Hessian", in.modules.front());
    if (!host_) host_.emplace(in.cols);
    if (weight) host_->add_weighted(in.x, in.rows, mask, weight);
    else host_->add(in.x, in.rows, mask);
  }
  int64_t tokens() const { return gpu_ ? gpu_->tokens() : host_ ? host_->tokens() : 0; }
  std::vector<double> hessian() const {
    if (gpu_) return gpu_->hessian();
    CALQ_CHECK(host_.has_value(), "a Hessian without inputs");
    return host_->hessian();
  }
  double gpu_seconds() const { return gpu_ ? gpu_->gpu_seconds() : 0.0; }
  bool on_gpu() const { return gpu_.has_value(); }
  // GpuHessian::finish_on_device (on_gpu() only).
  backend::GpuHessian::OnDevice finish_on_device() { return gpu_->finish_on_device(); }

 private:
  backend::HessianPrecision prec_;
  std::optional<quant::HessianAccumulator> host_;
  std::optional<backend::GpuHessian> gpu_;
};

// MR-GPTQ's input moments from a host or a device input.
void add_moments(MomentAccumulator& m, const engine::LinearInput& in, const uint8_t* mask) {
  if (in.x_device) {
    const auto p = backend::cuda_power_sums(in.x_device, in.rows, in.cols, mask, in.stream);
    m.add_sums(p.s1, p.s2, p.s3, p.s4, p.n);
  } else {
    m.add(in.x, in.rows, in.cols, mask);
  }
}

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

CalibratedResults::CalibratedResults(std::shared_ptr<WorkDir> wd, std::vector<TensorPlan> plan) : wd_(std::move(wd)) {
  weights_ = wd_->weight_index();
  replaced_ = wd_->replaced_index();
  (void)plan;
}

std::optional<quant::QuantizedWeight> CalibratedResults::weight(const TensorPlan& p) const {
  auto it = weights_.find(p.name);
  if (it == weights_.end() || !p.format) return std::nullopt;
  return wd_->load_weight(it->second, p.name, *p.format);
}

bool CalibratedResults::has_g_idx(const TensorPlan& p) const {
  auto it = weights_.find(p.name);
  return it != weights_.end() && p.format && wd_->weight_has_g_idx(it->second, p.name);
}

std::map<std::string, quant::Rotation> CalibratedResults::rotations_by_module() const {
  std::map<std::string, quant::Rotation> out;
  for (auto& [name, r] : wd_->rotations()) out.emplace(name.substr(0, name.size() - 7), r);  // drop ".weight"
  return out;
}

std::optional<Tensor> CalibratedResults::replaced(const std::string& tensor) const {
  auto it = replaced_.find(tensor);
  if (it == replaced_.end()) return std::nullopt;
  return wd_->load_replaced(it->second, tensor);
}

namespace {

int64_t layer_of(const std::string& mod);

// What a layer function gets: the model and the activations entering the layer, either in a
// host store (RAM and spill files) or, with the GPU engine, in its device slots
// [slot0, slot0 + slots).
struct LayerCtx {
  engine::Model& m;
  const ActivationStore* acts = nullptr;  // null (and slots 0) when the method needs no calibration pass
  int64_t slot0 = 0, slots = 0;
  // One per host chunk when the layer's intermediate states are kept between passes (empty: not).
  std::vector<engine::LayerCache>* caches = nullptr;
  bool has_acts() const { return acts || slots > 0; }
  // Runs the layer (current weights) on a copy of every chunk with `obs` watching. `wanted`: the
  // modules whose inputs the observer needs (a kept state past any of them is not used); null: all.
  void observe(int64_t layer, engine::Observer& obs, const std::set<std::string>* wanted = nullptr) const {
    int max_start = 3;
    if (!wanted) max_start = 0;
    else
      for (const auto& mod : *wanted) max_start = std::min(max_start, m.layer_cache_stage(mod));
    if (slots > 0) {
      for (int64_t i = 0; i < slots; ++i) {
        engine::LayerCache* c = caches && !caches->empty() ? &(*caches)[static_cast<size_t>(i)] : nullptr;
        if (c) c->max_start = max_start;
        m.gpu_run(layer, slot0 + i, -1, &obs, c);
      }
      return;
    }
    for (size_t i = 0; i < acts->size(); ++i) {
      engine::Activations a = acts->get(i);
      engine::LayerCache* c = caches && !caches->empty() ? &(*caches)[i] : nullptr;
      if (c) c->max_start = max_start;
      m.run_layer(layer, a, &obs, c);
    }
  }
  // The same on the first chunk only.
  void observe_first(int64_t layer, engine::Observer& obs) const {
    if (slots > 0) return m.gpu_run(layer, slot0, -1, &obs);
    engine::Activations a = acts->get(0);
    m.run_layer(layer, a, &obs);
  }
};
using LayerFn = std::function<LayerOutput(int64_t layer, LayerCtx& ctx)>;
// Sets (set = true) or clears the engine weights that finished layer `layer` left for the layers
// after it (its quantized modules, dequantized), so that a resumed run can recompute the
// activations a GPU-resident run did not persist. Null: the method always persists them.
using LayerReplay = std::function<void(const WorkDir& wd, int64_t layer, bool set)>;
// Where the layer loop's own time went (seconds; calq_report.json gptq.stages): embedding the
// calibration and storing it (host store or GPU slots), recomputing a resumed run's activations,
// the pass that computes each layer's output, and the checkpoints.
struct LoopTimes {
  double embed = 0, replay = 0, output = 0, checkpoint = 0;
  // engine::LayerCache use: chunk runs that started at the attn / mid / act state, and the most
  // memory the kept states were allowed (bytes, over the layers).
  int64_t cache_reused[3] = {0, 0, 0};
  uint64_t cache_bytes = 0;
};

// The layer loop shared by the calibrated methods: checkpoints after every layer in the work
// directory, resumes from it, keeps activations within the memory budget (input and output of the
// running layer each get half of it). `fn` quantizes layer l and sets the engine's weights of the
// modules it quantized (their dequantized values), which are cleared once the layer's output is
// computed.
std::shared_ptr<WorkDir> run_layers(engine::Model& m, const CalibrationInputs* ci, int64_t batch,
                                    const RunStorage& st, bool quantized_inputs, const std::string& label,
                                    const LayerFn& fn, const LayerReplay& replay, std::shared_ptr<WorkDir> wd,
                                    LoopTimes* times);

std::shared_ptr<WorkDir> run_layerwise(engine::Model& m, const CalibrationInputs* ci, int64_t batch,
                                       const RunStorage& st, const json& manifest, bool quantized_inputs,
                                       const std::string& label, const LayerFn& fn,
                                       const LayerReplay& replay = nullptr, LoopTimes* times = nullptr) {
  auto wd = std::make_shared<WorkDir>(st.work_dir, manifest, st.resume, st.overwrite);
  try {
    return run_layers(m, ci, batch, st, quantized_inputs, label, fn, replay, wd, times);
  } catch (...) {
    // A run that failed before finishing any layer leaves nothing worth resuming; otherwise the
    // finished layers stay checkpointed (a failure inside a layer never touches its checkpoint:
    // WorkDir::finish_layer commits a layer atomically), and the user is told how to go on.
    const int64_t done = wd->completed_layers();
    if (done == 0)
      wd->remove();
    else
      log_warn("{} of {} layers are checkpointed in {}: after fixing the cause, run the same command with "
                "--resume to continue from layer {}",
                done, m.num_layers(), wd->path().string(), done);
    throw;
  }
}

std::shared_ptr<WorkDir> run_layers(engine::Model& m, const CalibrationInputs* ci, int64_t batch,
                                    const RunStorage& st, bool quantized_inputs, const std::string& label,
                                    const LayerFn& fn, const LayerReplay& replay, std::shared_ptr<WorkDir> wd,
                                    LoopTimes* times) {
  LoopTimes local;
  LoopTimes& tt = times ? *times : local;
  const int64_t L = m.num_layers();
  const int64_t start = wd->completed_layers();
  const uint64_t half = st.max_memory / 2;
  std::optional<ActivationStore> cur;
  // GPU-resident activations (docs/cuda.md, "Calibration on the GPU"): with the GPU engine and a
  // replay function, when a layer's input and output chunks fit in half the free GPU memory, they
  // stay in the engine's slots (input [base, base + n), output the other half) and are never
  // written to disk; a resumed run recomputes them from the finished layers instead.
  int64_t resident = 0, base = 0;  // chunk count when resident
  // Activations held on the host at a layer boundary, rounded as the GPU's bf16 slots store them
  // (--activation-precision bf16), so that where they live does not change the result.
  auto at_boundary = [&st](engine::Activations& a) {
    if (st.bf16_activations) engine::round_activations_bf16(a);
  };
  if (ci && start < L) {
    std::vector<engine::Activations> chunks;
    // A host-mode run persisted them; a GPU-resident one did not (its resume recomputes them).
    const bool persisted = start > 0 && fs::is_directory(wd->acts_dir(start)) && !fs::is_empty(wd->acts_dir(start));
    const double te = now_s();
    // Both activation sets of a layer boundary (input and output) in half the free GPU memory.
    const uint64_t set_bytes = static_cast<uint64_t>(ci->set.tokens.size()) * static_cast<uint64_t>(ci->set.seq_len) *
                               static_cast<uint64_t>(m.config().hidden_size) *
                               (st.bf16_activations ? sizeof(uint16_t) : sizeof(float));  // as the slots hold them
    const uint64_t gpu_free = m.on_gpu() ? backend::cuda_free_bytes() : 0;
    const bool fits_gpu = m.on_gpu() && replay && 2 * set_bytes <= gpu_free / 2;
    if (m.on_gpu() && replay && !fits_gpu)
      log_info("calibration activations ({} per layer boundary, input and output) do not fit half of the GPU's free "
               "memory ({}): they stay on the host and go up chunk by chunk (slower){}",
               format_bytes(static_cast<double>(set_bytes)), format_bytes(static_cast<double>(gpu_free)),
               st.bf16_activations ? "" : "; --activation-precision bf16 halves them");
    if (!persisted && fits_gpu && start == 0) {
      // A fresh GPU-resident run: each chunk is embedded into its slot (on the GPU where it can).
      const int64_t n = static_cast<int64_t>(ci->set.tokens.size());
      CALQ_CHECK(batch >= 1, "calibration batch must be at least 1");
      for (int64_t s0 = 0; s0 < n; s0 += batch) m.gpu_embed(resident++, chunk_batch(ci->set, s0, batch));
      log_info("calibration activations on the GPU: {} chunks, {} per layer boundary", resident,
               format_bytes(static_cast<double>(set_bytes)));
    } else if (!persisted) {
      chunks = embed_chunks(m, ci->set, batch);
      for (auto& a : chunks) at_boundary(a);
      if (start > 0) {
        const double tr = now_s();
        CALQ_CHECK(replay, "--resume: the activations entering layer {} are missing from {}", start,
                   wd->path().string());
        log_info("recomputing the activations entering layer {} from the {} finished layers", start, start);
        Progress rb("recompute", static_cast<uint64_t>(start), "layers");
        for (int64_t l = 0; l < start; ++l) {
          if (quantized_inputs) replay(*wd, l, true);
          for (auto& a : chunks) {
            m.run_layer(l, a);
            at_boundary(a);
          }
          if (quantized_inputs) replay(*wd, l, false);
          rb.advance(1, 0, fmt::format("layer {}", l));
        }
        rb.finish();
        tt.replay += now_s() - tr;
      }
      if (fits_gpu) {
        resident = static_cast<int64_t>(chunks.size());
        for (int64_t i = 0; i < resident; ++i) m.gpu_put(i, chunks[static_cast<size_t>(i)]);
        log_info("calibration activations on the GPU: {} chunks, {} per layer boundary", resident,
                 format_bytes(static_cast<double>(set_bytes)));
      } else {
        cur.emplace(wd->acts_dir(start), half, chunks.size());
        for (size_t i = 0; i < chunks.size(); ++i) cur->put(i, std::move(chunks[i]));
      }
    } else {
      cur.emplace(ActivationStore::open(wd->acts_dir(start), half));
    }
    tt.embed += now_s() - te - tt.replay;
    if (cur && cur->chunks_on_disk())
      log_info("{} of {} activation chunks spilled to {} (--max-memory {})", cur->chunks_on_disk(), cur->size(),
               cur->dir().string(), format_bytes(static_cast<double>(st.max_memory)));
  }
  const char* abort_env = std::getenv("CALQ_TEST_ABORT_AFTER_LAYER");
  const int64_t abort_after = abort_env ? std::atoll(abort_env) : -1;
  const char* fail_env = std::getenv("CALQ_TEST_FAIL_AT_LAYER");
  const int64_t fail_at = fail_env ? std::atoll(fail_env) : -1;
  Progress bar(label, static_cast<uint64_t>(L - start), "layers");
  for (int64_t l = start; l < L; ++l) {
    std::optional<ActivationStore> next;
    const int64_t out_base = resident - base;  // the other half of the slots
    // The layer's intermediate states kept between its passes: attn, mid, act in that order of
    // priority (each saves the most recomputation per byte) within the budget. Host chunks on the
    // CPU engine (default budget: a quarter of the available memory); the GPU engine's slots only
    // with an explicit --layer-cache-memory (not yet measured on a GPU).
    std::vector<engine::LayerCache> caches;
    const bool host_cache = cur && !m.on_gpu();
    const bool gpu_cache = resident > 0 && st.layer_cache_memory.has_value();
    if (st.layer_cache && (host_cache || gpu_cache)) {
      const uint64_t budget = st.layer_cache_memory ? *st.layer_cache_memory : mem_available_bytes() / 4;
      const uint64_t rows = static_cast<uint64_t>(ci->set.tokens.size()) * static_cast<uint64_t>(ci->set.seq_len);
      const auto widths = m.layer_cache_widths(l);
      bool keep[3] = {false, false, false};
      uint64_t used = 0;
      for (int s = 0; s < 3; ++s) {
        const uint64_t b = rows * static_cast<uint64_t>(widths[static_cast<size_t>(s)]) * sizeof(float);
        if (widths[static_cast<size_t>(s)] > 0 && used + b <= budget && (s == 0 || keep[s - 1])) {
          keep[s] = true;
          used += b;
        }
      }
      if (keep[0]) {
        caches.resize(host_cache ? cur->size() : static_cast<size_t>(resident));
        for (auto& c : caches) {
          c.keep_attn = keep[0];
          c.keep_mid = keep[1];
          c.keep_act = keep[2];
        }
        tt.cache_bytes = std::max(tt.cache_bytes, used);
      }
    }
    auto forward = [&] {
      const double tf = now_s();
      if (resident) {
        for (int64_t i = 0; i < resident; ++i) {
          engine::LayerCache* c = caches.empty() ? nullptr : &caches[static_cast<size_t>(i)];
          if (c) c->max_start = 3;
          m.gpu_run(l, base + i, out_base + i, nullptr, c);
        }
      } else {
        for (size_t i = 0; i < cur->size(); ++i) {
          engine::Activations a = cur->get(i);
          engine::LayerCache* c = caches.empty() ? nullptr : &caches[i];
          if (c) c->max_start = 3;
          m.run_layer(l, a, nullptr, c);
          at_boundary(a);
          next->put(i, std::move(a));
        }
      }
      tt.output += now_s() - tf;
    };
    if (cur) next.emplace(wd->acts_dir(l + 1), half, cur->size());
    if ((cur || resident) && !quantized_inputs) forward();
    LayerCtx ctx{m, cur ? &*cur : nullptr, base, resident, &caches};
    CALQ_CHECK(l != fail_at, "CALQ_TEST_FAIL_AT_LAYER={}: a failure injected in layer {}", fail_at, l);
    LayerOutput out = fn(l, ctx);
    if ((cur || resident) && quantized_inputs) forward();
    for (auto& [name, q] : out.weights) m.clear_weight(name.substr(0, name.size() - 7));
    for (const auto& c : caches)
      for (int s = 0; s < 3; ++s) tt.cache_reused[s] += c.reused[s];
    caches.clear();
    const double tc = now_s();
    // GPU-resident (or no calibration pass): nothing persisted, a resumed run recomputes them.
    wd->finish_layer(l, out, next ? &*next : nullptr);
    tt.checkpoint += now_s() - tc;
    if (resident) base = out_base;
    cur = std::move(next);
    bar.advance(1, 0, fmt::format("layer {}", l));
    if (l == abort_after) {
      log_warn("CALQ_TEST_ABORT_AFTER_LAYER={}: stopping as if killed", l);
      std::_Exit(75);
    }
  }
  if (resident) m.gpu_drop_slots();
  bar.finish();
  return wd;
}

json plan_identity(const std::vector<TensorPlan>& plan) {
  std::string desc;
  for (auto& p : plan) desc += p.name + "=" + (p.format ? p.format->describe() : "keep") + "\n";
  return data::sha256_hex(desc);
}

json calibration_identity(const CalibrationSpec& c, const CalibrationInputs& ci) {
  return {{"source", c.source},
          {"files", ci.provenance["files"]},
          {"sequences", ci.set.tokens.size()},
          {"seq_len", ci.set.seq_len},
          {"tokens", ci.set.real_tokens()},
          {"seed", c.select.seed},
          {"packing", ci.provenance["packing"]},
          {"batch", c.batch}};
}

json make_manifest(const fs::path& model_dir, const std::vector<TensorPlan>& plan, const json& identity,
                   const json& calibration) {
  return {{"calq_version", CALQ_VERSION},
          {"input", fs::absolute(model_dir).lexically_normal().string()},
          {"model", model_fingerprint(model_dir)},
          {"plan_sha256", plan_identity(plan)},
          {"options", identity},
          {"calibration", calibration}};
}

engine::Options engine_options(const RunStorage& st, const fs::path& model_dir) {
  engine::Options eo;
  if (!st.layerwise) {
    // fp32 weight cache when 4 bytes/param fit comfortably (a layer is run several times).
    uint64_t bytes = 0;
    auto ck = io::Checkpoint::open(model_dir);
    for (auto& n : ck.names()) bytes += static_cast<uint64_t>(shape_numel(ck.info(n).shape)) * 4;
    eo.cache_weights = bytes < mem_available_bytes() / 2;
  }
  return eo;
}

}  // namespace

CalibratedResults run_gptq(const fs::path& model_dir, const std::vector<TensorPlan>& plan,
                           const GptqPipelineOptions& opt, const json& identity, json& report) {
  const double t0 = now_s();
  engine::Options eo = engine_options(opt.storage, model_dir);
  // The calibration forward passes on the GPU (fp32, the CPU engine's arithmetic within 1e-5),
  // MoE layers included (routing, the per-expert observer feeds and all_tokens as on the CPU).
  if (opt.forward_cuda) {
    eo.device = backend::Device::Cuda;
    eo.gpu_precision = opt.forward_precision;
    eo.gpu_resident_layers = opt.gpu_layers;
    eo.bf16_slots = opt.storage.bf16_activations;
  }
  // GPU workers (--devices): GPTQ calls go to these ordinals, one worker each; this thread (the
  // GPU forward pass, the Hessians) works on the first.
  const std::vector<int> devices = opt.devices.empty() ? std::vector<int>{opt.gptq.device} : opt.devices;
  backend::CudaDeviceScope main_device(opt.gptq.cuda || eo.device == backend::Device::Cuda ? devices.front() : -1);
  // Hessians on the GPU from the engine's device inputs (no host copies), unless
  // CALQ_CUDA_HOST_HESSIANS=1 asks for the host accumulator (comparisons, debugging).
  const char* host_h_env = std::getenv("CALQ_CUDA_HOST_HESSIANS");
  const bool host_h = host_h_env && *host_h_env && std::string(host_h_env) != "0";
  // MoE models included: each expert input's routed rows (and routing weights) go into its own
  // GpuHessian, gathered on the GPU like a dense input's real rows.
  const bool device_h = eo.device == backend::Device::Cuda && !host_h;
  const backend::HessianPrecision hprec = opt.hessian_precision;
  // (The host accumulator is what exact reproduces, so exact is allowed here too.)
  CALQ_CHECK(device_h || hprec == backend::HessianPrecision::F32 || hprec == backend::HessianPrecision::Exact,
             "--hessian-precision {}: the Hessians accumulate on the host here (fp32 only); {} applies when the "
             "calibration forward passes run on the GPU (--device cuda, --forward-device cuda)",
             backend::hessian_precision_name(hprec), backend::hessian_precision_name(hprec));
  if (device_h) log_info("Hessians on the GPU ({} block products)", backend::hessian_precision_name(hprec));
  // Where the time went (this run's layers; calq_report.json gptq.stages).
  struct {
    double probe = 0, observe = 0, accumulate = 0, accumulate_gpu = 0, finalize = 0, quantize = 0, set_weights = 0;
  } tm;
  double load_s = now_s();
  auto m = engine::Model::load(model_dir, eo);
  load_s = now_s() - load_s;
  std::map<std::string, const TensorPlan*> by_module;
  for (auto& p : plan)
    if (p.format) by_module[p.module] = &p;
  double text_s = now_s();
  auto ci = load_calibration(model_dir, opt.calib);
  text_s = now_s() - text_s;
  report["calibration"] = ci.provenance;
  LoopTimes loop_times;

  // nvfp4: fused modules (q/k/v, gate/up) share the global scale of their original weights.
  std::map<std::string, float> fused_global;
  for (auto& p : plan) {
    if (!p.format || p.format->family != quant::Family::NVFP4 || p.fuse_group.empty()) continue;
    float amax = 0;
    for (float v : m.weight(p.module)) amax = std::max(amax, std::fabs(v));
    fused_global[p.fuse_group] = std::max(fused_global[p.fuse_group], amax);
  }
  for (auto& [g, a] : fused_global) a = quant::nvfp4_global_scale(a);

  ModuleQuantizer quantizer(opt.gptq, opt.mr, plan);  // GPTQ or MR-GPTQ per module (module_quant.h)
  auto fn = [&](int64_t l, LayerCtx& ctx) {
    LayerOutput out;
    // The inputs of this layer, in execution order, restricted to planned modules.
    std::vector<std::vector<std::string>> groups;
    {
      std::set<std::string> seen;
      FnObserver rec;
      rec.device = device_h;  // the probe reads only the module names: no copies
      rec.fn = [&](const engine::LinearInput& in) {
        std::vector<std::string> g;
        for (auto& mod : in.modules)
          if (by_module.count(mod)) g.push_back(mod);
        if (!g.empty() && seen.insert(g.front()).second) groups.push_back(g);
      };
      const double tp = now_s();
      ctx.observe_first(l, rec);
      tm.probe += now_s() - tp;
    }
    // Planned modules of this layer that the probe chunk did not reach (MoE experts none of its
    // tokens was routed to) get their groups from the shared-input rule: gate/up (w1/w3) of an
    // expert share one input, its down (w2) reads its own. Gate/up groups go first.
    {
      std::set<std::string> grouped;
      for (auto& g : groups) grouped.insert(g.begin(), g.end());
      std::vector<std::vector<std::string>> extra_first, extra_second;
      auto ends = [](const std::string& m, const char* suf) {
        const size_t n = std::strlen(suf);
        return m.size() >= n && m.compare(m.size() - n, n, suf) == 0;
      };
      for (auto& [mod, p] : by_module) {
        if (grouped.count(mod) || layer_of(mod) != l) continue;
        const std::string stem = mod.substr(0, mod.rfind('.') + 1);
        std::vector<std::string> g;
        bool first = false;
        for (auto [a, b] : {std::pair{"gate_proj", "up_proj"}, std::pair{"w1", "w3"}})
          if (ends(mod, a) || ends(mod, b)) {
            for (const char* x : {a, b})
              if (by_module.count(stem + x)) g.push_back(stem + x);
            first = true;
          }
        if (g.empty()) g.push_back(mod);
        for (auto& x : g) grouped.insert(x);
        (first ? extra_first : extra_second).push_back(g);
      }
      for (auto* v : {&extra_first, &extra_second})
        for (auto& g : *v) groups.push_back(g);
    }
    // Steps: true-sequential runs the groups in execution order, one pass each, except that the
    // experts of a MoE layer are independent given the router, so all experts' gate/up form one
    // step and all their downs another; otherwise one pass collects every group.
    auto stage_of = [](const std::string& mod) {
      const size_t e = mod.find(".experts.");
      if (e == std::string::npos) return mod;
      const size_t b = e + 9, d = mod.find('.', b);
      return mod.substr(0, b) + "*" + (d == std::string::npos ? "" : mod.substr(d));
    };
    std::vector<std::vector<size_t>> steps;
    if (opt.true_sequential) {
      std::map<std::string, size_t> step_of;
      for (size_t g = 0; g < groups.size(); ++g) {
        const std::string st = stage_of(groups[g].front());
        auto it = step_of.find(st);
        if (it == step_of.end()) {
          it = step_of.emplace(st, steps.size()).first;
          steps.emplace_back();
        }
        steps[it->second].push_back(g);
      }
    } else {
      steps.emplace_back();
      for (size_t g = 0; g < groups.size(); ++g) steps.back().push_back(g);
    }
    // MoE experts (docs/moe.md): the expert index of a module, -1 for none.
    auto expert_of = [](const std::string& mod) -> int64_t {
      const size_t e = mod.find(".experts.");
      if (e == std::string::npos) return -1;
      const size_t b = e + 9, d = mod.find('.', b);
      if (d == std::string::npos || d == b) return -1;
      for (size_t i = b; i < d; ++i)
        if (!std::isdigit(static_cast<unsigned char>(mod[i]))) return -1;
      return std::stoll(mod.substr(b, d - b));
    };
    const MoeCalibOptions& mo = opt.moe;
    const bool shared = mo.hessian == MoeCalibOptions::Hessian::Shared;
    const bool all_experts = mo.calibration == MoeCalibOptions::Calibration::AllExperts;
    const bool weighted = mo.token_weight == MoeCalibOptions::TokenWeight::Routing;
    // The engine gets a step's quantized weights when the step ends: every pass of the step (a
    // batch of experts, the blend pass) sees the same weights as an unbatched one would.
    std::vector<std::pair<std::string, std::vector<float>>> pending;
    std::vector<std::pair<std::string, ModuleQuantResult>> pending_device;  // Ŵ on the GPU (w_hat_device)
    // Records the results of `mods` (one shared input).
    auto finish_group = [&](const std::vector<std::string>& mods, std::vector<ModuleQuantResult> rs, int64_t tokens,
                            const json& extra) {
      for (size_t i = 0; i < mods.size(); ++i) {
        const TensorPlan& p = *by_module.at(mods[i]);
        ModuleQuantResult& r = rs[i];
        json entry = {{"module", mods[i]}, {"tokens", tokens}};
        entry.update(r.report);
        entry.update(extra);
        out.report.push_back(entry);
        out.weights.emplace(p.name, std::move(r.q));
        if (r.rotation) out.rotations.emplace(p.name, std::move(*r.rotation));
        // Ŵ in the original basis: no input transform needed.
        if (r.w_hat_device) pending_device.emplace_back(mods[i], std::move(r));
        else pending.emplace_back(mods[i], std::move(r.w_hat));
      }
    };
    auto global_of = [&](const TensorPlan& p) {
      std::optional<float> global;
      if (p.format->family == quant::Family::NVFP4 && fused_global.count(p.fuse_group))
        global = fused_global.at(p.fuse_group);
      return global;
    };
    for (auto& step : steps) {
      // The step's expert groups go in batches whose Hessians fit the budget (each batch one
      // observation pass); the other groups go with the first batch. Shared Hessians are one per
      // input position, so they never need more than one batch.
      std::vector<size_t> plain, expert_groups;
      for (size_t g : step) (expert_of(groups[g].front()) >= 0 ? expert_groups : plain).push_back(g);
      std::vector<std::vector<size_t>> batches{plain};
      {
        // Host Hessians: a quarter of the available memory; GPU Hessians: a quarter of the GPU's
        // free memory (the engine's weights and activations are already allocated).
        const uint64_t budget = mo.hessian_memory ? mo.hessian_memory
                                : device_h        ? backend::cuda_free_bytes() / 4
                                                  : mem_available_bytes() / 4;
        uint64_t used = 0;
        for (size_t g : expert_groups) {
          const auto n = static_cast<uint64_t>(by_module.at(groups[g].front())->cols());
          // fp64 sums + block rows (+ the host's fp32 block product)
          const uint64_t bytes = shared     ? 0
                                 : device_h ? n * n * 8 + n * InputHessian::kExpertBlock * 4
                                            : n * n * 12 + n * 512 * 4;
          if (used > 0 && used + bytes > budget && !batches.back().empty()) {
            batches.emplace_back();
            used = 0;
          }
          batches.back().push_back(g);
          used += bytes;
        }
      }
      for (const auto& batch : batches) {
        if (batch.empty()) continue;
        std::map<std::string, InputHessian> acc, every;  // statistics: routed (or pooled) / every token
        std::map<std::string, MomentAccumulator> moments, moments_every;  // MR-GPTQ: input kurtosis
        std::map<std::string, int64_t> routed;                            // expert key -> routed real tokens
        std::set<std::string> wanted;
        std::set<int64_t> batch_experts;
        for (size_t g : batch) {
          wanted.insert(groups[g].front());
          if (const int64_t e = expert_of(groups[g].front()); e >= 0) batch_experts.insert(e);
        }
        // Pass 1: routed statistics (all-experts: every token through every expert of the batch).
        std::set<std::string> every_keys;  // keys whose every-token feed this pass collects
        bool first_pass = true;
        FnObserver obs;
        obs.device = device_h;
        obs.all = [&](int64_t layer, int64_t e) {
          if (layer != l) return false;
          if (first_pass) return all_experts && batch_experts.count(e) > 0;
          for (auto& k : every_keys)
            if (expert_of(k) == e) return true;
          return false;
        };
        obs.fn = [&](const engine::LinearInput& in) {
          std::string key;
          for (auto& mod : in.modules)
            if (by_module.count(mod)) { key = mod; break; }
          if (key.empty() || !wanted.count(key)) return;
          const double ta = now_s();
          struct Timer {
            double t0;
            double& sum;
            ~Timer() { sum += now_s() - t0; }
          } timer{ta, tm.accumulate};
          auto mask = real_mask(in);
          const bool is_expert = in.expert >= 0;
          if (is_expert && !in.routed) {
            if (first_pass) {  // all-experts: the every-token feed is the statistic
              const std::string k = shared ? stage_of(key) : key;
              acc.try_emplace(k, hprec).first->second.add(in, mask.data(), nullptr);
              if (opt.mr.enabled) add_moments(moments[k], in, mask.data());
            } else if (every_keys.count(key)) {  // blend pass
              every.try_emplace(key, hprec).first->second.add(in, mask.data(), nullptr);
              if (opt.mr.enabled) add_moments(moments_every[key], in, mask.data());
            }
            return;
          }
          if (!first_pass) return;
          if (is_expert) {
            int64_t n = 0;
            for (int64_t r = 0; r < in.rows; ++r) n += mask[r] ? 1 : 0;
            routed[key] += n;
            if (all_experts) return;  // counted only: the every-token feed gave the statistics
          }
          const std::string k = is_expert && shared ? stage_of(key) : key;
          const bool use_weight = is_expert && weighted && in.routing_weight;
          acc.try_emplace(k, hprec).first->second.add(in, mask.data(), use_weight ? in.routing_weight : nullptr);
          if (opt.mr.enabled) add_moments(moments[k], in, mask.data());
        };
        // A batch of dense groups only needs the layer up to its last input: the pass stops there
        // (the observation passes' outputs are discarded). Expert inputs arrive in routing order,
        // so a batch with experts runs whole.
        {
          size_t last_g = 0;
          bool dense_only = true;
          for (size_t g : batch) {
            last_g = std::max(last_g, g);
            dense_only = dense_only && expert_of(groups[g].front()) < 0;
          }
          if (dense_only) {
            const std::string last = groups[last_g].back();
            obs.done = [l, last](const engine::LinearInput& in) {
              return in.layer == l && std::find(in.modules.begin(), in.modules.end(), last) != in.modules.end();
            };
          }
        }
        double to = now_s();
        ctx.observe(l, obs, &wanted);
        tm.observe += now_s() - to;
        obs.done = nullptr;
        // Pass 2 (routed per-expert statistics only): experts below --moe-min-tokens also get
        // every token for a Hessian to blend with.
        std::map<std::string, int64_t> blend_n;  // key -> N of the blend
        // An expert no token was routed to has no routed Hessian at all: it always takes the
        // every-token one (the blend with n = 0), also with --moe-min-tokens 0.
        if (!all_experts && !shared)
          for (size_t g : batch) {
            const std::string& key = groups[g].front();
            if (expert_of(key) < 0) continue;
            const int64_t N = std::max<int64_t>(1, mo.min_tokens < 0 ? by_module.at(key)->cols() : mo.min_tokens);
            if (routed[key] < N) {
              blend_n[key] = N;
              every_keys.insert(key);
            }
          }
        if (!every_keys.empty()) {
          first_pass = false;
          to = now_s();
          ctx.observe(l, obs, &wanted);
          tm.observe += now_s() - to;
        }

        // Shared Hessians, computed once per input position.
        std::map<std::string, std::vector<double>> shared_h;
        if (shared)
          for (auto& [k, a] : acc)
            if (k.find(".experts.*") != std::string::npos) shared_h.emplace(k, a.hessian());
        // Non-expert groups, in order; their modules are independent given the Hessians, so with
        // several --devices they are quantized in parallel, one worker per listed GPU.
        std::vector<size_t> jobs;
        struct ModuleJob {
          size_t group;  // index into `dense`
          size_t module; // index into the group's modules
        };
        struct DenseGroup {
          size_t g;
          int64_t tokens;
          std::vector<double> H;   // the Hessian, or its diagonal when h_device is set
          const double* h_device;  // GPTQ on the GPU with the Hessian on the GPU: no host copy
          const MomentAccumulator* moments;
          std::vector<ModuleQuantResult> rs;
        };
        std::vector<DenseGroup> dense;
        std::vector<ModuleJob> module_jobs;
        for (size_t g : batch) {
          const auto& mods = groups[g];
          if (expert_of(mods.front()) >= 0) {
            jobs.push_back(g);
            continue;
          }
          auto it = acc.find(mods.front());
          const int64_t tokens = it == acc.end() ? 0 : it->second.tokens();
          CALQ_CHECK(tokens >= opt.min_tokens,
                     "{} saw {} calibration tokens, fewer than --min-tokens {}: use more --samples or a lower --min-tokens",
                     mods.front(), tokens, opt.min_tokens);
          if (tokens == 0) {
            // Only reachable with --min-tokens 0: no Hessian exists, so RTN, said loudly.
            for (auto& mod : mods) {
              const TensorPlan& p = *by_module.at(mod);
              log_warn("{}: no calibration token reached it (--min-tokens 0); quantized with RTN", mod);
              const auto w = m.weight(mod);
              quant::RtnOptions ro;
              if (auto gs = global_of(p)) ro.global_scale = *gs;
              auto q = quant::rtn_quantize(w.data(), p.rows(), p.cols(), *p.format, ro, mod);
              pending.emplace_back(mod, q.dequantize());
              out.report.push_back({{"module", mod}, {"tokens", 0}, {"fallback", "rtn: no calibration tokens"}});
              out.weights.emplace(p.name, std::move(q));
            }
            continue;
          }
          const double th = now_s();
          auto mit = moments.find(mods.front());
          for (size_t i = 0; i < mods.size(); ++i) module_jobs.push_back({dense.size(), i});
          std::vector<double> H;
          const double* h_device = nullptr;
          if (opt.gptq.cuda && !opt.mr.enabled && it->second.on_gpu()) {
            // GPTQ on the GPU reads the Hessian where it was accumulated; only the diagonal comes
            // to the host (dead inputs, the act-order permutation, the damping).
            auto od = it->second.finish_on_device();
            CALQ_CHECK(od.finite, "{}: the Hessian has a non-finite value", mods.front());
            H = std::move(od.diag);
            h_device = od.data;
          } else {
            H = it->second.hessian();
          }
          dense.push_back({g, tokens, std::move(H), h_device, mit == moments.end() ? nullptr : &mit->second,
                           std::vector<ModuleQuantResult>(mods.size())});
          tm.finalize += now_s() - th;
        }
        {
          const double tq = now_s();
          const int workers = opt.gptq.cuda ? std::min<int>(static_cast<int>(devices.size()),
                                                            static_cast<int>(module_jobs.size()))
                                            : 1;
          std::vector<std::exception_ptr> errors(module_jobs.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(workers, 1)) if (workers > 1)
          for (size_t j = 0; j < module_jobs.size(); ++j) {
            try {
              DenseGroup& dg = dense[module_jobs[j].group];
              const TensorPlan& p = *by_module.at(groups[dg.g][module_jobs[j].module]);
              const int dev = opt.gptq.cuda ? devices[static_cast<size_t>(workers > 1 ? omp_get_thread_num() : 0)] : -1;
              dg.rs[module_jobs[j].module] =
                  quantizer.quantize(m, p, dg.H, dg.moments, global_of(p), dev, dg.h_device);
            } catch (...) {
              errors[j] = std::current_exception();
            }
          }
          for (auto& e : errors)
            if (e) std::rethrow_exception(e);
          tm.quantize += now_s() - tq;
          for (auto& dg : dense) finish_group(groups[dg.g], std::move(dg.rs), dg.tokens, json::object());
        }
        // Expert groups: independent given the router, quantized in parallel (each GPTQ single-
        // threaded inside), then handed to the engine in order.
        std::vector<std::vector<ModuleQuantResult>> results(jobs.size());
        std::vector<json> extras(jobs.size());
        // On the GPU: one worker per --devices entry.
        const int threads = std::max(
            1, std::min<int>(opt.gptq.cuda ? static_cast<int>(devices.size())
                                           : (mo.threads > 0 ? mo.threads : omp_get_max_threads()),
                             static_cast<int>(jobs.size())));
        const double tj = now_s();
        const int blas_threads = openblas_get_num_threads();
        if (threads > 1) openblas_set_num_threads(1);
        std::vector<std::exception_ptr> errors(jobs.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
        for (size_t j = 0; j < jobs.size(); ++j) {
          try {
            const auto& mods = groups[jobs[j]];
            const std::string& key = mods.front();
            const int64_t n = routed.count(key) ? routed.at(key) : 0;
            json extra = {{"expert", expert_of(key)}, {"routed_tokens", n}};
            std::vector<double> H;
            const MomentAccumulator* mom = nullptr;
            if (shared) {
              const std::string k = stage_of(key);
              CALQ_CHECK(shared_h.count(k), "{}: no calibration token reached any expert of this layer", key);
              H = shared_h.at(k);
              extra["hessian"] = all_experts ? "shared, all-experts" : "shared";
              if (moments.count(k)) mom = &moments.at(k);
            } else if (blend_n.count(key)) {
              const int64_t N = blend_n.at(key);
              CALQ_CHECK(every.count(key), "{}: the every-token pass did not reach it", key);
              H = every.at(key).hessian();
              if (n > 0) {
                const auto Hr = acc.at(key).hessian();
                const double a = static_cast<double>(n) / static_cast<double>(N);
                for (size_t i = 0; i < H.size(); ++i) H[i] = a * Hr[i] + (1 - a) * H[i];
              }
              extra["hessian"] = "blend";
              extra["blend_min_tokens"] = N;
              extra["blend_routed_share"] = static_cast<double>(n) / static_cast<double>(N);
              if (moments_every.count(key)) mom = &moments_every.at(key);
            } else {
              CALQ_CHECK(acc.count(key), "{}: no calibration statistics were collected", key);
              H = acc.at(key).hessian();
              extra["hessian"] = all_experts ? "all-experts" : "routed";
              if (moments.count(key)) mom = &moments.at(key);
            }
            const double t = now_s();
            const int dev = opt.gptq.cuda ? devices[static_cast<size_t>(threads > 1 ? omp_get_thread_num() : 0)] : -1;
            for (auto& mod : mods) {
              const TensorPlan& p = *by_module.at(mod);
              results[j].push_back(quantizer.quantize(m, p, H, mom, global_of(p), dev));
            }
            extra["expert_seconds"] = now_s() - t;
            extras[j] = std::move(extra);
          } catch (...) {
            errors[j] = std::current_exception();
          }
        }
        if (threads > 1) openblas_set_num_threads(blas_threads);
        tm.quantize += now_s() - tj;  // expert groups: their Hessians' finalization included
        for (auto& e : errors)
          if (e) std::rethrow_exception(e);
        for (size_t j = 0; j < jobs.size(); ++j) {
          const auto& mods = groups[jobs[j]];
          const int64_t tokens = extras[j]["routed_tokens"].get<int64_t>();
          if (extras[j]["hessian"] == "blend")
            log_warn("{}: {} routed calibration tokens, below --moe-min-tokens {}: Hessian blended with the "
                     "every-token one",
                     mods.front(), tokens, extras[j]["blend_min_tokens"].get<int64_t>());
          finish_group(mods, std::move(results[j]), tokens, extras[j]);
        }
        for (const auto* mp : {&acc, &every})
          for (const auto& [k, h] : *mp) tm.accumulate_gpu += h.gpu_seconds();
      }
      const double ts = now_s();
      for (auto& [mod, w] : pending) m.set_weight(mod, std::move(w));
      pending.clear();
      for (auto& [mod, r] : pending_device)
        m.set_weight_device(mod, r.w_hat_device.get(), r.w_hat_device_ordinal, std::move(r.w_hat_host));
      pending_device.clear();
      tm.set_weights += now_s() - ts;
    }
    return out;
  };
  json calib_id = calibration_identity(opt.calib, ci);
  // A resumed GPU-resident run recomputes its activations with the finished layers' weights as
  // the run had them: Ŵ = dequantize(Q) (rotated back for MR-GPTQ), bit for bit.
  LayerReplay replay = [&](const WorkDir& w, int64_t l, bool set) {
    const auto rotations = set ? w.rotations(l) : std::map<std::string, quant::Rotation>{};
    for (const auto& [name, layer] : w.weight_index()) {
      if (layer != l) continue;
      const std::string module = name.substr(0, name.size() - 7);  // drop ".weight"
      if (!set) {
        m.clear_weight(module);
        continue;
      }
      auto it = by_module.find(module);
      CALQ_CHECK(it != by_module.end(), "--resume: {} in {} is not in the plan", name, w.path().string());
      const auto q = w.load_weight(l, name, *it->second->format);
      std::vector<float> wh = q.dequantize();
      if (auto r = rotations.find(name); r != rotations.end()) r->second.apply_rows_inverse(wh.data(), q.rows);
      m.set_weight(module, std::move(wh));
    }
  };
  RunStorage storage = opt.storage;
  storage.layer_cache = opt.true_sequential;  // several passes per layer: keep their shared states
  auto wd = run_layerwise(m, &ci, opt.calib.batch, storage, make_manifest(model_dir, plan, identity, calib_id),
                          opt.quantized_inputs, "gptq", fn, replay, &loop_times);
  CalibratedResults res(wd, plan);
  // Planned modules the engine never fed (e.g. a quantized lm_head) fall back to RTN in the writer.
  json modules = json::array();
  for (int64_t l = 0; l < wd->completed_layers(); ++l)
    for (auto& r : wd->layer_report(l)) modules.push_back(r);
  for (auto& [mod, p] : by_module)
    if (!res.weight(*p)) log_warn("{}: no calibration input reaches it; quantized with RTN", mod);
  const double total = now_s() - t0;
  // Stage times: this run's wall-clock parts of the layer function; the model load (onto the GPU
  // with a GPU forward pass), the calibration text, its embedding and storage (host store or GPU
  // slots), a resumed run's recomputation, each layer's output pass and checkpoint; the rest; and
  // the per-module GPU GPTQ stages summed (quant::GptqStageTimes; every module of the report,
  // resumed layers too).
  const LoopTimes& lt = loop_times;
  json stages = {{"load_model", load_s},
                 {"calibration_text", text_s},
                 {"calibration_embed", lt.embed},
                 {"resume_recompute", lt.replay},
                 {"calibration_forward", tm.probe + tm.observe},
                 {"hessian_accumulate", tm.accumulate},
                 {"hessian_accumulate_gpu", tm.accumulate_gpu},
                 {"hessian_finalize", tm.finalize},
                 {"quantize", tm.quantize},
                 {"set_weights", tm.set_weights},  // inside "other": Ŵ handed to the engine
                 {"output_forward", lt.output},
                 {"checkpoint", lt.checkpoint},
                 {"other", total - load_s - text_s - lt.embed - lt.replay - tm.probe - tm.observe - tm.finalize -
                               tm.quantize - lt.output - lt.checkpoint}};
  {
    json gpu = json::object();
    for (const auto& r : modules)
      if (r.contains("stages"))
        for (const auto& [k, v] : r["stages"].items()) gpu[k] = gpu.value(k, 0.0) + v.get<double>();
    if (!gpu.empty()) stages["gptq_cuda"] = gpu;
  }
  report["gptq"] = {{"damp", opt.gptq.damp},
                    {"block_size", opt.gptq.block_size},
                    {"act_order", opt.gptq.act_order},
                    {"static_groups", opt.gptq.static_groups},
                    {"true_sequential", opt.true_sequential},
                    {"quantized_inputs", opt.quantized_inputs},
                    {"device", opt.gptq.cuda ? "cuda" : "cpu"},
                    {"devices", opt.gptq.cuda ? json(devices) : json::array()},
                    {"forward_device", eo.device == backend::Device::Cuda ? "cuda" : "cpu"},
                    {"forward_precision",
                     engine::precision_name(eo.device == backend::Device::Cuda ? opt.forward_precision
                                                                               : engine::Precision::F32)},
                    {"hessian_device", device_h ? "cuda" : "cpu"},
                    {"hessian_precision", backend::hessian_precision_name(hprec)},
                    {"activation_precision", opt.storage.bf16_activations ? "bf16" : "fp32"},
                    {"layer_cache",
                     {{"bytes", lt.cache_bytes},
                      {"runs_from_attn", lt.cache_reused[0]},
                      {"runs_from_mid", lt.cache_reused[1]},
                      {"runs_from_act", lt.cache_reused[2]}}},
                    {"seconds", total},
                    {"stages", stages},
                    {"modules", modules}};
  log_info("gptq stages: model load {:.2f} s, calibration text {:.2f} s, embedding {:.2f} s, forward {:.2f} s, Hessian "
           "accumulation {:.2f} s ({:.2f} s GPU), Hessian finalization {:.2f} s, quantization {:.2f} s, output passes "
           "{:.2f} s, checkpoints {:.2f} s, other {:.2f} s",
           load_s, text_s, lt.embed, stages["calibration_forward"].get<double>(), tm.accumulate, tm.accumulate_gpu,
           tm.finalize, tm.quantize, lt.output, lt.checkpoint, stages["other"].get<double>());
  if (const auto g = backend::cuda_memory_stats(); g.used) {
    report["gpu"] = {{"device", g.device},
                     {"peak_bytes", g.peak_bytes},
                     {"measured_peak_used_bytes", g.measured_peak_used_bytes},
                     {"total_bytes", g.total_bytes},
                     {"allocations", g.allocations}};
    log_info("GPU memory: peak {} held by calq ({} used on the device at most, of {}; {})",
             format_bytes(static_cast<double>(g.peak_bytes)), format_bytes(static_cast<double>(g.measured_peak_used_bytes)),
             format_bytes(static_cast<double>(g.total_bytes)), g.device);
  }
  report["storage"] = {{"work_dir", fs::absolute(opt.storage.work_dir).string()},
                       {"max_memory", opt.storage.max_memory},
                       {"layerwise", opt.storage.layerwise},
                       {"resumed", opt.storage.resume}};
  // MoE: tokens, Hessian and time of every expert, by layer, and every expert that fell back.
  {
    json layers = json::object(), fallback = json::array();
    for (const auto& r : modules) {
      if (!r.contains("expert")) continue;
      const std::string mod = r["module"];
      const std::string lk = std::to_string(layer_of(mod));
      const std::string ek = std::to_string(r["expert"].get<int64_t>());
      json& e = layers[lk][ek];
      const std::string leaf = mod.substr(mod.rfind('.') + 1);
      e["routed_tokens"] = r["routed_tokens"];
      e["seconds"] = e.value("seconds", 0.0) + r.value("seconds", 0.0);
      e["hessian"][leaf] = r["hessian"];
      if (r["hessian"] == "blend")
        fallback.push_back({{"module", mod},
                            {"routed_tokens", r["routed_tokens"]},
                            {"min_tokens", r["blend_min_tokens"]},
                            {"routed_share", r["blend_routed_share"]}});
    }
    if (!layers.empty()) {
      const auto& mo = opt.moe;
      report["moe"] = {
          {"calibration", mo.calibration == MoeCalibOptions::Calibration::AllExperts ? "all-experts" : "routed"},
          {"hessian", mo.hessian == MoeCalibOptions::Hessian::Shared ? "shared" : "per-expert"},
          {"token_weight", mo.token_weight == MoeCalibOptions::TokenWeight::Routing ? "routing" : "uniform"},
          {"min_tokens", mo.min_tokens < 0 ? json("auto") : json(mo.min_tokens)},
          {"layers", layers},
          {"fallback", fallback}};
      if (!fallback.empty())
        log_info("moe: {} expert input(s) below --moe-min-tokens got a blended Hessian (calq_report.json moe.fallback)",
                 fallback.size());
    }
  }
  if (opt.mr.enabled)
    report["mr_gptq"] = {{"hadamard", opt.mr.rotate},
                         {"hadamard_block", opt.mr.hadamard_block == 0 ? json("full") : json(opt.mr.hadamard_block)},
                         {"hadamard_seed", opt.mr.seed},
                         {"kurtosis_threshold", opt.mr.kurtosis_threshold ? json(*opt.mr.kurtosis_threshold) : json(nullptr)},
                         {"scale_search", {{"p", opt.mr.scale_search_p}, {"points", opt.mr.scale_grid}, {"min_shrink", opt.mr.scale_min}}},
                         {"act_order", true},
                         {"static_groups", true}};
  return res;
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

namespace calq::pipeline {

namespace {

// One input shared by `modules`, and where its scales fold: into a norm's weight (and bias), or
// into the rows (and bias) of the module producing it. kind None: nothing to fold into.
struct FoldGroup {
  enum Kind { None, Norm, Rows } kind = None;
  std::vector<std::string> modules;
  std::string norm_weight, norm_bias;  // tensor names (bias may be empty)
  std::string rows_module, rows_bias;  // module, tensor name (may be empty)
  std::string target() const { return kind == Norm ? norm_weight : kind == Rows ? rows_module : ""; }
};

// The fold groups of layer l, in processing order: an input folding into rows comes before the
// group that owns those rows (down before gate/up, o before q/k/v), so the owner is quantized
// with its rows already divided by the scales.
std::vector<FoldGroup> fold_groups(const io::ModelConfig& cfg, const io::Checkpoint& ck, int64_t l) {
  auto has = [&](const std::string& t) { return ck.contains(t); };
  auto opt = [&](const std::string& t) { return has(t) ? t : std::string(); };
  std::vector<FoldGroup> gs;
  if (cfg.arch == io::Arch::Gpt2) {
    std::string P;
    for (const char* pre : {"transformer.h.", "h."})
      if (has(fmt::format("{}{}.attn.c_attn.weight", pre, l))) P = fmt::format("{}{}.", pre, l);
    if (P.empty()) return gs;
    gs.push_back({FoldGroup::None, {P + "mlp.c_proj"}, "", "", "", ""});
    gs.push_back({FoldGroup::Norm, {P + "mlp.c_fc"}, P + "ln_2.weight", opt(P + "ln_2.bias"), "", ""});
    gs.push_back({FoldGroup::None, {P + "attn.c_proj"}, "", "", "", ""});
    gs.push_back({FoldGroup::Norm, {P + "attn.c_attn"}, P + "ln_1.weight", opt(P + "ln_1.bias"), "", ""});
    return gs;
  }
  const std::string P = fmt::format("model.layers.{}.", l);
  const bool mixtral = cfg.arch == io::Arch::Mixtral;
  if (cfg.is_moe() && cfg.layer_is_sparse(l)) {
    // Each expert as a small MLP of its own, with its routed tokens' statistics: down folds into
    // the same expert's up rows; gate/up read the normed hidden state that the router and every
    // other expert read too, so nothing can absorb a per-expert scale there (clip search only).
    const std::string X = P + (mixtral ? "block_sparse_moe.experts." : "mlp.experts.");
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      const std::string ep = X + std::to_string(e) + ".";
      const std::string gate = ep + (mixtral ? "w1" : "gate_proj"), up = ep + (mixtral ? "w3" : "up_proj"),
                        down = ep + (mixtral ? "w2" : "down_proj");
      gs.push_back({FoldGroup::Rows, {down}, "", "", up, ""});
      gs.push_back({FoldGroup::None, {gate, up}, "", "", "", ""});
    }
  } else if (has(P + "mlp.down_proj.weight")) {
    gs.push_back({FoldGroup::Rows, {P + "mlp.down_proj"}, "", "", P + "mlp.up_proj", opt(P + "mlp.up_proj.bias")});
    gs.push_back({FoldGroup::Norm, {P + "mlp.gate_proj", P + "mlp.up_proj"}, P + "post_attention_layernorm.weight", "",
                  "", ""});
  }
  const bool mha = cfg.num_key_value_heads == cfg.num_attention_heads;
  FoldGroup o{mha ? FoldGroup::Rows : FoldGroup::None, {P + "self_attn.o_proj"}, "", "", "", ""};
  if (mha) {
    o.rows_module = P + "self_attn.v_proj";
    o.rows_bias = opt(P + "self_attn.v_proj.bias");
  }
  gs.push_back(o);
  gs.push_back({FoldGroup::Norm, {P + "self_attn.q_proj", P + "self_attn.k_proj", P + "self_attn.v_proj"},
                P + "input_layernorm.weight", "", "", ""});
  return gs;
}

// Per-input statistics for the scale search: channel mean |x| and the second moment.
struct InputMoments {
  std::vector<double> mean_abs;
  quant::InputMoment h;
  int64_t tokens = 0;
};

// The decoder layer a module belongs to (".layers.N." or "h.N."), -1 for none.
int64_t layer_of(const std::string& mod) {
  for (const char* key : {"layers.", "h."}) {
    size_t pos = 0;
    while ((pos = mod.find(key, pos)) != std::string::npos) {
      if (pos == 0 || mod[pos - 1] == '.') {
        size_t b = pos + std::strlen(key), e = b;
        while (e < mod.size() && std::isdigit(static_cast<unsigned char>(mod[e]))) ++e;
        if (e > b && e < mod.size() && mod[e] == '.') return std::stoll(mod.substr(b, e - b));
      }
      pos += 1;
    }
  }
  return -1;
}

Tensor tensor_from_f32(const std::vector<float>& v, DType dt, const Shape& shape) {
  Tensor t(dt, shape);
  from_f32(v.data(), dt, t.bytes.data(), v.size());
  return t;
}

}  // namespace

CalibratedResults run_act_rtn(const fs::path& model_dir, const std::vector<TensorPlan>& plan, const ActRtnOptions& opt,
                              const json& identity, json& report) {
  const double t0 = now_s();
  auto m = engine::Model::load(model_dir, engine_options(opt.storage, model_dir));
  const io::ModelConfig& cfg = m.config();
  auto ck = io::Checkpoint::open(model_dir);
  std::map<std::string, const TensorPlan*> by_module;
  for (auto& p : plan)
    if (p.format) by_module[p.module] = &p;

  // Statistics: from activation_ranges.json, or collected layer by layer from calibration text.
  json stats_file;
  std::optional<CalibrationInputs> ci;
  json calib_id;
  if (!opt.stats_file.empty()) {
    std::ifstream f(opt.stats_file);
    CALQ_CHECK(f.good(), "--calibration {}: cannot read it", opt.stats_file.string());
    try {
      stats_file = json::parse(f);
    } catch (const std::exception& e) {
      fail("--calibration {}: not valid JSON ({})", opt.stats_file.string(), e.what());
    }
    CALQ_CHECK(stats_file.contains("detailed_stats") && stats_file["detailed_stats"].is_object(),
               "--calibration {}: no detailed_stats; expected the activation_ranges.json of `calq calibrate`",
               opt.stats_file.string());
    calib_id = {{"activation_ranges", fs::absolute(opt.stats_file).string()},
                {"sha256", data::sha256_file(opt.stats_file)}};
    report["calibration"] = calib_id;
  } else {
    ci = load_calibration(model_dir, opt.calib);
    report["calibration"] = ci->provenance;
    calib_id = calibration_identity(opt.calib, *ci);
  }
  auto file_moments = [&](const std::string& mod, int64_t cols) {
    const json& ds = stats_file["detailed_stats"];
    CALQ_CHECK(ds.contains(mod), "--calibration {}: no statistics for {} (was it written for this model?)",
               opt.stats_file.string(), mod);
    const json& e = ds[mod];
    CALQ_CHECK(e.contains("channel_mean_abs") && e.contains("channel_mean_sq"),
               "--calibration {}: {} lacks channel_mean_abs/channel_mean_sq; rerun `calq calibrate` (calq {} writes both)",
               opt.stats_file.string(), mod, CALQ_VERSION);
    InputMoments im;
    im.mean_abs = e["channel_mean_abs"].get<std::vector<double>>();
    auto sq = e["channel_mean_sq"].get<std::vector<double>>();
    CALQ_CHECK(static_cast<int64_t>(im.mean_abs.size()) == cols && static_cast<int64_t>(sq.size()) == cols,
               "--calibration {}: {} has {} channels, the model's module has {}", opt.stats_file.string(), mod,
               im.mean_abs.size(), cols);
    im.h.diagonal = true;
    im.h.h.assign(sq.begin(), sq.end());
    im.tokens = e.value("tokens", int64_t{0});
    return im;
  };

  auto fn = [&](int64_t l, LayerCtx& ctx) {
    LayerOutput out;
    const auto groups = fold_groups(cfg, ck, l);
    // Moments of every planned input of this layer, from one pass over the calibration chunks.
    std::map<std::string, InputMoments> moments;
    if (ci) {
      std::map<std::string, quant::HessianAccumulator> hacc;
      std::map<std::string, std::vector<double>> sum_abs;
      FnObserver obs;
      obs.fn = [&](const engine::LinearInput& in) {
        bool planned = false;
        for (auto& mod : in.modules) planned |= by_module.count(mod) > 0;
        if (!planned || !in.routed) return;  // experts: their routed tokens only
        const std::string& key = in.modules.front();
        auto mask = real_mask(in);
        auto it = hacc.find(key);
        if (it == hacc.end()) {
          it = hacc.emplace(key, quant::HessianAccumulator(in.cols)).first;
          sum_abs[key].assign(static_cast<size_t>(in.cols), 0.0);
        }
        it->second.add(in.x, in.rows, mask.data());
        auto& sa = sum_abs[key];
        for (int64_t r = 0; r < in.rows; ++r)
          if (mask[r])
            for (int64_t j = 0; j < in.cols; ++j) sa[j] += std::fabs(in.x[r * in.cols + j]);
      };
      ctx.observe(l, obs);
      for (auto& [key, acc] : hacc) {
        InputMoments im;
        im.tokens = acc.tokens();
        // An expert the router starves keeps plain RTN (said in the report), not an error.
        if (key.find(".experts.") != std::string::npos && im.tokens < std::max<int64_t>(opt.min_tokens, 1)) continue;
        CALQ_CHECK(im.tokens >= opt.min_tokens,
                   "{} saw {} calibration tokens, fewer than --min-tokens {}: use more --samples or a lower --min-tokens",
                   key, im.tokens, opt.min_tokens);
        const auto H = acc.hessian();
        im.h.h.assign(H.begin(), H.end());
        im.mean_abs = sum_abs[key];
        for (auto& v : im.mean_abs) v /= static_cast<double>(im.tokens);
        moments.emplace(key, std::move(im));
      }
    }
    std::map<std::string, std::vector<float>> w;         // working weights [out, in]
    std::map<std::string, std::vector<float>> row_scale; // rows divided by these (folded)
    auto weight = [&](const std::string& mod) -> std::vector<float>& {
      auto it = w.find(mod);
      if (it == w.end()) it = w.emplace(mod, m.weight(mod)).first;
      return it->second;
    };
    std::set<std::string> done;
    auto finish_module = [&](const std::string& mod, quant::QuantizedWeight q, const std::vector<float>& s) {
      // The engine gets Ŵ in the original basis: diag(row scale) · deq · diag(1/s).
      auto eff = q.dequantize();
      const int64_t rows = q.rows, cols = q.cols;
      auto rs = row_scale.count(mod) ? row_scale[mod] : std::vector<float>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          float& v = eff[r * cols + j];
          if (!s.empty()) v /= s[j];
          if (!rs.empty()) v *= rs[r];
        }
      m.set_weight(mod, std::move(eff));
      out.weights.emplace(mod + ".weight", std::move(q));
      done.insert(mod);
    };
    for (const auto& g : groups) {
      bool all_planned = true;
      for (auto& mod : g.modules) all_planned &= by_module.count(mod) > 0;
      bool any_planned = false;
      for (auto& mod : g.modules) any_planned |= by_module.count(mod) > 0;
      if (!any_planned) continue;
      FoldGroup::Kind kind = g.kind;
      std::string why;
      if (!all_planned) kind = FoldGroup::None, why = "not every module reading this input is quantized";
      if (kind == FoldGroup::Rows && !by_module.count(g.rows_module))
        kind = FoldGroup::None, why = g.rows_module + " is not quantized";
      if (kind == FoldGroup::None && why.empty())
        why = g.kind == FoldGroup::None ? "nothing to fold the scales into" : "";
      const TensorPlan& p0 = *by_module.at(g.modules.front());
      std::vector<std::string> mods;
      for (auto& mod : g.modules)
        if (by_module.count(mod)) mods.push_back(mod);
      bool same_format = true;
      for (auto& mod : mods) same_format &= by_module.at(mod)->format->describe() == p0.format->describe();
      if (kind != FoldGroup::None && !same_format) kind = FoldGroup::None, why = "modules of this input differ in format";
      if (kind != FoldGroup::None) {
        // Experts the router starved (fewer than --min-tokens routed tokens) keep plain RTN.
        // (Any other input without statistics stays an error: file_moments names it.)
        const std::string& key = g.modules.front();
        const bool expert = key.find(".experts.") != std::string::npos;
        const json& ds = ci ? json() : stats_file["detailed_stats"];
        const bool starved =
            expert && (ci ? !moments.count(key)
                          : !ds.contains(key) || ds[key].value("tokens", int64_t{0}) < opt.min_tokens);
        if (starved) kind = FoldGroup::None, why = fmt::format("too few routed calibration tokens (--min-tokens {})", opt.min_tokens);
      }
      json row = {{"modules", mods}, {"layer", l}};
      if (kind == FoldGroup::None) {
        // No scaling; the clip search still weights columns by the input's mean squares.
        std::vector<float> cw;
        if (ci && moments.count(g.modules.front())) {
          for (double v : quant::moment_diagonal(moments.at(g.modules.front()).h, p0.cols()))
            cw.push_back(static_cast<float>(v));
        } else if (!ci && stats_file["detailed_stats"].contains(g.modules.front())) {
          for (double v : file_moments(g.modules.front(), p0.cols()).h.h) cw.push_back(static_cast<float>(v));
        }
        for (auto& mod : mods) {
          const TensorPlan& p = *by_module.at(mod);
          auto& wm = weight(mod);
          quant::RtnOptions ro = opt.act.rtn;
          if (!cw.empty() && ro.clip_search && static_cast<int64_t>(cw.size()) == p.cols()) ro.col_weight = cw.data();
          finish_module(mod, quant::rtn_quantize(wm.data(), p.rows(), p.cols(), *p.format, ro, mod), {});
        }
        row["scaled"] = false;
        row["reason"] = why;
        out.report.push_back(row);
        continue;
      }
      const int64_t cols = p0.cols();
      InputMoments im = ci ? moments.at(g.modules.front()) : file_moments(g.modules.front(), cols);
      std::vector<quant::ActScaleModule> am;
      for (auto& mod : mods) am.push_back({weight(mod).data(), by_module.at(mod)->rows()});
      auto r = quant::act_scale_search(am, cols, im.h, im.mean_abs, *p0.format, opt.act, g.modules.front());
      std::vector<float> s = r.scales;
      std::vector<quant::QuantizedWeight> qs = std::move(r.q);
      if (r.alpha > 0 && kind == FoldGroup::Norm) {
        // Fold into the norm: g' = g/s rounded to the norm's dtype; then s' = g/g' makes the fold
        // exact, and the weights are quantized with s'.
        const auto& ni = ck.info(g.norm_weight);
        auto gw = to_f32_vector(ck.view(g.norm_weight));
        std::vector<float> gq(gw.size());
        for (int64_t j = 0; j < cols; ++j) gq[j] = gw[j] / s[j];
        Tensor gt = tensor_from_f32(gq, ni.dtype, ni.shape);
        auto gr = to_f32_vector(gt.view());
        for (int64_t j = 0; j < cols; ++j)
          if (gw[j] != 0 && gr[j] != 0 && std::isfinite(gr[j])) s[j] = gw[j] / gr[j];
        out.replaced.emplace(g.norm_weight, std::move(gt));
        if (!g.norm_bias.empty()) {
          const auto& bi = ck.info(g.norm_bias);
          auto b = to_f32_vector(ck.view(g.norm_bias));
          for (int64_t j = 0; j < cols; ++j) b[j] /= s[j];
          out.replaced.emplace(g.norm_bias, tensor_from_f32(b, bi.dtype, bi.shape));
        }
        quant::RtnOptions base = opt.act.rtn;
        base.clip_search = r.clipped;
        const auto ro = quant::group_rtn_options(am, cols, s, *p0.format, base);
        qs.clear();
        const auto diag = quant::moment_diagonal(im.h, cols);
        for (size_t i = 0; i < mods.size(); ++i)
          qs.push_back(quant::scaled_rtn(am[i], cols, s, *p0.format, ro, mods[i], &diag));
      } else if (r.alpha > 0 && kind == FoldGroup::Rows) {
        // Fold into the producing module's rows (and bias): exact in fp32 before it is quantized.
        auto& wr = weight(g.rows_module);
        for (int64_t o = 0; o < cols; ++o)
          for (int64_t j = 0, in = by_module.at(g.rows_module)->cols(); j < in; ++j) wr[o * in + j] /= s[o];
        row_scale[g.rows_module] = s;
        if (!g.rows_bias.empty()) {
          const auto& bi = ck.info(g.rows_bias);
          auto b = to_f32_vector(ck.view(g.rows_bias));
          for (int64_t j = 0; j < cols; ++j) b[j] /= s[j];
          out.replaced.emplace(g.rows_bias, tensor_from_f32(b, bi.dtype, bi.shape));
        }
      }
      for (size_t i = 0; i < mods.size(); ++i) finish_module(mods[i], std::move(qs[i]), r.alpha > 0 ? s : std::vector<float>());
      row["scaled"] = r.alpha > 0;
      row["alpha"] = r.alpha;
      row["fold"] = g.target();
      row["output_error"] = r.error;
      row["output_error_rtn"] = r.error_plain;
      row["clipped"] = r.clipped;
      row["tokens"] = im.tokens;
      out.report.push_back(row);
    }
    // Planned modules of this layer outside every group (a router that --override quantizes) get plain RTN.
    for (auto& [mod, p] : by_module) {
      if (done.count(mod) || layer_of(mod) != l) continue;
      auto& wm = weight(mod);
      finish_module(mod, quant::rtn_quantize(wm.data(), p->rows(), p->cols(), *p->format, opt.act.rtn, mod), {});
      out.report.push_back({{"modules", {mod}}, {"layer", l}, {"scaled", false}, {"reason", "no shared-input group"}});
    }
    return out;
  };
  auto wd = run_layerwise(m, ci ? &*ci : nullptr, opt.calib.batch, opt.storage,
                          make_manifest(model_dir, plan, identity, calib_id), true, "act-rtn", fn);
  CalibratedResults res(wd, plan);
  json groups = json::array();
  for (int64_t l = 0; l < wd->completed_layers(); ++l)
    for (auto& r : wd->layer_report(l)) groups.push_back(r);
  report["act_scale"] = {{"grid", opt.act.grid}, {"seconds", now_s() - t0}, {"inputs", groups}};
  return res;
}

}  // namespace calq::pipeline
