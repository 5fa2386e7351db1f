#include "calq/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "calq/core/error.h"

namespace calq::io {

using nlohmann::json;

namespace {
constexpr uint64_t kMaxHeader = 100ull << 20;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  CALQ_CHECK(fd >= 0, "{}: cannot open: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail("{}: cannot stat: {}", path.string(), std::strerror(err));
  }
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    ::close(fd);
    CALQ_CHECK(p != MAP_FAILED, "{}: cannot mmap: {}", path.string(), std::strerror(err));
    f->base_ = static_cast<const std::byte*>(p);
    f->mapped_ = true;
  } else {
    ::close(fd);
  }
  f->parse(path.string());
  return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::from_memory(const std::byte* data, size_t size,
                                                              std::string label) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = label;
  f->base_ = data;
  f->size_ = size;
  f->parse(std::move(label));
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapped_) ::munmap(const_cast<std::byte*>(base_), size_);
}

void SafetensorsFile::parse(std::string label) {
  CALQ_CHECK(size_ >= 8, "{}: not a safetensors file: {} bytes, shorter than the 8-byte header length (truncated?)",
             label, size_);
  uint64_t n = 0;
  std::memcpy(&n, base_, 8);
  CALQ_CHECK(n <= kMaxHeader, "{}: header length {} exceeds the 100 MiB limit (corrupt file?)", label, n);
  CALQ_CHECK(n <= size_ - 8, "{}: header length {} runs past the end of the {}-byte file (truncated?)", label, n,
             size_);
  data_start_ = 8 + n;
  json h;
  try {
    h = json::parse(reinterpret_cast<const char*>(base_) + 8, reinterpret_cast<const char*>(base_) + 8 + n);
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {}", label, e.what());
  }
  CALQ_CHECK(h.is_object(), "{}: header is not a JSON object", label);
  const uint64_t data_size = size_ - data_start_;
  for (auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      CALQ_CHECK(v.is_object(), "{}: __metadata__ is not an object", label);
      for (auto& [k, mv] : v.items()) {
        CALQ_CHECK(mv.is_string(), "{}: __metadata__ value of '{}' is not a string", label, k);
        metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    CALQ_CHECK(v.is_object(), "{}: tensor {}: entry is not an object", label, name);
    CALQ_CHECK(v.contains("dtype") && v["dtype"].is_string(), "{}: tensor {}: missing dtype", label, name);
    std::string dt = v["dtype"].get<std::string>();
    auto dtype = dtype_from_name(dt);
    CALQ_CHECK(dtype.has_value(), "{}: tensor {}: unknown dtype '{}'", label, name, dt);
    CALQ_CHECK(v.contains("shape") && v["shape"].is_array(), "{}: tensor {}: missing shape", label, name);
    TensorInfo t;
    t.name = name;
    t.dtype = *dtype;
    for (const auto& d : v["shape"]) {
      CALQ_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                 "{}: tensor {}: shape must hold non-negative integers, got {}", label, name, v["shape"].dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = v.contains("data_offsets") ? v["data_offsets"] : json();
    CALQ_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
               "{}: tensor {}: data_offsets must be two non-negative integers", label, name);
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    CALQ_CHECK(t.begin <= t.end, "{}: tensor {}: data_offsets [{}, {}] are reversed", label, name, t.begin, t.end);
    int64_t numel = with_context(label + ": tensor " + name, [&] { return shape_numel(t.shape); });
    uint64_t nbytes = static_cast<uint64_t>(numel);
    CALQ_CHECK(nbytes <= UINT64_MAX / dtype_size(t.dtype), "{}: tensor {}: size overflows", label, name);
    nbytes *= dtype_size(t.dtype);
    CALQ_CHECK(t.end - t.begin == nbytes,
               "{}: tensor {}: data_offsets [{}, {}] hold {} bytes but shape {} of {} needs {}", label, name,
               t.begin, t.end, t.end - t.begin, shape_str(t.shape), dt, nbytes);
    CALQ_CHECK(t.end <= data_size, "{}: tensor {}: data ends at byte {} but the file holds {} data bytes (truncated?)",
               label, name, t.end, data_size);
    tensors_.push_back(std::move(t));
  }
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const auto& t : tensors_) {
    CALQ_CHECK(t.begin >= pos || t.begin == t.end,
               "{}: tensor {} (bytes {}..{}) overlaps the previous tensor (which ends at {})", label, t.name,
               t.begin, t.end, pos);
    CALQ_CHECK(t.begin <= pos, "{}: gap of {} bytes before tensor {} (bytes {}..{})", label, t.begin - pos, t.name,
               t.begin, t.end);
    pos = std::max(pos, t.end);
  }
  CALQ_CHECK(pos == data_size, "{}: {} trailing bytes after the last tensor (data holds {}, tensors end at {})",
             label, data_size - pos, data_size, pos);
  for (size_t i = 0; i < tensors_.size(); ++i) {
    CALQ_CHECK(index_.emplace(tensors_[i].name, i).second, "{}: duplicate tensor {}", label, tensors_[i].name);
  }
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  CALQ_CHECK(it != index_.end(), "{}: no tensor named {}", path_.string(), name);
  return tensors_[it->second];
}

