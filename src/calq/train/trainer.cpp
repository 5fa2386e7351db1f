#include "calq/train/trainer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/data/dataset.h"
#include "calq/eval/driver.h"
#include "calq/export/native.h"
#include "calq/io/atomic.h"
#include "calq/io/safetensors.h"
#include "calq/text/tokenizer.h"
#include "calq/train/ops.h"

namespace calq::train {

int prt_lower_bound(const std::vector<double>& acc, int first_bits, double threshold) {
  CALQ_CHECK(!acc.empty(), "precision range test: no precision was measured");
  int best = -1;
  double best_gain = 0;
  for (size_t i = 1; i < acc.size(); ++i) {
    const double gain = acc[i] - acc[i - 1];
    if (gain > threshold) return first_bits + static_cast<int>(i);
    if (best < 0 || gain > best_gain) {
      best = static_cast<int>(i);
      best_gain = gain;
    }
  }
  return first_bits + (best < 0 ? static_cast<int>(acc.size()) - 1 : best);
}

namespace fs = std::filesystem;

namespace {

using Unit = CyclicPrecisionScheduler::Unit;

void validate(const TrainOptions& o) {
  CALQ_CHECK(!o.model.empty(), "--model is required (a Hugging Face model directory)");
  CALQ_CHECK(!o.output.empty(), "--output is required (the adapter directory to write)");
  CALQ_CHECK(o.method == "cpt" || o.method == "static",
             "--method '{}' is not known; use cpt (cyclic precision) or static (fixed precision QAT)", o.method);
  check_bits(o.min_bits, "--bits (minimum)");
  check_bits(o.max_bits, "--bits (maximum)");
  CALQ_CHECK(o.min_bits <= o.max_bits, "--bits {}:{}: the minimum is larger than the maximum; write MIN:MAX",
             o.min_bits, o.max_bits);
  CALQ_CHECK((o.epochs > 0) != (o.steps > 0), "give exactly one of --epochs N or --steps N (got epochs {}, steps {})",
             o.epochs, o.steps);
  CALQ_CHECK(o.schedule == Unit::Iteration || o.epochs > 0, "--schedule epoch needs --epochs");
  CALQ_CHECK(o.quant.input_bits == 0 || o.quant.quantize_inputs, "--input-bits needs --quantize-inputs");
  CALQ_CHECK(o.batch >= 1 && o.grad_accum >= 1, "--batch and --grad-accum must be at least 1");
  CALQ_CHECK(o.seq_len >= 2, "--seq-len must be at least 2, got {}", o.seq_len);
  CALQ_CHECK(o.samples >= o.batch * o.grad_accum,
             "--samples {} is fewer than one step needs (--batch {} x --grad-accum {})", o.samples, o.batch,
             o.grad_accum);
  {
    const std::string f = fs::path(o.data).filename().string();
    CALQ_CHECK(f != "wiki.test.raw" && f != "wiki.test.tokens",
               "--data {}: this is wikitext-2 test, the evaluation text; it must not be trained on (use "
               "wikitext2:train, bartowski-v3 or another file)",
               o.data);
  }
  for (int b : o.eval_bits)
    if (b != 0) check_bits(b, "--eval-bits");
  // Training text must never be the evaluation split.
  if (auto ns = data::find_named_source(o.data, "train"))
    CALQ_CHECK(ns->name.find("wikitext2") == std::string::npos || ns->name.find("test") == std::string::npos,
               "--data {}: wikitext-2 test is the evaluation text and must not be trained on; use wikitext2:train, "
               "bartowski-v3 or a file",
               o.data);
}

nlohmann::json fingerprint(const TrainOptions& o, const Model& m, int64_t total_steps) {
  const auto& lo = o.model_opts.lora;
  return {{"model_config", m.config().raw},
          {"lora_rank", lo.rank},
          {"lora_alpha", lo.alpha},
          {"lora_dropout", lo.dropout},
          {"lora_targets", lo.targets},
          {"lora_head", lo.head},
          {"train_norms", o.model_opts.train_norms},
          {"method", o.method},
          {"data", o.data},
          {"samples", o.samples},
          {"batch", o.batch},
          {"seq_len", o.seq_len},
          {"grad_accum", o.grad_accum},
          {"cycles", o.cycles},
          {"schedule", o.schedule == Unit::Epoch ? "epoch" : "iter"},
          {"total_steps", total_steps},
          {"weight_quantizer", quant_kind_name(o.quant.weight_kind)},
          {"input_quantizer", quant_kind_name(o.quant.input_kind)},
          {"quantize_inputs", o.quant.quantize_inputs},
          {"input_bits", o.quant.input_bits},
          {"gradient_bits", o.quant.gradient_bits},
          {"recalibrate_every", o.recalibrate_every},
          {"seed", o.seed}};
}

// "key: checkpoint A, this run B" for every differing key (config keys named inside model_config).
std::vector<std::string> differences(const nlohmann::json& ck, const nlohmann::json& now) {
  std::vector<std::string> d;
  for (auto& [k, v] : now.items()) {
    if (!ck.contains(k)) {
      d.push_back(fmt::format("{}: absent in the checkpoint", k));
      continue;
    }
    if (k == "model_config" && ck[k] != v) {
      for (auto& [ck2, v2] : v.items())
        if (!ck[k].contains(ck2) || ck[k][ck2] != v2)
          d.push_back(fmt::format("model config {}: checkpoint {}, this model {}", ck2,
                                  ck[k].contains(ck2) ? ck[k][ck2].dump() : "absent", v2.dump()));
      for (auto& [ck2, v2] : ck[k].items())
        if (!v.contains(ck2)) d.push_back(fmt::format("model config {}: checkpoint {}, this model absent", ck2, v2.dump()));
      continue;
    }
    if (ck[k] != v) d.push_back(fmt::format("{}: checkpoint {}, this run {}", k, ck[k].dump(), v.dump()));
  }
  return d;
}

struct State {
  int64_t step = 0;
  std::vector<double> losses;
  std::vector<int> bits;
  std::set<int> stale;  // precisions due for recalibration (--recalibrate-every)
};

void save_checkpoint(const fs::path& dir, Model& m, AdamW& opt, CptQuantizers& q, CalibrationManager& cm,
                     const nlohmann::json& fp, const State& st) {
  io::AtomicDir out(dir, true);
  {
    io::SafetensorsWriter w(out.path(), uint64_t{1} << 40, {{"format", "calq-cpt-checkpoint"}});
    std::vector<std::pair<std::string, const std::vector<float>*>> tensors;
    auto ps = m.params();
    for (size_t k = 0; k < ps.size(); ++k) {
      tensors.push_back({"param." + ps[k]->name, &ps[k]->value});
      tensors.push_back({"adam_m." + ps[k]->name, &opt.m()[k]});
      tensors.push_back({"adam_v." + ps[k]->name, &opt.v()[k]});
    }
    for (size_t i = 0; i < q.size(); ++i) {
      for (auto* fq : {&q.input_quantizer(i), &q.grad_a_quantizer(i), &q.grad_b_quantizer(i)}) {
        const char* kind = fq == &q.input_quantizer(i) ? "input" : fq == &q.grad_a_quantizer(i) ? "grad_a" : "grad_b";
        for (auto& [bits, p] : fq->all_params()) {
          const std::string base = fmt::format("quant.{}.{}.{}", kind, m.linears()[i].name, bits);
          tensors.push_back({base + ".a", &p.a});
          if (!p.b.empty()) tensors.push_back({base + ".b", &p.b});
        }
      }
    }
    for (auto& [n, v] : tensors) w.declare(n, DType::F32, {static_cast<int64_t>(v->size())});
    for (auto& [n, v] : tensors) w.write(n, v->data(), v->size() * sizeof(float));
    w.finish();
  }
  nlohmann::json j = {{"fingerprint", fp},
                      {"step", st.step},
                      {"adam_steps", opt.steps()},
                      {"losses", st.losses},
                      {"bits", st.bits},
                      {"calibrated_bits", cm.calibrated_bits()},
                      {"lora_calibrated_bits", cm.lora_calibrated_bits()},
                      {"stale_bits", st.stale}};
  io::write_file_atomic(out.path() / "trainer_state.json", j.dump(1) + "\n");
  out.commit();
}

void load_checkpoint(const fs::path& dir, Model& m, AdamW& opt, CptQuantizers& q, CalibrationManager& cm,
                     const nlohmann::json& fp, State& st) {
  CALQ_CHECK(fs::exists(dir / "trainer_state.json"),
             "--resume {}: no trainer_state.json there (give the checkpoint directory written by calq train, "
             "OUTPUT/checkpoint)",
             dir.string());
  const auto j = io::load_config_json(dir / "trainer_state.json");
  const auto diff = differences(j.at("fingerprint"), fp);
  if (!diff.empty())
    fail("--resume {}: the checkpoint was made by another model or configuration ({}); resume with the same model "
         "and options, or start a new --output",
         dir.string(), fmt::join(diff, "; "));
  auto f = io::SafetensorsFile::open(dir / "model.safetensors");
  auto get = [&](const std::string& name, std::vector<float>& dst) {
    CALQ_CHECK(f->contains(name), "--resume {}: tensor {} is missing", dir.string(), name);
    const auto v = f->view(name);
    CALQ_CHECK(v.numel() == static_cast<int64_t>(dst.size()) || dst.empty(), "--resume {}: tensor {} has {} values, expected {}",
               dir.string(), name, v.numel(), dst.size());
    dst.resize(static_cast<size_t>(v.numel()));
    std::memcpy(dst.data(), v.data, v.nbytes);
  };
  auto ps = m.params();
  for (size_t k = 0; k < ps.size(); ++k) {
    get("param." + ps[k]->name, ps[k]->value);
    get("adam_m." + ps[k]->name, opt.m()[k]);
    get("adam_v." + ps[k]->name, opt.v()[k]);
  }
  for (const auto& t : f->tensors()) {
    if (t.name.rfind("quant.", 0) != 0) continue;
    // quant.<kind>.<module>.<bits>.<a|b>
    const std::string rest = t.name.substr(6);
    const std::string kind = rest.substr(0, rest.find('.'));
    const std::string tail = rest.substr(kind.size() + 1);
    const size_t dot2 = tail.rfind('.'), dot1 = tail.rfind('.', dot2 - 1);
    const std::string module = tail.substr(0, dot1);
    const int bits = std::stoi(tail.substr(dot1 + 1, dot2 - dot1 - 1));
    const char which = tail.back();
    size_t i = 0;
    while (i < m.linears().size() && m.linears()[i].name != module) ++i;
    CALQ_CHECK(i < m.linears().size(), "--resume {}: quantizer of unknown module {}", dir.string(), module);
    FakeQuantizer& fq = kind == "input" ? q.input_quantizer(i) : kind == "grad_a" ? q.grad_a_quantizer(i)
                                                                                  : q.grad_b_quantizer(i);
    auto& p = fq.all_params()[bits];
    std::vector<float> v;
    get(t.name, v);
    (which == 'a' ? p.a : p.b) = std::move(v);
  }
  std::set<int> cb = j.at("calibrated_bits").get<std::set<int>>();
  // Weight ranges come from the frozen pretrained weights: recomputed (identical) rather than stored.
  for (int b : cb) q.calibrate_weights(b);
  cm.restore(cb, j.at("lora_calibrated_bits").get<std::set<int>>());
  st.step = j.at("step");
  st.losses = j.at("losses").get<std::vector<double>>();
  st.bits = j.at("bits").get<std::vector<int>>();
  st.stale = j.at("stale_bits").get<std::set<int>>();
  opt.set_steps(j.at("adam_steps"));
  log_info("resumed from {} at step {}", dir.string(), st.step);
}

double perplexity(Model& m, const std::vector<eval::Window>& windows, const std::string& label) {
  eval::ForwardFn fwd = [&m](const std::vector<int32_t>& input, int64_t first, std::vector<float>& logits) {
    const int64_t T = static_cast<int64_t>(input.size()), V = m.config().vocab_size;
    auto all = m.logits(input, 1, T);
    logits.assign(all.begin() + first * V, all.end());
  };
  eval::RunOptions ro;
  ro.label = label;
  return eval::run_perplexity(windows, m.config().vocab_size, fwd, ro).ppl;
}

}  // namespace

void write_peft_adapter(Model& m, const fs::path& dir, const std::string& base_model) {
  const auto& lo = m.options().lora;
  std::vector<std::string> modules;
  fs::create_directories(dir);
  const fs::path tmp = dir / ".adapter.tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  {
    io::SafetensorsWriter w(tmp, uint64_t{1} << 40, {{"format", "pt"}});
    std::vector<std::pair<std::string, const Param*>> t;
    for (const auto& L : m.linears())
      if (L.lora) {
        modules.push_back(L.name);
        t.push_back({"base_model.model." + L.name + ".lora_A.weight", &L.lora->A});
        t.push_back({"base_model.model." + L.name + ".lora_B.weight", &L.lora->B});
      }
    std::vector<std::string> saved_norms;
    for (auto& n : m.norms())
      if (n.trainable) {
        saved_norms.push_back(n.name);
        t.push_back({"base_model.model." + n.name + ".weight", &n.w});
        if (!n.b.value.empty()) t.push_back({"base_model.model." + n.name + ".bias", &n.b});
      }
    for (auto& [name, p] : t) w.declare(name, DType::F32, p->shape);
    for (auto& [name, p] : t) w.write(name, p->value.data(), p->value.size() * sizeof(float));
    w.finish();
    fs::rename(tmp / "model.safetensors", dir / "adapter_model.safetensors");
    fs::remove_all(tmp);
    // target_modules as a regex string: PEFT full-matches it against module names, so it selects
    // exactly the adapted modules.
    std::string re;
    for (const auto& mod : modules) {
      std::string e;
      for (char c : mod) {
        if (c == '.') e += '\\';
        e += c;
      }
      re += (re.empty() ? "" : "|") + e;
    }
    nlohmann::json cfg = {{"peft_type", "LORA"},
                          {"task_type", "CAUSAL_LM"},
                          {"base_model_name_or_path", base_model},
                          {"r", lo.rank},
                          {"lora_alpha", lo.alpha},
                          {"lora_dropout", lo.dropout},
                          {"target_modules", "^(" + re + ")$"},
                          {"fan_in_fan_out", m.config().arch == io::Arch::Gpt2},
                          {"bias", "none"},
                          {"modules_to_save", saved_norms.empty() ? nlohmann::json(nullptr) : nlohmann::json(saved_norms)},
                          {"init_lora_weights", true},
                          {"inference_mode", true},
                          {"use_rslora", false},
                          {"use_dora", false},
                          {"layers_to_transform", nullptr},
                          {"rank_pattern", nlohmann::json::object()},
                          {"alpha_pattern", nlohmann::json::object()},
                          {"revision", nullptr}};
    io::write_file_atomic(dir / "adapter_config.json", cfg.dump(2) + "\n");
  }
}

