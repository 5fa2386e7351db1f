#include "calq/pipeline/plan.h"

#include <regex>

#include "calq/core/error.h"

namespace calq::pipeline {

namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

std::string last_component(const std::string& module) {
  auto p = module.rfind('.');
  return p == std::string::npos ? module : module.substr(p + 1);
}
std::string parent_of(const std::string& module) {
  auto p = module.rfind('.');
  return p == std::string::npos ? "" : module.substr(0, p);
}

bool any_of(const std::string& leaf, std::initializer_list<std::string_view> names) {
  for (auto n : names)
    if (leaf == n) return true;
  return false;
}

}  // namespace

std::string_view kind_name(TensorKind k) {
  switch (k) {
    case TensorKind::Embedding: return "embedding";
    case TensorKind::LmHead: return "lm_head";
    case TensorKind::Norm: return "norm";
    case TensorKind::Bias: return "bias";
    case TensorKind::Router: return "router";
    case TensorKind::SharedExpertGate: return "shared_expert_gate";
    case TensorKind::AttnQKV: return "attention_qkv";
    case TensorKind::AttnOut: return "attention_out";
    case TensorKind::MlpGateUp: return "mlp_gate_up";
    case TensorKind::MlpDown: return "mlp_down";
    case TensorKind::ExpertGateUp: return "expert_gate_up";
    case TensorKind::ExpertDown: return "expert_down";
    case TensorKind::SharedExpert: return "shared_expert";
    case TensorKind::FusedExperts: return "fused_experts";
    case TensorKind::OtherLinear: return "other_linear";
    case TensorKind::Other: return "other";
  }
  return "other";
}

