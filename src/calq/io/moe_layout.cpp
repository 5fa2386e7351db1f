#include "calq/io/moe_layout.h"

#include <array>
#include <map>
#include <optional>

#include "calq/core/error.h"

namespace calq::io {

namespace {

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

// Digits only, canonical (no sign, no leading zero), small enough for int64.
std::optional<int64_t> parse_index(std::string_view s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return std::nullopt;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + (c - '0');
  }
  return v;
}

// model.layers.<layer>.<block>.<rest> with block mlp or block_sparse_moe.
struct BlockName {
  int64_t layer = 0;
  std::string block, rest;
};

std::optional<BlockName> parse_block_name(const std::string& n) {
  constexpr std::string_view kLayers = "model.layers.";
  if (!starts_with(n, kLayers)) return std::nullopt;
  const size_t p = kLayers.size(), q = n.find('.', p);
  if (q == std::string::npos) return std::nullopt;
  auto layer = parse_index(std::string_view(n).substr(p, q - p));
  const size_t r = n.find('.', q + 1);
  if (!layer || r == std::string::npos) return std::nullopt;
  BlockName b{*layer, n.substr(q + 1, r - q - 1), n.substr(r + 1)};
  if (b.block != "mlp" && b.block != "block_sparse_moe") return std::nullopt;
  return b;
}

// experts.<expert>.<projection>.<suffix>: suffix is "weight", or the packed tensors of a calq
// output (weight_packed, weight_scale, ..., rotation_signs).
struct ExpertName {
  int64_t expert = 0;
  std::string proj, suffix;
};

std::optional<ExpertName> parse_expert_rest(const std::string& rest) {
  if (!starts_with(rest, "experts.")) return std::nullopt;
  const size_t p = 8, q = rest.find('.', p);
  if (q == std::string::npos) return std::nullopt;
  auto e = parse_index(std::string_view(rest).substr(p, q - p));
  const size_t r = rest.find('.', q + 1);
  if (!e || r == std::string::npos || r + 1 == rest.size()) return std::nullopt;
  return ExpertName{*e, rest.substr(q + 1, r - q - 1), rest.substr(r + 1)};
}

// The bank a name (after "<block>.") is, if any.
enum class Bank { None, GateUp, Down };
Bank bank_of(const std::string& rest) {
  if (rest == "experts.gate_up_proj" || rest == "experts.gate_up_proj.weight") return Bank::GateUp;
  if (rest == "experts.down_proj" || rest == "experts.down_proj.weight") return Bank::Down;
  return Bank::None;
}

}  // namespace

bool is_fused_expert_bank(const std::string& name) {
  auto b = parse_block_name(name);
  return b && bank_of(b->rest) != Bank::None;
}