TensorView SafetensorsFile::view(const std::string& name) const {
  const auto& t = info(name);
  return {t.dtype, t.shape, base_ + data_start_ + t.begin, static_cast<size_t>(t.end - t.begin)};
}

void SafetensorsFile::release(const std::string& name) const {
  if (!mapped_) return;
  const auto& t = info(name);
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  uintptr_t begin = reinterpret_cast<uintptr_t>(base_ + data_start_ + t.begin);
  uintptr_t end = reinterpret_cast<uintptr_t>(base_ + data_start_ + t.end);
  begin = (begin + page - 1) / page * page;  // only whole pages inside this tensor
  end = end / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

// ---------------- Checkpoint ----------------

Checkpoint Checkpoint::open(const fs::path& p) {
  Checkpoint c;
  std::error_code ec;
  CALQ_CHECK(fs::exists(p, ec), "{}: no such file or directory", p.string());
  std::vector<fs::path> files;
  fs::path index = p / "model.safetensors.index.json";
  json weight_map;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(index, ec)) {
      std::ifstream in(index);
      json j;
      try {
        j = json::parse(in);
      } catch (const json::exception& e) {
        fail("{}: not valid JSON: {}", index.string(), e.what());
      }
      CALQ_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
                 "{}: missing weight_map", index.string());
      weight_map = j["weight_map"];
      std::set<std::string> shards;
      for (auto& [name, f] : weight_map.items()) {
        CALQ_CHECK(f.is_string(), "{}: weight_map entry {} is not a file name", index.string(), name);
        shards.insert(f.get<std::string>());
      }
      CALQ_CHECK(!shards.empty(), "{}: weight_map is empty", index.string());
      for (const auto& s : shards) {
        CALQ_CHECK(s.find('/') == std::string::npos, "{}: shard name {} must be a plain file name", index.string(), s);
        CALQ_CHECK(fs::exists(p / s, ec), "{}: shard {} listed in {} is missing", p.string(), s, index.filename().string());
        files.push_back(p / s);
      }
    } else if (fs::exists(p / "model.safetensors", ec)) {
      files.push_back(p / "model.safetensors");
    } else {
      fail("{}: no model.safetensors or model.safetensors.index.json", p.string());
    }
  } else {
    files.push_back(p);
  }
  for (const auto& f : files) {
    c.files_.push_back(SafetensorsFile::open(f));
    c.shard_paths_.push_back(f);
    size_t idx = c.files_.size() - 1;
    for (const auto& t : c.files_.back()->tensors()) {
      if (!weight_map.is_null()) {
        auto it = weight_map.find(t.name);
        CALQ_CHECK(it != weight_map.end(), "{}: tensor {} is not listed in model.safetensors.index.json",
                   f.string(), t.name);
        CALQ_CHECK(it->get<std::string>() == f.filename().string(),
                   "{}: tensor {} is listed in the index under {}", f.string(), t.name, it->get<std::string>());
      }
      CALQ_CHECK(c.where_.emplace(t.name, idx).second, "{}: tensor {} appears in two shards", f.string(), t.name);
    }
  }
  if (!weight_map.is_null())
    for (auto& [name, f] : weight_map.items())
      CALQ_CHECK(c.where_.count(name), "{}: tensor {} listed in the index is missing from {}", (p / f.get<std::string>()).string(), name,
                 f.get<std::string>());
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : where_) n.push_back(k);
  return n;
}
bool Checkpoint::contains(const std::string& name) const { return where_.count(name) > 0; }
const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  CALQ_CHECK(it != where_.end(), "no tensor named {} in the checkpoint", name);
  return *files_[it->second];
}
const TensorInfo& Checkpoint::info(const std::string& name) const { return file_of(name).info(name); }
TensorView Checkpoint::view(const std::string& name) const { return file_of(name).view(name); }
void Checkpoint::release(const std::string& name) const { file_of(name).release(name); }
uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_)
    for (const auto& t : f->tensors()) n += t.end - t.begin;
  return n;
}

