#include "calq/calib/stats.h"

#include <algorithm>
#include <cmath>
#include <regex>

#include "calq/core/error.h"
#include "calq/io/gguf.h"

namespace calq::calib {

namespace {
constexpr int kBinsPerOctave = 64;
constexpr int kOctaves = 128;  // 2^-64 .. 2^64
constexpr int kBins = 1 + kBinsPerOctave * kOctaves;

int bin_of(double a) {
  if (a == 0) return 0;
  const double l = std::log2(a) + 64.0;
  if (l < 0) return 1;
  const int b = 1 + static_cast<int>(std::floor(l * kBinsPerOctave));
  return std::min(b, kBins - 1);
}
double upper_edge(int b) { return b == 0 ? 0.0 : std::exp2(static_cast<double>(b) / kBinsPerOctave - 64.0); }
}  // namespace

InputStats::InputStats(int64_t f)
    : features(f),
      min(INFINITY),
      max(-INFINITY),
      ch_absmax(static_cast<size_t>(f), 0.0),
      ch_sum_abs(static_cast<size_t>(f), 0.0),
      ch_sum_sq(static_cast<size_t>(f), 0.0),
      hist(kBins, 0) {}

void InputStats::add(const float* x, int64_t rows, const uint8_t* mask) {
  for (int64_t r = 0; r < rows; ++r) {
    if (mask && !mask[r]) continue;
    const float* row = x + r * features;
    for (int64_t j = 0; j < features; ++j) {
      const double v = row[j], a = std::fabs(v);
      CALQ_CHECK(std::isfinite(v), "activation statistics: non-finite input value {} (channel {})", v, j);
      min = std::min(min, v);
      max = std::max(max, v);
      ch_absmax[j] = std::max(ch_absmax[j], a);
      ch_sum_abs[j] += a;
      ch_sum_sq[j] += v * v;
      ++hist[static_cast<size_t>(bin_of(a))];
    }
    ++tokens;
  }
  absmax = std::max(std::fabs(min), std::fabs(max));
}

void InputStats::merge(const InputStats& o) {
  CALQ_CHECK(o.features == features, "merging statistics of {} and {} features", features, o.features);
  tokens += o.tokens;
  min = std::min(min, o.min);
  max = std::max(max, o.max);
  absmax = std::max(absmax, o.absmax);
  for (int64_t j = 0; j < features; ++j) {
    ch_absmax[j] = std::max(ch_absmax[j], o.ch_absmax[j]);
    ch_sum_abs[j] += o.ch_sum_abs[j];
    ch_sum_sq[j] += o.ch_sum_sq[j];
  }
  for (size_t b = 0; b < hist.size(); ++b) hist[b] += o.hist[b];
}

double InputStats::abs_percentile(double p) const {
  CALQ_CHECK(p >= 0 && p <= 100, "percentile {} outside 0..100", p);
  uint64_t total = 0;
  for (auto h : hist) total += h;
  if (total == 0) return 0.0;
  // The smallest value v with at least p% of the elements <= v.
  const double target = std::ceil(p / 100.0 * static_cast<double>(total));
  uint64_t acc = 0;
  for (int b = 0; b < kBins; ++b) {
    acc += hist[static_cast<size_t>(b)];
    if (static_cast<double>(acc) >= target && acc > 0) return std::min(upper_edge(b), absmax);
  }
  return absmax;
}

void StatsCollector::add(const std::vector<std::string>& modules, const float* x, int64_t rows, int64_t features,
                         const uint8_t* mask) {
  CALQ_CHECK(!modules.empty(), "statistics for no module");
  auto it = by_module_.find(modules.front());
  size_t idx;
  if (it == by_module_.end()) {
    idx = inputs_.size();
    inputs_.emplace_back(features);
    for (auto& m : modules) by_module_[m] = idx;
  } else {
    idx = it->second;
  }
  CALQ_CHECK(inputs_[idx].features == features, "{}: input width changed from {} to {}", modules.front(),
             inputs_[idx].features, features);
  inputs_[idx].add(x, rows, mask);
}

const InputStats& StatsCollector::of(const std::string& module) const {
  auto it = by_module_.find(module);
  CALQ_CHECK(it != by_module_.end(), "no activation statistics for {}", module);
  return inputs_[it->second];
}

std::vector<std::string> StatsCollector::modules() const {
  std::vector<std::string> out;
  for (auto& [m, i] : by_module_) out.push_back(m);
  return out;
}

nlohmann::json StatsCollector::activation_ranges(double percentile, double smooth) const {
  nlohmann::json ranges = nlohmann::json::object(), detail = nlohmann::json::object();
  for (auto& [m, i] : by_module_) {
    const InputStats& s = inputs_[i];
    ranges[m] = {s.min, s.max};
    std::vector<double> mean_abs(s.ch_sum_abs.size()), mean_sq(s.ch_sum_sq.size());
    for (size_t j = 0; j < mean_abs.size(); ++j)
      mean_abs[j] = s.tokens ? s.ch_sum_abs[j] / static_cast<double>(s.tokens) : 0.0;
    for (size_t j = 0; j < mean_sq.size(); ++j)
      mean_sq[j] = s.tokens ? s.ch_sum_sq[j] / static_cast<double>(s.tokens) : 0.0;
    detail[m] = {{"min", s.min},
                 {"max", s.max},
                 {"absmax", s.absmax},
                 {"fp4_scale", s.absmax / 6.0},
                 {"int4_scale", s.absmax / 7.0},
                 {"tokens", s.tokens},
                 {"percentile_absmax", s.abs_percentile(percentile)},
                 {"channel_absmax", s.ch_absmax},
                 {"channel_mean_abs", mean_abs},
                 {"channel_mean_sq", mean_sq}};
  }
  return {{"layer_ranges", ranges},
          {"percentile", percentile},
          {"smooth_factor", smooth},
          {"percentile_method", "histogram of |x|, 64 log2 bins per octave (upper bin edge, <= 1.1% high)"},
          {"detailed_stats", detail}};
}

nlohmann::json StatsCollector::ranges_minmax() const {
  nlohmann::json j = nlohmann::json::object();
  for (auto& [m, i] : by_module_) j[m] = {{"min", inputs_[i].min}, {"max", inputs_[i].max}};
  return j;
}

GgufName gguf_tensor_name(const std::string& w, io::Arch arch) {
  std::smatch m;
  static const std::regex layer(R"(^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)$)");
  auto plain = [&](const std::string& n) -> GgufName { return {n, -1}; };
  if (w == "lm_head.weight") return plain("output.weight");
  if (w == "model.embed_tokens.weight" || w == "transformer.wte.weight") return plain("token_embd.weight");
  if (w == "model.norm.weight" || w == "transformer.ln_f.weight") return plain("output_norm.weight");
  if (!std::regex_match(w, m, layer)) return {};
  const std::string blk = "blk." + m[1].str() + ".", rest = m[2].str(), suffix = "." + m[3].str();
  static const std::map<std::string, std::string> dense = {
      {"self_attn.q_proj", "attn_q"},     {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"},     {"self_attn.o_proj", "attn_output"},
      {"self_attn.q_norm", "attn_q_norm"}, {"self_attn.k_norm", "attn_k_norm"},
      {"input_layernorm", "attn_norm"},   {"post_attention_layernorm", "ffn_norm"},
      {"mlp.gate_proj", "ffn_gate"},      {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"},      {"mlp.gate", "ffn_gate_inp"},
      {"block_sparse_moe.gate", "ffn_gate_inp"}, {"mlp.shared_expert.gate_proj", "ffn_gate_shexp"},
      {"mlp.shared_expert.up_proj", "ffn_up_shexp"}, {"mlp.shared_expert.down_proj", "ffn_down_shexp"},
      {"mlp.shared_expert_gate", "ffn_gate_inp_shexp"},
      {"attn.c_attn", "attn_qkv"},        {"attn.c_proj", "attn_output"},
      {"ln_1", "attn_norm"},              {"ln_2", "ffn_norm"},
      {"mlp.c_fc", "ffn_up"},             {"mlp.c_proj", "ffn_down"}};
  (void)arch;  // the names coincide across the architectures calq reads
  if (auto it = dense.find(rest); it != dense.end()) return {blk + it->second + suffix, -1};
  static const std::regex expert(R"(^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$)");
  if (std::regex_match(rest, m, expert)) {
    static const std::map<std::string, std::string> ex = {{"gate_proj", "ffn_gate_exps"}, {"up_proj", "ffn_up_exps"},
                                                          {"down_proj", "ffn_down_exps"}, {"w1", "ffn_gate_exps"},
                                                          {"w3", "ffn_up_exps"},        {"w2", "ffn_down_exps"}};
    auto it = ex.find(m[2].str());
    if (it != ex.end()) return {blk + it->second + suffix, std::stoll(m[1].str())};
  }
  return {};
}

void StatsCollector::write_imatrix(const std::filesystem::path& file, const io::ModelConfig& cfg,
                                   const std::vector<std::string>& datasets, int64_t chunk_count,
                                   int64_t chunk_size) const {
  CALQ_CHECK(!by_module_.empty(), "no activation statistics to write");
  struct Entry {
    int64_t features = 0;
    std::vector<float> sums;   // features × n_mat
    std::vector<float> counts; // n_mat
  };
  std::map<std::string, Entry> entries;
  for (auto& [module, i] : by_module_) {
    const GgufName g = gguf_tensor_name(module + ".weight", cfg.arch);
    if (g.name.empty()) continue;
    const InputStats& s = inputs_[i];
    Entry& e = entries[g.name];
    const int64_t n_mat = g.expert >= 0 ? cfg.num_experts : 1;
    if (e.sums.empty()) {
      e.features = s.features;
      e.sums.assign(static_cast<size_t>(s.features * n_mat), 0.f);
      e.counts.assign(static_cast<size_t>(n_mat), 0.f);
    }
    CALQ_CHECK(e.features == s.features, "imatrix: {} has inputs of {} and {} features", g.name, e.features,
               s.features);
    const int64_t slot = g.expert >= 0 ? g.expert : 0;
    CALQ_CHECK(slot < n_mat, "imatrix: expert {} of {} beyond num_experts {}", slot, g.name, n_mat);
    for (int64_t j = 0; j < s.features; ++j) e.sums[static_cast<size_t>(slot * s.features + j)] = static_cast<float>(s.ch_sum_sq[j]);
    e.counts[static_cast<size_t>(slot)] = static_cast<float>(s.tokens);
  }
  CALQ_CHECK(!entries.empty(), "imatrix: none of the observed modules has a llama.cpp tensor name");
  io::GgufWriter w;
  w.set("general.type", io::GgufValue::str("imatrix"));
  w.set("imatrix.datasets", io::GgufValue::str_array(datasets));
  w.set("imatrix.chunk_count", io::GgufValue::u32(static_cast<uint32_t>(chunk_count)));
  w.set("imatrix.chunk_size", io::GgufValue::u32(static_cast<uint32_t>(chunk_size)));
  for (auto& [name, e] : entries) {
    const int64_t n_mat = static_cast<int64_t>(e.counts.size());
    auto* ep = &e;
    w.add_tensor(name + ".in_sum2", {e.features, n_mat}, io::GgmlType::F32, [ep](std::vector<char>& b) {
      b.assign(reinterpret_cast<const char*>(ep->sums.data()),
               reinterpret_cast<const char*>(ep->sums.data() + ep->sums.size()));
    });
    w.add_tensor(name + ".counts", {1, n_mat}, io::GgmlType::F32, [ep](std::vector<char>& b) {
      b.assign(reinterpret_cast<const char*>(ep->counts.data()),
               reinterpret_cast<const char*>(ep->counts.data() + ep->counts.size()));
    });
  }
  w.write(file);
}

}  // namespace calq::calib