std::vector<ExposedTensor> expose_moe_tensors(const std::vector<TensorInfo>& stored, const ModelConfig& cfg,
                                              const std::string& label) {
  std::vector<ExposedTensor> out;
  out.reserve(stored.size());
  if (!cfg.is_moe()) {
    // A dense config with expert tensors is the wrong config (or the wrong weights): nothing
    // would read those tensors, and a quantized copy would silently lose them.
    for (const auto& t : stored) {
      CALQ_CHECK(t.name.find(".experts.") == std::string::npos && !is_fused_expert_bank(t.name),
                 "{}: tensor {} holds experts, but config.json describes a dense {} model (no experts)", label,
                 t.name, cfg.model_type);
      out.push_back({t.name, t});
    }
    return out;
  }

  const bool mixtral = cfg.arch == Arch::Mixtral;
  const std::string block = mixtral ? "block_sparse_moe" : "mlp";
  const char* experts_key = mixtral ? "num_local_experts" : "num_experts";
  const char* inter_key = mixtral ? "intermediate_size" : "moe_intermediate_size";
  const int64_t E = cfg.num_experts, H = cfg.hidden_size;
  const int64_t I = mixtral ? cfg.intermediate_size : cfg.moe_intermediate_size;
  // gate, up, down (gate and up are [I, H], down is [H, I]).
  const std::array<std::string, 3> proj = mixtral ? std::array<std::string, 3>{"w1", "w3", "w2"}
                                                  : std::array<std::string, 3>{"gate_proj", "up_proj", "down_proj"};
  auto sparse = [&](int64_t l) { return l < cfg.num_hidden_layers && cfg.layer_is_sparse(l); };
  auto prefix_of = [&](int64_t l) { return fmt::format("model.layers.{}.{}.", l, block); };

  // One example of each way a layer's MoE tensors are stored, for the conflicts below.
  struct Seen {
    std::string fused, per_expert, mlp_block, moe_block;
  };
  std::map<int64_t, Seen> seen;
  for (const auto& t : stored) {
    auto b = parse_block_name(t.name);
    if (!b) {
      out.push_back({t.name, t});
      continue;
    }
    Seen& s = seen[b->layer];
    const std::string where = fmt::format("{}: layer {}: tensor {}", label, b->layer, t.name);
    // Mixtral's block is block_sparse_moe in checkpoints of transformers 4 (and vLLM's names), mlp
    // in transformers 5; calq uses the former. A mix of both in one layer is two checkpoints merged.
    if (mixtral) {
      (b->block == "mlp" ? s.mlp_block : s.moe_block) = t.name;
      CALQ_CHECK(s.mlp_block.empty() || s.moe_block.empty(),
                 "{}: layer {}: tensors {} and {} name the MoE block both as block_sparse_moe. and as mlp. "
                 "(transformers 5's name); a checkpoint must use one",
                 label, b->layer, s.moe_block, s.mlp_block);
    }
    const std::string prefix =
        mixtral ? prefix_of(b->layer) : fmt::format("model.layers.{}.{}.", b->layer, b->block);
    const Bank bank = bank_of(b->rest);
    if (bank == Bank::None) {
      if (parse_expert_rest(b->rest)) s.per_expert = t.name;
      TensorInfo x = t;
      x.name = prefix + b->rest;
      out.push_back({t.name, std::move(x)});
      continue;
    }
    s.fused = t.name;
    CALQ_CHECK(mixtral || b->block == "mlp", "{}: {} keeps its experts under mlp., not block_sparse_moe.", where, cfg.model_type);
    CALQ_CHECK(sparse(b->layer),
               "{}: a fused expert bank, but config.json makes layer {} dense (num_hidden_layers {}, "
               "decoder_sparse_step / mlp_only_layers)",
               where, b->layer, cfg.num_hidden_layers);
    const bool gate_up = bank == Bank::GateUp;
    const Shape want = gate_up ? Shape{E, 2 * I, H} : Shape{E, H, I};
    const std::string want_text =
        gate_up ? fmt::format("[{}, 2*{}, {}] = {} ({} x 2 x {} x hidden_size)", experts_key, inter_key, "hidden_size",
                              shape_str(want), experts_key, inter_key)
                : fmt::format("[{}, hidden_size, {}] = {}", experts_key, inter_key, shape_str(want));
    CALQ_CHECK(t.shape.size() == 3, "{}: a fused expert bank must have rank 3, {}; got shape {}", where, want_text,
               shape_str(t.shape));
    CALQ_CHECK(t.shape[0] == E, "{}: holds {} experts (shape {}), but config.json has {} {}", where, t.shape[0],
               shape_str(t.shape), experts_key, E);
    CALQ_CHECK(t.shape == want, "{}: has shape {}, expected {} from config.json", where, shape_str(t.shape),
               want_text);
    const int64_t rows = gate_up ? I : H, cols = gate_up ? H : I;
    const int parts = gate_up ? 2 : 1;
    const uint64_t slice = dtype_nbytes(t.dtype, static_cast<uint64_t>(rows * cols));
    // Whole-byte dtypes always split exactly; a packed sub-byte dtype might not.
    CALQ_CHECK(slice * static_cast<uint64_t>(parts * E) == t.end - t.begin,
               "{}: its {} bytes of {} do not split into {} per-expert matrices of {} bytes", where,
               t.end - t.begin, dtype_name(t.dtype), parts * E, slice);
    // Row-major [E, 2I, H]: expert e's gate rows, then its up rows, each one contiguous block.
    for (int64_t e = 0; e < E; ++e)
      for (int k = 0; k < parts; ++k) {
        TensorInfo x;
        x.name = fmt::format("{}experts.{}.{}.weight", prefix, e, proj[gate_up ? k : 2]);
        x.dtype = t.dtype;
        x.shape = {rows, cols};
        x.begin = t.begin + static_cast<uint64_t>(e * parts + k) * slice;
        x.end = x.begin + slice;
        out.push_back({t.name, std::move(x)});
      }
  }
  for (const auto& [layer, s] : seen)
    CALQ_CHECK(s.fused.empty() || s.per_expert.empty(),
               "{}: layer {}: both a fused expert bank ({}) and per-expert tensors ({}); a checkpoint stores a "
               "layer's experts one way",
               label, layer, s.fused, s.per_expert);
  {
    std::map<std::string, const std::string*> by_name;
    for (const auto& x : out) {
      auto [it, fresh] = by_name.emplace(x.info.name, &x.stored);
      CALQ_CHECK(fresh, "{}: tensors {} and {} are both {}", label, *it->second, x.stored, x.info.name);
    }
  }

  // The expert tensors against the config. The engine checks what it needs, but `calq quantize
  // --method rtn` does not run the engine, and nothing else would notice an extra expert.
  auto describe = [](const ExposedTensor& x) {
    return x.stored == x.info.name ? x.info.name : fmt::format("{} (a slice of {})", x.info.name, x.stored);
  };
  std::map<int64_t, std::vector<uint8_t>> have;  // layer -> [expert * 3 + projection]
  std::map<int64_t, std::string> router;
  for (const auto& x : out) {
    const std::string& n = x.info.name;
    const bool expert = n.find(".experts.") != std::string::npos;
    auto b = parse_block_name(n);
    if (!b) {
      CALQ_CHECK(!expert, "{}: tensor {} is an expert tensor calq does not know (experts are read as {}"
                          "experts.<e>.{{{},{},{}}}.weight, e < {})",
                 label, n, fmt::format("model.layers.<layer>.{}.", block), proj[0], proj[1], proj[2], E);
      continue;
    }
    const std::string where = fmt::format("{}: layer {}: tensor {}", label, b->layer, describe(x));
    if (starts_with(b->rest, "gate.") && b->block == block && sparse(b->layer)) {
      router.emplace(b->layer, n);
      if (b->rest == "gate.weight")
        CALQ_CHECK(x.info.shape == (Shape{E, H}),
                   "{}: the router has shape {}, expected [{}, hidden_size] = [{}, {}]", where,
                   shape_str(x.info.shape), experts_key, E, H);
      continue;
    }
    if (!expert) continue;
    auto en = parse_expert_rest(b->rest);
    // A weight, or the tensors a quantized weight is stored as (weight_packed, weight_scale, ...,
    // and a rotation's sign vector); anything else (a bias, say) nothing would read.
    const bool known_suffix = en && (en->suffix == "weight" || starts_with(en->suffix, "weight_") ||
                                     en->suffix == "rotation_signs");
    CALQ_CHECK(b->block == block && known_suffix,
               "{}: not an expert tensor calq reads ({} experts are {}experts.<e>.{{{},{},{}}}.weight); "
               "refusing to drop it",
               where, cfg.model_type, prefix_of(b->layer), proj[0], proj[1], proj[2]);
    CALQ_CHECK(sparse(b->layer), "{}: an expert tensor, but config.json makes layer {} dense (num_hidden_layers {}, "
                                 "decoder_sparse_step / mlp_only_layers)",
               where, b->layer, cfg.num_hidden_layers);
    CALQ_CHECK(en->expert < E, "{}: expert {} does not exist: config.json has {} {} (experts 0..{})", where,
               en->expert, experts_key, E, E - 1);
    int p = 0;
    while (p < 3 && proj[p] != en->proj) ++p;
    CALQ_CHECK(p < 3, "{}: unknown expert projection '{}' ({} experts have {}, {}, {})", where, en->proj,
               cfg.model_type, proj[0], proj[1], proj[2]);
    auto& h = have[b->layer];
    h.resize(static_cast<size_t>(E * 3));
    h[static_cast<size_t>(en->expert * 3 + p)] = 1;
    if (en->suffix == "weight") {
      const Shape want = p < 2 ? Shape{I, H} : Shape{H, I};
      CALQ_CHECK(x.info.shape == want, "{}: has shape {}, expected {} ({} {}, hidden_size {})", where,
                 shape_str(x.info.shape), shape_str(want), inter_key, I, H);
    }
  }
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!sparse(l)) continue;
    CALQ_CHECK(router.count(l), "{}: layer {}: the router {}gate.weight is missing", label, l, prefix_of(l));
    std::vector<std::string> missing;
    const auto& h = have[l];
    for (int64_t e = 0; e < E; ++e)
      for (int p = 0; p < 3; ++p)
        if (h.empty() || !h[static_cast<size_t>(e * 3 + p)])
          missing.push_back(fmt::format("{}experts.{}.{}.weight", prefix_of(l), e, proj[p]));
    if (missing.empty()) continue;
    std::string list;
    for (size_t i = 0; i < std::min<size_t>(missing.size(), 3); ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 3) list += fmt::format(", ... ({} in all)", missing.size());
    fail("{}: layer {}: expert tensor{} missing: {} (config.json has {} {}, each with {}, {}, {})", label, l,
         missing.size() > 1 ? "s" : "", list, experts_key, E, proj[0], proj[1], proj[2]);
  }
  return out;
}

}  // namespace calq::io