// ---------------- Writer ----------------

struct SafetensorsWriter::Impl {
  struct Decl {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t nbytes = 0, offset = 0;
    size_t shard = 0;
    bool written = false;
  };
  struct Shard {
    std::string name;
    fs::path tmp;
    int fd = -1;
    uint64_t data_start = 0, bytes = 0;
  };
  fs::path dir;
  uint64_t max_shard;
  std::map<std::string, std::string> metadata;
  std::vector<Decl> decls;
  std::map<std::string, size_t> index;
  std::vector<Shard> shards;
  bool planned = false, finished = false;

  void plan() {
    planned = true;
    for (auto& d : decls) {
      if (shards.empty() || (shards.back().bytes > 0 && shards.back().bytes + d.nbytes > max_shard)) shards.push_back({});
      d.shard = shards.size() - 1;
      d.offset = shards.back().bytes;
      shards.back().bytes += d.nbytes;
    }
    if (shards.empty()) shards.push_back({});
    for (size_t s = 0; s < shards.size(); ++s) {
      auto& sh = shards[s];
      sh.name = shards.size() == 1 ? "model.safetensors"
                                   : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
      json h = json::object();
      h["__metadata__"] = metadata;
      for (const auto& d : decls)
        if (d.shard == s)
          h[d.name] = {{"dtype", dtype_name(d.dtype)}, {"shape", d.shape}, {"data_offsets", {d.offset, d.offset + d.nbytes}}};
      std::string header = h.dump();
      header.resize((header.size() + 7) / 8 * 8, ' ');
      sh.tmp = dir / (sh.name + ".tmp");
      sh.fd = ::open(sh.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      CALQ_CHECK(sh.fd >= 0, "cannot create {}: {}", sh.tmp.string(), std::strerror(errno));
      uint64_t n = header.size();
      std::string prefix(8, '\0');
      std::memcpy(prefix.data(), &n, 8);
      prefix += header;
      sh.data_start = prefix.size();
      pwrite_all(sh, prefix.data(), prefix.size(), 0);
    }
  }

  void pwrite_all(const Shard& sh, const void* data, size_t n, uint64_t off) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::pwrite(sh.fd, p, std::min<size_t>(n, 1u << 30), static_cast<off_t>(off));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("cannot write {}: {}", (dir / sh.name).string(), w < 0 ? std::strerror(errno) : "short write");
      p += w;
      n -= static_cast<size_t>(w);
      off += static_cast<uint64_t>(w);
    }
  }

  void cleanup() {
    for (auto& sh : shards) {
      if (sh.fd >= 0) ::close(sh.fd);
      sh.fd = -1;
      if (!sh.tmp.empty()) ::unlink(sh.tmp.c_str());
    }
  }
};

SafetensorsWriter::SafetensorsWriter(fs::path dir, uint64_t max_shard_bytes,
                                     std::map<std::string, std::string> metadata)
    : impl_(std::make_unique<Impl>()) {
  impl_->dir = std::move(dir);
  impl_->max_shard = max_shard_bytes;
  impl_->metadata = std::move(metadata);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (impl_ && !impl_->finished) impl_->cleanup();
}

