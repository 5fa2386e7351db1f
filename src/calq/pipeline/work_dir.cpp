#include "calq/pipeline/work_dir.h"

#include <cstring>

#include "calq/io/cleanup.h"
#include <fstream>

#include <fmt/format.h>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/data/fetch.h"
#include "calq/io/atomic.h"

namespace calq::pipeline {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kChunkMagic[8] = {'C', 'A', 'L', 'Q', 'A', 'C', 'T', '1'};

uint64_t chunk_bytes(const engine::Activations& a) {
  return a.data.size() * sizeof(float) + a.lengths.size() * sizeof(int64_t) + 64;
}

std::string layer_name(const char* kind, int64_t layer) { return fmt::format("{}_{:05d}", kind, layer); }

json read_json(const fs::path& p) {
  std::ifstream f(p);
  CALQ_CHECK(f.good(), "cannot read {}", p.string());
  try {
    return json::parse(f);
  } catch (const std::exception& e) {
    fail("{}: not valid JSON ({})", p.string(), e.what());
  }
}

void diff(const json& a, const json& b, const std::string& key, std::vector<std::string>& out) {
  if (a.is_object() && b.is_object()) {
    for (auto it = a.begin(); it != a.end(); ++it)
      diff(it.value(), b.contains(it.key()) ? b[it.key()] : json(), key.empty() ? it.key() : key + "." + it.key(), out);
    for (auto it = b.begin(); it != b.end(); ++it)
      if (!a.contains(it.key())) diff(json(), it.value(), key.empty() ? it.key() : key + "." + it.key(), out);
    return;
  }
  if (a != b) {
    auto show = [](const json& v) {
      std::string s = v.is_null() ? "(absent)" : v.dump();
      return s.size() > 80 ? s.substr(0, 77) + "..." : s;
    };
    out.push_back(fmt::format("{}: {} -> {}", key, show(a), show(b)));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ActivationStore

ActivationStore::ActivationStore(fs::path dir, uint64_t budget, size_t chunks)
    : dir_(std::move(dir)), budget_(budget), slots_(chunks) {
  fs::create_directories(dir_);
}

fs::path ActivationStore::file(size_t i) const { return dir_ / fmt::format("chunk_{:05d}.bin", i); }

size_t ActivationStore::chunks_on_disk() const {
  size_t n = 0;
  for (auto& s : slots_) n += s.mem ? 0 : 1;
  return n;
}

void ActivationStore::write_chunk(const fs::path& f, const engine::Activations& a) {
  const fs::path tmp = f.string() + ".tmp";
  io::TempGuard guard(tmp);
  {
    std::ofstream o(tmp, std::ios::binary | std::ios::trunc);
    CALQ_CHECK(o.good(), "cannot write activation file {}", tmp.string());
    const int64_t hdr[3] = {a.batch, a.seq, a.hidden};
    o.write(kChunkMagic, sizeof kChunkMagic);
    o.write(reinterpret_cast<const char*>(hdr), sizeof hdr);
    o.write(reinterpret_cast<const char*>(a.lengths.data()), static_cast<std::streamsize>(a.lengths.size() * 8));
    o.write(reinterpret_cast<const char*>(a.data.data()), static_cast<std::streamsize>(a.data.size() * 4));
    o.flush();
    CALQ_CHECK(o.good(), "writing activation file {} failed (disk full?)", tmp.string());
  }
  fs::rename(tmp, f);
}

engine::Activations ActivationStore::read_chunk(const fs::path& f) {
  std::ifstream in(f, std::ios::binary);
  CALQ_CHECK(in.good(), "cannot read activation file {}", f.string());
  char magic[8];
  int64_t hdr[3];
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(hdr), sizeof hdr);
  CALQ_CHECK(in.good() && std::memcmp(magic, kChunkMagic, 8) == 0, "{}: not a calq activation file", f.string());
  CALQ_CHECK(hdr[0] > 0 && hdr[1] > 0 && hdr[2] > 0 && hdr[0] < (1 << 24) && hdr[1] < (1 << 24) && hdr[2] < (1 << 24),
             "{}: corrupt header", f.string());
  engine::Activations a;
  a.batch = hdr[0];
  a.seq = hdr[1];
  a.hidden = hdr[2];
  a.lengths.resize(static_cast<size_t>(a.batch));
  a.data.resize(static_cast<size_t>(a.batch * a.seq * a.hidden));
  in.read(reinterpret_cast<char*>(a.lengths.data()), static_cast<std::streamsize>(a.lengths.size() * 8));
  in.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(a.data.size() * 4));
  CALQ_CHECK(in.good() && in.peek() == std::char_traits<char>::eof(), "{}: truncated or oversized activation file",
             f.string());
  return a;
}

ActivationStore ActivationStore::open(const fs::path& dir, uint64_t budget) {
  std::vector<fs::path> files;
  CALQ_CHECK(fs::is_directory(dir), "activation checkpoint {} is missing", dir.string());
  for (auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".bin") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  CALQ_CHECK(!files.empty(), "activation checkpoint {} is empty", dir.string());
  ActivationStore s(dir, budget, files.size());
  for (size_t i = 0; i < files.size(); ++i) {
    CALQ_CHECK(files[i] == s.file(i), "activation checkpoint {}: unexpected file {}", dir.string(),
               files[i].filename().string());
    s.slots_[i].on_disk = true;
    auto a = read_chunk(files[i]);  // validates every file
    s.slots_[i].bytes = chunk_bytes(a);
    s.on_disk_ += s.slots_[i].bytes;
    if (budget == 0 || s.in_memory_ + s.slots_[i].bytes <= budget) {
      s.in_memory_ += s.slots_[i].bytes;
      s.slots_[i].mem = std::move(a);
    }
  }
  return s;
}

engine::Activations ActivationStore::get(size_t i) const {
  const Slot& s = slots_.at(i);
  if (s.mem) return *s.mem;
  CALQ_CHECK(s.on_disk, "activation chunk {} was never stored", i);
  return read_chunk(file(i));
}

void ActivationStore::put(size_t i, engine::Activations a) {
  Slot& s = slots_.at(i);
  if (s.mem) in_memory_ -= s.bytes;
  if (s.on_disk) on_disk_ -= s.bytes;
  s.mem.reset();
  s.on_disk = false;
  s.bytes = chunk_bytes(a);
  if (budget_ == 0 || in_memory_ + s.bytes <= budget_) {
    in_memory_ += s.bytes;
    s.mem = std::move(a);
  } else {
    write_chunk(file(i), a);
    s.on_disk = true;
    on_disk_ += s.bytes;
  }
}

void ActivationStore::persist() {
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    CALQ_CHECK(s.mem || s.on_disk, "activation chunk {} was never stored", i);
    if (!s.on_disk) {
      write_chunk(file(i), *s.mem);
      s.on_disk = true;
      on_disk_ += s.bytes;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// WorkDir

std::vector<std::string> manifest_differences(const json& saved, const json& now) {
  std::vector<std::string> out;
  diff(saved, now, "", out);
  return out;
}

json model_fingerprint(const fs::path& model_dir) {
  const fs::path dir = fs::is_directory(model_dir) ? model_dir : model_dir.parent_path();
  json fp;
  fp["config_sha256"] = fs::exists(dir / "config.json") ? data::sha256_file(dir / "config.json") : "";
  auto ck = io::Checkpoint::open(model_dir);
  std::string desc;
  for (auto& n : ck.names()) {
    const auto& i = ck.info(n);
    desc += fmt::format("{}|{}|{}|{}\n", n, dtype_name(i.dtype), shape_str(i.shape), i.end - i.begin);
  }
  fp["tensors_sha256"] = data::sha256_hex(desc);
  fp["tensors"] = ck.names().size();
  return fp;
}

WorkDir::WorkDir(fs::path dir, const json& manifest, bool resume, bool overwrite) : dir_(std::move(dir)) {
  const fs::path mf = dir_ / "manifest.json";
  if (resume) {
    CALQ_CHECK(fs::exists(mf), "--resume: {} holds no interrupted run (no manifest.json); run without --resume",
               dir_.string());
    const json saved = read_json(mf);
    auto d = manifest_differences(saved, manifest);
    if (!d.empty()) {
      std::string lines;
      for (auto& l : d) lines += "\n  " + l;
      fail("--resume: the run in {} was started with a different model or options; refusing to mix them:{}\n"
           "Run with the original options, or remove {} to start over.",
           dir_.string(), lines, dir_.string());
    }
    if (fs::exists(dir_ / "state.json")) completed_ = read_json(dir_ / "state.json").at("completed_layers").get<int64_t>();
    log_info("resuming {}: {} layer(s) already done", dir_.string(), completed_);
    return;
  }
  if (fs::exists(dir_)) {
    CALQ_CHECK(overwrite, "work directory {} exists (an interrupted run?): pass --resume to continue it, or "
                          "--overwrite to discard it", dir_.string());
    fs::remove_all(dir_);
  }
  fs::create_directories(dir_);
  io::write_file_atomic(mf, manifest.dump(2) + "\n");
}

fs::path WorkDir::acts_dir(int64_t layer) const { return dir_ / layer_name("acts", layer); }

void WorkDir::finish_layer(int64_t layer, const LayerOutput& out, ActivationStore* next) {
  const fs::path ldir = dir_ / layer_name("layer", layer);
  layer_json_.erase(layer);
  open_.erase(layer);
  {
    io::AtomicDir ad(ldir, true);
    io::SafetensorsWriter w(ad.path(), 1ull << 62, {{"format", "calq-layer"}});
    std::vector<std::pair<std::string, Tensor>> tensors;
    json weights = json::object(), replaced = json::array();
    for (auto& [name, q] : out.weights) {
      for (auto& [suffix, t] : quant::pack(q)) tensors.emplace_back(name + "#" + suffix, std::move(t));
      weights[name] = {{"saturated_scales", q.saturated_scales}};
      auto rit = out.rotations.find(name);
      if (rit != out.rotations.end())
        weights[name]["rotation"] = {{"dim", rit->second.dim}, {"block", rit->second.block}, {"seed", rit->second.seed}};
    }
    for (auto& [name, t] : out.replaced) {
      tensors.emplace_back("replaced#" + name, t);
      replaced.push_back(name);
    }
    for (auto& [n, t] : tensors) w.declare(n, t.dtype, t.shape);
    for (auto& [n, t] : tensors) w.write(n, t);
    if (!tensors.empty()) w.finish();
    io::write_file_atomic(ad.path() / "layer.json",
                          json({{"layer", layer}, {"weights", weights}, {"replaced", replaced}, {"report", out.report}})
                                  .dump(1) + "\n");
    ad.commit();
  }
  if (next) next->persist();
  io::write_file_atomic(dir_ / "state.json", json({{"completed_layers", layer + 1}}).dump() + "\n");
  completed_ = layer + 1;
  std::error_code ec;
  fs::remove_all(acts_dir(layer), ec);
}

const json& WorkDir::layer_json(int64_t layer) const {
  auto it = layer_json_.find(layer);
  if (it == layer_json_.end())
    it = layer_json_.emplace(layer, read_json(dir_ / layer_name("layer", layer) / "layer.json")).first;
  return it->second;
}

const io::Checkpoint& WorkDir::layer_file(int64_t layer) const {
  auto it = open_.find(layer);
  if (it == open_.end())
    it = open_.emplace(layer, io::Checkpoint::open(dir_ / layer_name("layer", layer) / "model.safetensors")).first;
  return it->second;
}

std::map<std::string, int64_t> WorkDir::weight_index() const {
  std::map<std::string, int64_t> idx;
  for (int64_t l = 0; l < completed_; ++l) {
    const json& j = layer_json(l);
    for (auto& [name, v] : j.at("weights").items()) idx[name] = l;
  }
  return idx;
}

std::map<std::string, int64_t> WorkDir::replaced_index() const {
  std::map<std::string, int64_t> idx;
  for (int64_t l = 0; l < completed_; ++l) {
    const json& j = layer_json(l);
    for (auto& name : j.at("replaced")) idx[name.get<std::string>()] = l;
  }
  return idx;
}

std::map<std::string, quant::Rotation> WorkDir::rotations(int64_t layer) const {
  std::map<std::string, quant::Rotation> out;
  for (int64_t l = layer >= 0 ? layer : 0; l < (layer >= 0 ? layer + 1 : completed_); ++l) {
    const json& j = layer_json(l);
    for (auto& [name, v] : j.at("weights").items())
      if (v.contains("rotation")) {
        const json& r = v["rotation"];
        out.emplace(name, quant::Rotation::make(r.at("dim").get<int64_t>(), r.at("block").get<int64_t>(),
                                                r.at("seed").get<uint64_t>()));
      }
  }
  return out;
}

json WorkDir::layer_report(int64_t layer) const { return layer_json(layer).at("report"); }

bool WorkDir::weight_has_g_idx(int64_t layer, const std::string& name) const {
  return layer_file(layer).contains(name + "#weight_g_idx");
}

quant::QuantizedWeight WorkDir::load_weight(int64_t layer, const std::string& name, const quant::Format& f) const {
  const auto& ck = layer_file(layer);
  std::map<std::string, TensorView> views;
  const std::string prefix = name + "#";
  for (auto& n : ck.names())
    if (n.compare(0, prefix.size(), prefix) == 0) views[n.substr(prefix.size())] = ck.view(n);
  CALQ_CHECK(!views.empty(), "work directory {}: layer {} has no tensor {}", dir_.string(), layer, name);
  auto q = quant::unpack(f, views, name);
  q.saturated_scales = layer_json(layer).at("weights").at(name).at("saturated_scales").get<int64_t>();
  return q;
}

Tensor WorkDir::load_replaced(int64_t layer, const std::string& name) const {
  auto v = layer_file(layer).view("replaced#" + name);
  Tensor t(v.dtype, v.shape);
  std::memcpy(t.bytes.data(), v.data, v.nbytes);
  return t;
}

void WorkDir::remove() {
  open_.clear();
  layer_json_.clear();
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

}  // namespace calq::pipeline
