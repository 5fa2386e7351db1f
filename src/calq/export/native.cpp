#include "calq/export/native.h"

#include <algorithm>
#include <regex>
#include <set>

#include "calq/core/error.h"

namespace calq::native {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::set<std::string>& packed_suffixes() {
  static const std::set<std::string> s = {"weight",      "weight_packed", "weight_scale", "weight_zero_point",
                                          "weight_global_scale", "weight_g_idx", "weight_shape"};
  return s;
}

bool ends_with(const std::string& s, std::string_view suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// compressed-tensors target matching: exact module name, "re:" regex matched at the start of the
// name (Python re.match), or the class name "Linear".
bool target_matches(const std::string& target, const std::string& module) {
  if (target == module || target == "Linear") return true;
  if (target.rfind("re:", 0) == 0) {
    std::regex re(target.substr(3));
    return std::regex_search(module, re, std::regex_constants::match_continuous);
  }
  return false;
}

}  // namespace

std::string ct_format_name(const quant::Format& f, bool* ct_compatible) {
  bool ok = true;
  std::string name;
  switch (f.family) {
    case quant::Family::Int:
      name = "pack-quantized";
      ok = f.bits == 4 || f.bits == 8;
      break;
    case quant::Family::NVFP4: name = "nvfp4-pack-quantized"; break;
    case quant::Family::MXFP4: name = "mxfp4-pack-quantized"; break;
    case quant::Family::FP8: name = "float-quantized"; break;
    case quant::Family::FP4: name = "calq-fp4-pack-quantized"; ok = false; break;
    case quant::Family::NF4: name = "calq-nf4-pack-quantized"; ok = false; break;
  }
  if (ct_compatible) *ct_compatible = ok;
  return name;
}

json weights_args(const quant::Format& f) {
  json a;
  a["num_bits"] = f.bits;
  a["symmetric"] = f.symmetric;
  a["dynamic"] = false;
  a["actorder"] = nullptr;
  a["observer"] = "minmax";
  a["block_structure"] = nullptr;
  bool per_channel = f.group_size < 0;
  a["group_size"] = per_channel ? json(nullptr) : json(f.group_size);
  a["strategy"] = per_channel ? "channel" : "group";
  switch (f.family) {
    case quant::Family::Int: a["type"] = "int"; break;
    case quant::Family::FP8: a["type"] = "float"; break;
    case quant::Family::NVFP4:
      a["type"] = "float";
      a["strategy"] = "tensor_group";
      a["scale_dtype"] = "torch.float8_e4m3fn";
      break;
    case quant::Family::MXFP4:
      a["type"] = "float";
      a["scale_dtype"] = "torch.uint8";
      break;
    case quant::Family::FP4:
      a["type"] = "float";
      a["scale_dtype"] = "torch.float16";
      break;
    case quant::Family::NF4:
      a["type"] = "nf4";
      a["scale_dtype"] = "torch.float16";
      break;
  }
  return a;
}

quant::Format format_from_args(const json& w, const std::string& fmt_name, const std::string& what) {
  return with_context(what, [&] {
    CALQ_CHECK(w.is_object(), "weights quantization args are not an object");
    int bits = w.value("num_bits", 0);
    std::string type = w.value("type", "int");
    bool sym = w.value("symmetric", true);
    std::optional<int> group;
    if (w.contains("group_size") && w["group_size"].is_number_integer()) group = w["group_size"].get<int>();
    std::string strategy = w.value("strategy", "group");
    if (strategy == "channel") group = -1;
    std::string name;
    if (fmt_name == "nvfp4-pack-quantized") name = "nvfp4";
    else if (fmt_name == "mxfp4-pack-quantized") name = "mxfp4";
    else if (fmt_name == "calq-fp4-pack-quantized") name = "fp4";
    else if (fmt_name == "calq-nf4-pack-quantized") name = "nf4";
    else if (fmt_name == "float-quantized" && type == "float" && bits == 8) name = "fp8";
    else if ((fmt_name == "pack-quantized" || fmt_name == "calq-int-pack-quantized") && type == "int")
      name = "int" + std::to_string(bits);
    else
      fail("unsupported quantization format '{}' (type {}, {} bits)", fmt_name, type, bits);
    return quant::Format::parse(name, group, sym);
  });
}

json make_quantization_config(const std::vector<QuantizedModule>& modules,
                              const std::vector<std::string>& ignored, const json& calq_extra) {
  // One config group per distinct (format name, weights args).
  std::vector<std::pair<std::string, json>> keys;  // (format name, args)
  std::vector<std::vector<std::string>> members;
  bool all_ct = true;
  std::vector<std::string> conv1d;
  for (const auto& m : modules) {
    bool ok = false;
    std::string fname = ct_format_name(m.format, &ok);
    all_ct = all_ct && ok;
    json args = weights_args(m.format);
    size_t g = 0;
    while (g < keys.size() && !(keys[g].first == fname && keys[g].second == args)) ++g;
    if (g == keys.size()) {
      keys.emplace_back(fname, args);
      members.emplace_back();
    }
    members[g].push_back(m.module);
    if (m.conv1d) conv1d.push_back(m.module);
  }
  json groups = json::object();
  std::set<std::string> formats;
  for (size_t g = 0; g < keys.size(); ++g) {
    json grp;
    // A single group targets the Linear class (what llm-compressor writes); the ignore list then
    // names every Linear that was kept. Several groups name their modules exactly.
    grp["targets"] = keys.size() == 1 ? json::array({"Linear"}) : json(members[g]);
    grp["weights"] = keys[g].second;
    grp["input_activations"] = nullptr;
    grp["output_activations"] = nullptr;
    grp["format"] = keys[g].first;
    groups["group_" + std::to_string(g)] = grp;
    formats.insert(keys[g].first);
  }
  json q;
  q["quant_method"] = all_ct ? "compressed-tensors" : "calq";
  q["format"] = formats.size() == 1 ? *formats.begin() : std::string("mixed-precision");
  q["quantization_status"] = "compressed";
  q["config_groups"] = groups;
  q["ignore"] = ignored;
  q["kv_cache_scheme"] = nullptr;
  json extra = calq_extra;
  if (!conv1d.empty()) extra["conv1d_modules"] = conv1d;
  q["calq"] = extra;
  return q;
}

Model Model::open(const fs::path& dir) {
  Model m;
  m.dir_ = dir;
  m.config_ = io::load_config(dir);
  m.ckpt_ = io::Checkpoint::open(dir);
  const json& raw = m.config_.raw;
  std::map<std::string, std::string> tensor_owner;  // stored tensor -> quantized module
  std::map<std::string, quant::Format> module_format;
  std::set<std::string> conv1d;
  if (raw.contains("quantization_config")) {
    m.qcfg_ = raw["quantization_config"];
    std::string method = m.qcfg_.value("quant_method", "");
    CALQ_CHECK(method == "compressed-tensors" || method == "calq",
               "{}: quantization_config.quant_method '{}' is not readable by calq (supported: "
               "compressed-tensors, calq)", (dir / "config.json").string(), method);
    m.quantized_ = true;
    if (m.qcfg_.contains("calq") && m.qcfg_["calq"].contains("conv1d_modules"))
      for (const auto& c : m.qcfg_["calq"]["conv1d_modules"]) conv1d.insert(c.get<std::string>());
    std::set<std::string> ignore;
    if (m.qcfg_.contains("ignore"))
      for (const auto& i : m.qcfg_["ignore"]) ignore.insert(i.get<std::string>());
    std::string top_format = m.qcfg_.value("format", "");
    const json& groups = m.qcfg_.contains("config_groups") ? m.qcfg_["config_groups"] : json::object();
    // A module is stored quantized when it has a weight_scale tensor.
    for (const auto& n : m.ckpt_.names()) {
      if (!ends_with(n, ".weight_scale")) continue;
      std::string module = n.substr(0, n.size() - 13);
      if (ignore.count(module)) continue;
      std::optional<quant::Format> f;
      for (const auto& [gname, g] : groups.items()) {
        bool hit = false;
        for (const auto& t : g.value("targets", json::array()))
          if (target_matches(t.get<std::string>(), module)) hit = true;
        if (!hit) continue;
        std::string fname = g.value("format", top_format);
        f = format_from_args(g.value("weights", json::object()), fname,
                             (dir / "config.json").string() + ": config group " + gname);
        break;
      }
      CALQ_CHECK(f.has_value(), "{}: tensor {} has quantization scales but no config group targets module {}",
                 (dir / "config.json").string(), n, module);
      module_format[module] = *f;
    }
    for (const auto& n : m.ckpt_.names()) {
      auto dot = n.rfind('.');
      if (dot == std::string::npos) continue;
      std::string module = n.substr(0, dot), suffix = n.substr(dot + 1);
      if (module_format.count(module) && packed_suffixes().count(suffix)) tensor_owner[n] = module;
    }
  }
  for (const auto& [module, f] : module_format) {
    Entry e;
    e.name = module + ".weight";
    e.format = f;
    e.conv1d = conv1d.count(module) > 0;
    e.dtype = DType::BF16;
    if (m.config_.torch_dtype == "float16") e.dtype = DType::F16;
    if (m.config_.torch_dtype == "float32") e.dtype = DType::F32;
    std::string shape_name = module + ".weight_shape";
    if (m.ckpt_.contains(shape_name)) {
      auto v = m.ckpt_.view(shape_name);
      CALQ_CHECK(v.dtype == DType::I64 && v.numel() == 2, "{}: {} must be int64 [2]",
                 m.ckpt_.file_of(shape_name).path().string(), shape_name);
      const auto* s = reinterpret_cast<const int64_t*>(v.data);
      e.shape = {s[0], s[1]};
    } else if (m.ckpt_.contains(module + ".weight")) {  // fp8 float-quantized keeps the weight shape
      e.shape = m.ckpt_.info(module + ".weight").shape;
    } else if (m.ckpt_.contains(module + ".weight_packed") && m.ckpt_.info(module + ".weight_packed").shape.size() == 2 &&
               f.family != quant::Family::Int) {  // nvfp4/mxfp4: two E2M1 codes per byte
      const auto& s = m.ckpt_.info(module + ".weight_packed").shape;
      e.shape = {s[0], s[1] * 2};
    } else {
      fail("{}: quantized module {} has neither weight_shape nor weight", m.dir_.string(), module);
    }
    if (e.conv1d) std::swap(e.shape[0], e.shape[1]);
    m.entries_.push_back(e);
  }
  // Rotations: quantization_config.calq.rotations names every rotated module; its sign vector
  // is the tensor <module>.rotation_signs (F32 [in]).
  std::set<std::string> sign_tensors;
  if (m.qcfg_.contains("calq") && m.qcfg_["calq"].contains("rotations")) {
    const std::string cfgp = (dir / "config.json").string();
    for (const auto& [module, rj] : m.qcfg_["calq"]["rotations"].items()) {
      CALQ_CHECK(rj.value("type", "") == "hadamard", "{}: rotation of {} has type '{}' (supported: hadamard)", cfgp,
                 module, rj.value("type", ""));
      const std::string sname = rj.value("signs", rotation_signs_name(module));
      CALQ_CHECK(m.ckpt_.contains(sname),
                 "{}: module {} is rotated but its sign vector {} is missing from the checkpoint; the model "
                 "cannot be evaluated without it (re-quantize, or copy the shard that holds it)",
                 cfgp, module, sname);
      int64_t in = 0;
      if (module_format.count(module)) {
        for (const auto& e : m.entries_)
          if (e.name == module + ".weight") in = e.conv1d ? e.shape[0] : e.shape[1];
      } else {
        CALQ_CHECK(m.ckpt_.contains(module + ".weight"), "{}: rotation recorded for {}, which has no weight", cfgp,
                   module);
        const auto& sh = m.ckpt_.info(module + ".weight").shape;
        CALQ_CHECK(sh.size() == 2, "{}: rotated module {} has a weight of rank {}", cfgp, module, sh.size());
        in = conv1d.count(module) ? sh[0] : sh[1];
      }
      auto v = m.ckpt_.view(sname);
      CALQ_CHECK(v.dtype == DType::F32 && v.shape.size() == 1 && v.numel() == in,
                 "{}: sign vector {} has dtype {} and shape {}, expected F32 [{}] (the input width of {}); the "
                 "checkpoint is damaged or was written for another model",
                 m.ckpt_.file_of(sname).path().string(), sname, dtype_name(v.dtype), shape_str(v.shape), in, module);
      quant::Rotation r;
      r.dim = in;
      r.seed = rj.value("seed", uint64_t{0});
      const auto* sv = reinterpret_cast<const float*>(v.data);
      r.signs.assign(sv, sv + in);
      for (int64_t i = 0; i < in; ++i)
        CALQ_CHECK(r.signs[i] == 1.f || r.signs[i] == -1.f, "{}: sign vector {} holds {} at index {} (expected ±1)",
                   m.ckpt_.file_of(sname).path().string(), sname, r.signs[i], i);
      const json& b = rj.contains("block") ? rj["block"] : json("full");
      if (b.is_string()) {
        CALQ_CHECK(b.get<std::string>() == "full", "{}: rotation block of {} is '{}' (a size or \"full\")", cfgp,
                   module, b.get<std::string>());
        r.block = in;
      } else {
        r.block = b.get<int64_t>();
        CALQ_CHECK(r.block >= 2 && (r.block & (r.block - 1)) == 0 && in % r.block == 0,
                   "{}: rotation block {} of {} is not a power of two dividing its input width {}", cfgp, r.block,
                   module, in);
      }
      if (r.block == in && (in & (in - 1)) != 0)
        r.full = with_context(cfgp + ": rotation of " + module, [&] { return quant::hadamard_matrix(in); });
      m.rotations_[module] = std::move(r);
      sign_tensors.insert(sname);
    }
  }
  for (const auto& n : m.ckpt_.names())
    CALQ_CHECK(!ends_with(n, ".rotation_signs") || sign_tensors.count(n),
               "{}: tensor {} is a rotation sign vector but quantization_config.calq.rotations does not record "
               "its rotation; the model's weights are in a rotated basis and cannot be used as they are",
               dir.string(), n);
  for (const auto& n : m.ckpt_.names()) {
    if (tensor_owner.count(n) || sign_tensors.count(n)) continue;
    const auto& info = m.ckpt_.info(n);
    Entry e;
    e.name = n;
    e.shape = info.shape;
    e.dtype = info.dtype;
    e.stored_bytes = info.end - info.begin;
    m.entries_.push_back(e);
  }
  for (const auto& [n, module] : tensor_owner) {
    const auto& info = m.ckpt_.info(n);
    for (auto& e : m.entries_)
      if (e.name == module + ".weight" && e.format) e.stored_bytes += info.end - info.begin;
  }
  std::sort(m.entries_.begin(), m.entries_.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  for (size_t i = 0; i < m.entries_.size(); ++i) m.index_[m.entries_[i].name] = i;
  return m;
}

bool Model::contains(const std::string& name) const { return index_.count(name) > 0; }

const Entry& Model::entry(const std::string& name) const {
  auto it = index_.find(name);
  CALQ_CHECK(it != index_.end(), "{}: no tensor named {}", dir_.string(), name);
  return entries_[it->second];
}

quant::QuantizedWeight Model::load_quantized(const std::string& name) const {
  const Entry& e = entry(name);
  CALQ_CHECK(e.format.has_value(), "{}: tensor {} is not quantized", dir_.string(), name);
  std::string module = name.substr(0, name.size() - 7);
  std::map<std::string, TensorView> parts;
  for (const auto& s : packed_suffixes())
    if (ckpt_.contains(module + "." + s)) parts[s] = ckpt_.view(module + "." + s);
  return quant::unpack(*e.format, parts, module);
}

std::vector<float> Model::load_f32(const std::string& name) const {
  const Entry& e = entry(name);
  if (!e.format) {
    auto v = ckpt_.view(name);
    CALQ_CHECK(dtype_is_float(v.dtype), "{}: tensor {} has dtype {}, not a float type", dir_.string(), name,
               dtype_name(v.dtype));
    std::vector<float> out(static_cast<size_t>(v.numel()));
    to_f32(v.data, v.dtype, out.data(), out.size());
    return out;
  }
  auto w = load_quantized(name).dequantize();
  if (!e.conv1d) return w;
  // Stored as [out, in]; the HF Conv1D layout is [in, out].
  return transpose(w, e.shape[1], e.shape[0]);
}

const quant::Rotation* Model::rotation(const std::string& module) const {
  auto it = rotations_.find(module);
  return it == rotations_.end() ? nullptr : &it->second;
}

std::vector<float> Model::load_f32_unrotated(const std::string& name) const {
  std::vector<float> w = load_f32(name);
  if (name.size() < 7 || name.compare(name.size() - 7, 7, ".weight") != 0) return w;
  const quant::Rotation* r = rotation(name.substr(0, name.size() - 7));
  if (!r) return w;
  CALQ_CHECK(!entry(name).conv1d, "{}: {} is a rotated Conv1D weight; unrotating it is not supported", dir_.string(),
             name);
  r->apply_rows_inverse(w.data(), static_cast<int64_t>(w.size()) / r->dim);
  return w;
}

std::string rotation_signs_name(const std::string& module) { return module + ".rotation_signs"; }

json rotation_json(const quant::Rotation& r, const std::string& module) {
  json j = {{"type", "hadamard"}, {"seed", r.seed}, {"dim", r.dim}, {"signs", rotation_signs_name(module)}};
  j["block"] = r.block == r.dim ? json("full") : json(r.block);
  if (r.block == r.dim && (r.dim & (r.dim - 1)) != 0) j["construction"] = "sylvester-kron-paley";
  return j;
}

}  // namespace calq::native