TensorKind classify_tensor(const std::string& name, size_t rank, io::Arch arch, bool* conv1d) {
  if (conv1d) *conv1d = false;
  if (ends_with(name, ".bias") || ends_with(name, "_bias")) return TensorKind::Bias;
  std::string module = ends_with(name, ".weight") ? name.substr(0, name.size() - 7) : name;
  std::string leaf = last_component(module);
  if (rank <= 1) return contains(name, "norm") || contains(leaf, "ln_") ? TensorKind::Norm : TensorKind::Other;
  if (contains(module, "embed_tokens") || any_of(leaf, {"wte", "wpe", "embed", "embeddings"}))
    return TensorKind::Embedding;
  if (leaf == "lm_head") return TensorKind::LmHead;
  if (contains(leaf, "norm")) return TensorKind::Norm;
  if (leaf == "shared_expert_gate") return TensorKind::SharedExpertGate;
  std::string parent_leaf = last_component(parent_of(module));
  if ((leaf == "gate" && (parent_leaf == "mlp" || parent_leaf == "block_sparse_moe")) || leaf == "router")
    return TensorKind::Router;
  if (rank == 3 && contains(module, "experts")) return TensorKind::FusedExperts;
  if (rank != 2) return TensorKind::Other;
  if (contains(module, ".experts.")) {
    if (any_of(leaf, {"gate_proj", "up_proj", "w1", "w3"})) return TensorKind::ExpertGateUp;
    if (any_of(leaf, {"down_proj", "w2"})) return TensorKind::ExpertDown;
    return TensorKind::OtherLinear;
  }
  if (contains(module, ".shared_expert.") || contains(module, ".shared_experts."))
    return TensorKind::SharedExpert;
  bool gpt2 = arch == io::Arch::Gpt2;
  if (gpt2 && any_of(leaf, {"c_attn", "c_proj", "c_fc"}) && conv1d) *conv1d = true;
  if (any_of(leaf, {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn"})) return TensorKind::AttnQKV;
  if (leaf == "o_proj" || (leaf == "c_proj" && parent_leaf == "attn")) return TensorKind::AttnOut;
  if (any_of(leaf, {"gate_proj", "up_proj", "c_fc", "gate_up_proj"})) return TensorKind::MlpGateUp;
  if (leaf == "down_proj" || (leaf == "c_proj" && parent_leaf == "mlp")) return TensorKind::MlpDown;
  return TensorKind::OtherLinear;
}

Override parse_override(const std::string& spec, bool symmetric) {
  auto eq = spec.rfind('=');
  CALQ_CHECK(eq != std::string::npos && eq > 0 && eq + 1 < spec.size(),
             "--override '{}': expected REGEX=FORMAT[:GROUP], e.g. 'down_proj=int8:-1'", spec);
  std::string pattern = spec.substr(0, eq), fmt_spec = spec.substr(eq + 1);
  std::optional<int> group;
  if (auto colon = fmt_spec.find(':'); colon != std::string::npos) {
    std::string g = fmt_spec.substr(colon + 1);
    fmt_spec = fmt_spec.substr(0, colon);
    try {
      size_t used = 0;
      group = std::stoi(g, &used);
      CALQ_CHECK(used == g.size(), "bad");
    } catch (const std::exception&) {
      fail("--override '{}': group '{}' is not an integer (use -1 for per-channel)", spec, g);
    }
  }
  try {
    std::regex test(pattern);
  } catch (const std::regex_error& e) {
    fail("--override '{}': invalid regex '{}': {}", spec, pattern, e.what());
  }
  Override o;
  o.pattern = pattern;
  o.format = with_context("--override '" + spec + "'",
                          [&] { return quant::Format::parse(fmt_spec, group, symmetric); });
  return o;
}

bool is_known_preset(const std::string& p) {
  return p.empty() || p == "dense" || p == "moe" || p == "quality" || p == "speed";
}

std::optional<int> preset_group(const std::string& preset, TensorKind kind) {
  if (preset.empty()) return std::nullopt;
  bool attn = kind == TensorKind::AttnQKV || kind == TensorKind::AttnOut;
  bool mlp = kind == TensorKind::MlpGateUp || kind == TensorKind::MlpDown;
  bool expert = kind == TensorKind::ExpertGateUp || kind == TensorKind::ExpertDown;
  bool shared = kind == TensorKind::SharedExpert;
  if (preset == "dense" || preset == "moe") {
    if (attn || shared) return 64;
    if (mlp || expert) return 128;
    return std::nullopt;
  }
  if (preset == "quality") {
    if (attn || shared) return 32;
    if (mlp) return 128;
    return 64;
  }
  if (preset == "speed") {
    if (attn || shared) return 128;
    return 256;
  }
  fail("unknown --mixed-precision preset '{}'; expected dense, moe, quality or speed", preset);
}

int64_t TensorPlan::rows() const {
  if (shape.size() < 2) return 1;
  return conv1d ? shape[1] : shape[shape.size() - 2];
}
int64_t TensorPlan::cols() const {
  if (shape.empty()) return 1;
  return conv1d ? shape[0] : shape.back();
}

std::vector<TensorPlan> make_plan(const std::vector<TensorDesc>& tensors, const io::ModelConfig& cfg,
                                  const PlanOptions& opt) {
  CALQ_CHECK(is_known_preset(opt.preset),
             "unknown --mixed-precision preset '{}'; expected dense, moe, quality or speed", opt.preset);
  std::vector<std::regex> keep;
  for (const auto& k : opt.keep) {
    try {
      keep.emplace_back(k);
    } catch (const std::regex_error& e) {
      fail("--keep '{}': invalid regex: {}", k, e.what());
    }
  }
  std::vector<std::regex> over;
  for (const auto& o : opt.overrides) over.emplace_back(o.pattern);

  std::vector<TensorPlan> plan;
  std::vector<std::string> indivisible;
  for (const auto& t : tensors) {
    TensorPlan p;
    p.name = t.name;
    p.shape = t.shape;
    p.dtype = t.dtype;
    p.module = ends_with(t.name, ".weight") ? t.name.substr(0, t.name.size() - 7) : t.name;
    p.kind = classify_tensor(t.name, t.shape.size(), cfg.arch, &p.conv1d);
    bool linear = t.shape.size() == 2 && ends_with(t.name, ".weight") && dtype_is_float(t.dtype);
    bool default_quant = linear && (p.kind == TensorKind::AttnQKV || p.kind == TensorKind::AttnOut ||
                                    p.kind == TensorKind::MlpGateUp || p.kind == TensorKind::MlpDown ||
                                    p.kind == TensorKind::ExpertGateUp ||
                                    p.kind == TensorKind::ExpertDown || p.kind == TensorKind::SharedExpert);
    if (p.kind == TensorKind::AttnQKV) p.fuse_group = parent_of(p.module) + "/qkv";
    if (p.kind == TensorKind::MlpGateUp || p.kind == TensorKind::ExpertGateUp)
      p.fuse_group = parent_of(p.module) + "/gate_up";

    int keep_hit = -1, over_hit = -1;
    for (size_t i = 0; i < keep.size() && keep_hit < 0; ++i)
      if (std::regex_search(p.module, keep[i])) keep_hit = static_cast<int>(i);
    for (size_t i = 0; i < over.size() && over_hit < 0; ++i)
      if (std::regex_search(p.module, over[i])) over_hit = static_cast<int>(i);

    if (keep_hit >= 0) {
      p.reason = "--keep " + opt.keep[keep_hit];
    } else if (over_hit >= 0 && linear) {
      p.format = opt.overrides[over_hit].format;
      p.reason = "--override " + opt.overrides[over_hit].pattern;
    } else if (default_quant) {
      quant::Format f = opt.format;
      auto pg = preset_group(opt.preset, p.kind);
      bool variable_group = f.family == quant::Family::Int || f.family == quant::Family::FP4 ||
                            f.family == quant::Family::NF4;
      if (pg && variable_group && f.group_size > 0) {
        f.group_size = *pg;
        p.reason = "--mixed-precision " + opt.preset;
      } else {
        p.reason = "--format";
      }
      p.format = f;
    } else {
      switch (p.kind) {
        case TensorKind::FusedExperts:
          // qwen3_moe / mixtral banks never get here: io::Checkpoint splits them into per-expert
          // tensors (io/moe_layout.h). A rank-3 expert tensor of another layout is kept as is.
          p.reason = "fused 3-D expert bank of an unknown layout (kept)";
          break;
        case TensorKind::OtherLinear:
          p.reason = "unrecognised module (use --override to quantize it)";
          break;
        default:
          p.reason = std::string(kind_name(p.kind)) + " kept by default";
      }
    }
    if (p.format) {
      try {
        p.format->check_shape(p.rows(), p.cols(), p.module);
      } catch (const Error& e) {
        if (opt.on_indivisible == OnIndivisible::Keep) {
          p.reason = std::string("kept (--on-indivisible keep): ") + e.what();
          p.format.reset();
        } else {
          indivisible.push_back(e.what());
        }
      }
    }
    plan.push_back(std::move(p));
  }
  if (!indivisible.empty()) {
    std::string msg = fmt::format("{} module(s) cannot be quantized with the chosen group size:",
                                  indivisible.size());
    for (size_t i = 0; i < indivisible.size() && i < 8; ++i) msg += "\n  " + indivisible[i];
    if (indivisible.size() > 8) msg += fmt::format("\n  ... and {} more", indivisible.size() - 8);
    msg += "\nchoose another --group-size, add --override/--keep for these modules, or pass "
           "--on-indivisible keep to keep them in their dtype";
    throw Error(msg);
  }
  return plan;
}

}  // namespace calq::pipeline