void SafetensorsWriter::declare(const std::string& name, DType dtype, const Shape& shape) {
  CALQ_CHECK(!impl_->planned, "safetensors writer: tensor {} declared after writing started", name);
  CALQ_CHECK(!name.empty() && name != "__metadata__", "safetensors writer: invalid tensor name '{}'", name);
  CALQ_CHECK(!impl_->index.count(name), "safetensors writer: tensor {} declared twice", name);
  Impl::Decl d;
  d.name = name;
  d.dtype = dtype;
  d.shape = shape;
  d.nbytes = static_cast<uint64_t>(shape_numel(shape)) * dtype_size(dtype);
  impl_->index[name] = impl_->decls.size();
  impl_->decls.push_back(std::move(d));
}

void SafetensorsWriter::write(const std::string& name, const void* data, size_t nbytes) {
  if (!impl_->planned) impl_->plan();
  auto it = impl_->index.find(name);
  CALQ_CHECK(it != impl_->index.end(), "safetensors writer: tensor {} was not declared", name);
  auto& d = impl_->decls[it->second];
  CALQ_CHECK(!d.written, "safetensors writer: tensor {} written twice", name);
  CALQ_CHECK(nbytes == d.nbytes, "safetensors writer: tensor {} has {} bytes, declared {} ({} {})", name, nbytes,
             d.nbytes, dtype_name(d.dtype), shape_str(d.shape));
  auto& sh = impl_->shards[d.shard];
  impl_->pwrite_all(sh, data, nbytes, sh.data_start + d.offset);
  d.written = true;
}

std::vector<std::string> SafetensorsWriter::finish() {
  if (!impl_->planned) impl_->plan();
  for (const auto& d : impl_->decls) CALQ_CHECK(d.written, "safetensors writer: tensor {} was never written", d.name);
  std::vector<std::string> names;
  for (auto& sh : impl_->shards) {
    // Size the file explicitly (a trailing empty tensor leaves no bytes to write).
    if (::ftruncate(sh.fd, static_cast<off_t>(sh.data_start + sh.bytes)) != 0 || ::fsync(sh.fd) != 0)
      fail("cannot write {}: {}", (impl_->dir / sh.name).string(), std::strerror(errno));
    ::close(sh.fd);
    sh.fd = -1;
  }
  for (auto& sh : impl_->shards) {
    fs::path final = impl_->dir / sh.name;
    if (::rename(sh.tmp.c_str(), final.c_str()) != 0)
      fail("cannot rename {} to {}: {}", sh.tmp.string(), final.string(), std::strerror(errno));
    sh.tmp.clear();
    names.push_back(sh.name);
  }
  if (impl_->shards.size() > 1) {
    json idx;
    uint64_t total = 0;
    json wm = json::object();
    for (const auto& d : impl_->decls) {
      total += d.nbytes;
      wm[d.name] = impl_->shards[d.shard].name;
    }
    idx["metadata"] = {{"total_size", total}};
    idx["weight_map"] = wm;
    std::string text = idx.dump(2) + "\n";
    fs::path p = impl_->dir / "model.safetensors.index.json";
    fs::path tmp = p;
    tmp += ".tmp";
    {
      int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      CALQ_CHECK(fd >= 0, "cannot create {}: {}", tmp.string(), std::strerror(errno));
      Impl::Shard tmpsh;
      tmpsh.fd = fd;
      tmpsh.name = p.filename().string();
      try {
        impl_->pwrite_all(tmpsh, text.data(), text.size(), 0);
      } catch (...) {
        ::close(fd);
        ::unlink(tmp.c_str());
        throw;
      }
      ::fsync(fd);
      ::close(fd);
    }
    if (::rename(tmp.c_str(), p.c_str()) != 0) fail("cannot rename {}: {}", tmp.string(), std::strerror(errno));
    names.push_back(p.filename().string());
  }
  impl_->finished = true;
  return names;
}

}  // namespace calq::io