void write_merged_model(Model& m, const fs::path& base_dir, const fs::path& out_dir, bool overwrite) {
  auto src = native::Model::open(base_dir);
  const bool gpt2 = m.config().arch == io::Arch::Gpt2;
  std::map<std::string, const Linear*> adapted;
  for (const auto& L : m.linears())
    if (L.lora) {
      CALQ_CHECK(!L.W.empty(), "--merged: the head's LoRA cannot be merged into a head tied to the embedding (the "
                               "input embedding would change too); train without --lora-head or keep the adapter "
                               "separate");
      adapted[L.name + ".weight"] = &L;
    }
  std::map<std::string, const Param*> norms;
  for (auto& n : m.norms())
    if (n.trainable) {
      norms[n.name + ".weight"] = &n.w;
      if (!n.b.value.empty()) norms[n.name + ".bias"] = &n.b;
    }
  io::AtomicDir out(out_dir, overwrite);
  {
    io::SafetensorsWriter w(out.path(), uint64_t{2} << 30, {{"format", "pt"}});
    for (const auto& e : src.entries()) w.declare(e.name, src.checkpoint().info(e.name).dtype, e.shape);
    for (const auto& e : src.entries()) {
      const DType dt = src.checkpoint().info(e.name).dtype;
      std::vector<float> v;
      if (auto a = adapted.find(e.name); a != adapted.end()) {
        const Linear& L = *a->second;
        const Lora& lo = *L.lora;
        std::vector<float> Wm = L.W;  // [out, in]
        // W += scale * B [out, r] * A [r, in]
        gemm_nn(L.out, L.in, lo.rank, lo.scale, lo.B.value.data(), lo.A.value.data(), 1.0f, Wm.data());
        v = gpt2 ? transpose(Wm, L.out, L.in) : std::move(Wm);
      } else if (auto n = norms.find(e.name); n != norms.end()) {
        v = n->second->value;
      } else {
        const auto view = src.checkpoint().view(e.name);
        w.write(e.name, view.data, view.nbytes);
        continue;
      }
      std::vector<std::byte> bytes(dtype_nbytes(dt, v.size()));
      from_f32(v.data(), dt, bytes.data(), v.size());
      w.write(e.name, bytes.data(), bytes.size());
    }
    w.finish();
  }
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt"})
    if (fs::exists(base_dir / f)) fs::copy_file(base_dir / f, out.path() / f);
  out.commit();
}

TrainResult train_cpt(const TrainOptions& o) {
  validate(o);
  CALQ_CHECK(o.overwrite || !o.resume.empty() || !fs::exists(fs::path(o.output) / "adapter_config.json"),
             "--output {} already holds an adapter; use --overwrite, --resume {}/checkpoint, or another directory",
             o.output, o.output);
  TrainResult res;
  // ---- data
  data::LoadOptions lo;
  lo.allow_download = !o.offline;
  lo.wikitext_default_split = "train";
  const auto ds = data::Dataset::load(o.data, lo);
  auto tok = text::load_tokenizer(o.model);
  data::SelectOptions so;
  so.samples = static_cast<size_t>(o.samples);
  so.seq_len = static_cast<size_t>(o.seq_len);
  so.seed = o.seed;
  const auto set = data::make_calibration_set(ds, *tok, so);
  const int64_t W = static_cast<int64_t>(set.tokens.size());
  log_info("training data: {} windows of {} tokens from {}", W, o.seq_len, o.data);

  // ---- model and quantizers
  Model m = Model::load(o.model, o.model_opts);
  // --merged is written after training: what would refuse it is checked now, not after the work.
  if (!o.merged.empty()) {
    const auto norm = [](const std::string& p) {
      fs::path a = fs::weakly_canonical(fs::absolute(fs::path(p))).lexically_normal();
      return a.filename().empty() ? a.parent_path() : a;  // "out/" -> "out"
    };
    const fs::path merged = norm(o.merged);
    CALQ_CHECK(merged != norm(o.output) && merged != norm(o.model),
               "--merged {}: must be a directory of its own (not --output or --model)", o.merged);
    CALQ_CHECK(o.overwrite || !fs::exists(merged), "--merged {} already exists; use --overwrite or another directory",
               o.merged);
    CALQ_CHECK(merged.has_parent_path() && fs::is_directory(merged.parent_path()),
               "--merged {}: the parent directory does not exist", o.merged);
    for (const auto& L : m.linears())
      CALQ_CHECK(!L.lora || !L.W.empty(),
                 "--merged: the head's LoRA cannot be merged into a head tied to the embedding (the input embedding "
                 "would change too); train without --lora-head or keep the adapter separate");
  }
  CALQ_CHECK(tok->vocab_size() <= m.config().vocab_size, "the tokenizer has {} tokens but {} has vocab_size {}",
             tok->vocab_size(), o.model, m.config().vocab_size);
  log_info("{}: {} LoRA parameters on {} modules (rank {}, alpha {}), {} trainable, {} frozen", o.model,
           m.num_lora_params(), std::count_if(m.linears().begin(), m.linears().end(), [](const Linear& L) { return L.lora != nullptr; }),
           o.model_opts.lora.rank, o.model_opts.lora.alpha, m.num_trainable_params(), m.num_frozen_params());
  CptQuantizers q(m, o.quant);
  auto batch_tokens = [&](const std::vector<int64_t>& idx) {
    std::vector<int32_t> t;
    t.reserve(static_cast<size_t>(idx.size()) * static_cast<size_t>(o.seq_len));
    for (int64_t i : idx) t.insert(t.end(), set.tokens[static_cast<size_t>(i)].begin(), set.tokens[static_cast<size_t>(i)].end());
    return t;
  };
  // Calibration batches: fixed windows (the first ones of the seeded order).
  auto calib_batch = [&](int64_t k) {
    std::vector<int64_t> idx;
    for (int64_t j = 0; j < o.batch; ++j) idx.push_back((k * o.batch + j) % W);
    return batch_tokens(idx);
  };
  CalibrationManager cm(m, q, calib_batch, o.calib_batches, o.batch, o.seq_len);

  // ---- schedule
  const int64_t per_step = o.batch * o.grad_accum;
  const int64_t steps_per_epoch = std::max<int64_t>(1, W / per_step);
  const int64_t total = o.steps > 0 ? o.steps : o.epochs * steps_per_epoch;
  int lo_bits = o.min_bits, hi_bits = o.max_bits;

  // ---- precision range test (after calibrating each tested precision, eval mode, fixed batches)
  if (o.prt && o.method == "cpt") {
    fmt::print("Precision range test ({} fixed batches, threshold {} top-1 accuracy):\n", o.prt_batches, o.prt_threshold);
    fmt::print("{:>5} {:>10} {:>10} {:>10}\n", "bits", "loss", "accuracy", "gain");
    double prev = -1;
    std::vector<double> accs;
    for (int b = kMinBits; b <= hi_bits; ++b) {
      cm.ensure_calibrated(b);
      cm.ensure_lora_calibrated(b);
      q.set_precision(b);
      m.set_training(false);
      Model::Scores s;
      for (int64_t k = 0; k < o.prt_batches; ++k) {
        const auto r = m.score(calib_batch(k), o.batch, o.seq_len);
        s.correct += r.correct;
        s.scored += r.scored;
        s.nll += r.nll;
      }
      const double acc = static_cast<double>(s.correct) / static_cast<double>(s.scored);
      const double gain = prev < 0 ? 0.0 : acc - prev;
      fmt::print("{:>5} {:>10.4f} {:>10.4f} {:>10}\n", b, s.nll / static_cast<double>(s.scored), acc,
                 prev < 0 ? std::string("-") : fmt::format("{:+.4f}", gain));
      accs.push_back(acc);
      prev = acc;
    }
    bool found = false;
    for (size_t i = 1; i < accs.size(); ++i) found |= accs[i] - accs[i - 1] > o.prt_threshold;
    lo_bits = prt_lower_bound(accs, kMinBits, o.prt_threshold);
    if (!found) log_warn("PRT: no precision gained more than {}; using the largest gain, {}-bit", o.prt_threshold, lo_bits);
    fmt::print("PRT bounds: {}..{} bits\n", lo_bits, hi_bits);
    std::fflush(stdout);
    res.prt_lower = lo_bits;
    res.prt_upper = hi_bits;
  }
  if (o.method == "static") lo_bits = hi_bits;
  const CyclicPrecisionScheduler sched(lo_bits, hi_bits, o.schedule == Unit::Epoch ? o.epochs : total, o.cycles,
                                       o.schedule);

  // ---- evaluation windows
  std::vector<eval::Window> eval_windows;
  if (!o.eval_bits.empty()) {
    data::LoadOptions el = lo;
    el.wikitext_default_split = "test";
    const auto eds = data::Dataset::load(o.eval_data, el);
    std::optional<int32_t> bos;
    if (tok->adds_bos()) bos = tok->bos_id();
    eval_windows = eval::llama_chunks(tok->encode(eds.document, true), o.eval_ctx, o.eval_chunks, bos);
  }
  auto evaluate = [&](const std::string& when) {
    std::vector<std::pair<int, double>> out;
    const int prev = q.precision();
    for (int b : o.eval_bits) {
      if (b != 0) {
        cm.ensure_calibrated(b);
        cm.ensure_lora_calibrated(b);
        if (o.quant.quantize_lora) q.calibrate_lora(b);
      }
      q.set_precision(b);
      m.set_training(false);
      const double ppl = perplexity(m, eval_windows, fmt::format("ppl {}", b ? fmt::format("{}-bit", b) : "fp32"));
      fmt::print("{} perplexity at {}: {:.4f} ({} chunks of {} on {})\n", when,
                 b ? fmt::format("{}-bit", b) : std::string("fp32"), ppl, eval_windows.size(), o.eval_ctx, o.eval_data);
      std::fflush(stdout);
      out.push_back({b, ppl});
    }
    q.set_precision(prev);
    return out;
  };

  // ---- optimizer, resume
  AdamW opt(m.params(), o.adam);
  const nlohmann::json fp = fingerprint(o, m, total);
  State st;
  const fs::path ckdir = fs::path(o.output) / "checkpoint";
  if (!o.resume.empty()) load_checkpoint(o.resume, m, opt, q, cm, fp, st);
  fs::create_directories(o.output);
  int64_t last_good = -1;
  fs::path last_good_dir = ckdir;
  if (!o.resume.empty()) {  // the checkpoint resumed from is good until a newer one is written
    last_good = st.step;
    last_good_dir = o.resume;
  }
  if (!o.eval_bits.empty() && st.step == 0) evaluate("before training:");

  const int64_t warmup = o.warmup >= 0 ? o.warmup : total / 20;
  const std::string method = o.method == "cpt" ? fmt::format("cpt {}..{}-bit", lo_bits, hi_bits)
                                               : fmt::format("static {}-bit", hi_bits);
  log_info("{}: {} steps ({} per epoch) of {} x {} x {} tokens, {} cycles per {}", method, total, steps_per_epoch,
           o.batch, o.grad_accum, o.seq_len, o.cycles, o.schedule == Unit::Epoch ? "run (per epoch)" : "run (per step)");
  Progress bar("train " + o.method, static_cast<uint64_t>(total - st.step), "steps");
  const auto t0 = std::chrono::steady_clock::now();
  int64_t tokens_done = 0;
  std::set<int>& stale = st.stale;
  int64_t last_epoch = st.step == 0 ? 0 : (st.step - 1) / steps_per_epoch;
  for (int64_t step = st.step; step < total; ++step) {
    const int64_t epoch = step / steps_per_epoch, in_epoch = step % steps_per_epoch;
    if (o.recalibrate_every > 0 && epoch != last_epoch && epoch % o.recalibrate_every == 0)
      stale = cm.calibrated_bits();
    last_epoch = epoch;
    const int bits = o.schedule == Unit::Epoch ? sched.precision(epoch) : sched.precision(step);
    if (stale.erase(bits)) cm.recalibrate(bits);
    cm.ensure_calibrated(bits);
    cm.ensure_lora_calibrated(bits);
    if (o.quant.quantize_lora) q.calibrate_lora(bits);  // LoRA ranges follow the current factors
    q.set_precision(bits);
    m.set_training(true);
    // Seeded order per epoch.
    std::vector<size_t> perm(static_cast<size_t>(W));
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = i;
    data::seeded_shuffle(perm, o.seed * 1000003ULL + static_cast<uint64_t>(epoch));
    m.zero_grad();
    double loss = 0;
    for (int64_t a = 0; a < o.grad_accum; ++a) {
      std::vector<int64_t> idx;
      for (int64_t j = 0; j < o.batch; ++j)
        idx.push_back(static_cast<int64_t>(perm[static_cast<size_t>((in_epoch * per_step + a * o.batch + j) % W)]));
      m.set_step_seed(o.seed * 7919ULL + static_cast<uint64_t>(step * o.grad_accum + a));
      const double l = m.loss(batch_tokens(idx), o.batch, o.seq_len, true, 1.0f / static_cast<float>(o.grad_accum));
      if (!std::isfinite(l))
        fail("loss is {} at step {} (precision {}-bit); training stopped. {}", std::isnan(l) ? "NaN" : "infinite",
             step + 1, bits,
             last_good >= 0 ? fmt::format("The last good checkpoint is {} (step {}); resume from it with --resume {} and "
                                          "a lower --lr or a higher --bits minimum",
                                          last_good_dir.string(), last_good, last_good_dir.string())
                            : std::string("No checkpoint was written yet; lower --lr or raise the --bits minimum"));
      loss += l / static_cast<double>(o.grad_accum);
    }
    clip_grad_norm(m.params(), o.clip);
    opt.step(cosine_lr(step, total, warmup, o.adam.lr, o.min_lr));
    st.step = step + 1;
    st.losses.push_back(loss);
    st.bits.push_back(bits);
    tokens_done += per_step * o.seq_len;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bar.advance(1, 0,
                fmt::format("loss {:.4f} | {}-bit | {:.0f} tok/s", loss, bits, static_cast<double>(tokens_done) / el));
    if (o.checkpoint_every > 0 && st.step % o.checkpoint_every == 0 && st.step < total) {
      save_checkpoint(ckdir, m, opt, q, cm, fp, st);
      last_good = st.step;
      last_good_dir = ckdir;
    }
    if (o.stop_after > 0 && st.step >= o.stop_after && st.step < total) {
      bar.finish();
      save_checkpoint(ckdir, m, opt, q, cm, fp, st);
      fmt::print("stopped after step {} of {}; resume with --resume {}\n", st.step, total, ckdir.string());
      res.steps = st.step;
      return res;
    }
  }
  bar.finish();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.tokens_per_second = secs > 0 ? static_cast<double>(tokens_done) / secs : 0;
  save_checkpoint(ckdir, m, opt, q, cm, fp, st);
  write_peft_adapter(m, o.output, o.model);
  res.steps = st.step;
  res.loss_per_step = st.losses;
  res.bits_per_step = st.bits;
  const size_t k = std::min<size_t>(10, st.losses.size());
  for (size_t i = 0; i < k; ++i) {
    res.first_loss += st.losses[i] / static_cast<double>(k);
    res.last_loss += st.losses[st.losses.size() - 1 - i] / static_cast<double>(k);
  }
  fmt::print("trained {} steps ({}): loss {:.4f} (first {} steps) -> {:.4f} (last {}), {:.1f} tokens/s\n", res.steps,
             method, res.first_loss, k, res.last_loss, k, res.tokens_per_second);
  if (!o.eval_bits.empty()) res.eval_ppl = evaluate("after training:");
  fmt::print("{}\n", cm.summary());
  res.calibrated_bits = cm.calibrated_bits();
  res.lora_calibrated_bits = cm.lora_calibrated_bits();
  nlohmann::json log = {{"steps", res.steps},         {"loss", st.losses},
                        {"bits", st.bits},            {"tokens_per_second", res.tokens_per_second},
                        {"calibrated_bits", res.calibrated_bits}, {"lora_calibrated_bits", res.lora_calibrated_bits},
                        {"fingerprint", fp}};
  nlohmann::json ev = nlohmann::json::array();
  for (auto& [b, p] : res.eval_ppl) ev.push_back({{"bits", b}, {"ppl", p}});
  log["eval"] = ev;
  io::write_file_atomic(fs::path(o.output) / "training_log.json", log.dump(1) + "\n");
  fmt::print("adapter written to {} (adapter_config.json, adapter_model.safetensors)\n", o.output);
  if (!o.merged.empty()) {
    write_merged_model(m, o.model, o.merged, o.overwrite);
    fmt::print("merged model written to {}; quantize it with calq quantize --input {} ...\n", o.merged, o.merged);
  }
  return res;
}

}  // namespace calq::train
