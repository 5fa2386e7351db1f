// safetensors reading (mmap, validated before any view is handed out) and writing (planned
// layout, pwrite at precomputed offsets, sharded, temp files renamed on finish).
#include "calq/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>

#include "calq/core/error.h"
#include "calq/io/atomic.h"
#include "calq/io/config.h"
#include "calq/io/moe_layout.h"

namespace calq::io {

using nlohmann::json;

// The length prefix is little-endian; reading it with memcpy is only right on such hosts.
static_assert(std::endian::native == std::endian::little,
              "calq's safetensors I/O assumes a little-endian host");

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kMetadataKey = "__metadata__";

std::string errno_text(int err) {
  return std::generic_category().message(err);
}

// A JSON value for an error message, cut short: a hostile header can hold megabytes in one entry.
std::string brief(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

// Parses header JSON and reports the first duplicate key. nlohmann silently keeps the last of
// duplicate keys, but a tensor named twice is ambiguous (which bytes are it?) and the reference
// reader (serde) rejects it, so we must look at the token stream.
json parse_header(const char* begin, const char* end, const std::string& label) {
  std::vector<std::set<std::string>> open_objects;
  std::string top_key, duplicate;
  auto cb = [&](int /*depth*/, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key: {
        if (open_objects.empty() || !duplicate.empty()) break;
        const auto& k = parsed.get_ref<const std::string&>();
        if (open_objects.size() == 1) top_key = k;
        if (!open_objects.back().insert(k).second) {
          duplicate = open_objects.size() == 1
                          ? fmt::format("tensor {} appears twice in the header", k)
                          : fmt::format("tensor {}: duplicate key '{}' in its entry", top_key, k);
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  json h;
  try {
    h = json::parse(begin, end, cb);
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {}", label, e.what());
  }
  CALQ_CHECK(h.is_object(), "{}: header is not a JSON object (got {})", label, h.type_name());
  CALQ_CHECK(duplicate.empty(), "{}: {}", label, duplicate);
  return h;
}

uint64_t page_size() {
  static const uint64_t p = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return p;
}

}  // namespace

// ---------------- SafetensorsFile ----------------

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CALQ_CHECK(fd >= 0, "{}: cannot open: {}", path.string(), errno_text(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail("{}: cannot stat: {}", path.string(), errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path.string());
  }
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    // Read-only shared mapping of the page cache: nothing is copied, and release() can drop pages.
    void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    ::close(fd);
    CALQ_CHECK(p != MAP_FAILED, "{}: cannot mmap {} bytes: {}", path.string(), f->size_,
               errno_text(err));
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
  CALQ_CHECK(size_ >= 8,
             "{}: truncated: the file has {} bytes, fewer than the 8-byte header length", label,
             size_);
  uint64_t n = 0;
  std::memcpy(&n, base_, 8);
  CALQ_CHECK(n <= kMaxHeaderBytes,
             "{}: header length {} exceeds the 100 MiB limit (not a safetensors file?)", label, n);
  CALQ_CHECK(n <= size_ - 8,
             "{}: header length {} runs past the end of the {}-byte file (truncated?)", label, n,
             size_);
  data_start_ = 8 + n;
  const char* hdr = reinterpret_cast<const char*>(base_) + 8;
  json h = parse_header(hdr, hdr + n, label);

  const uint64_t data_size = size_ - data_start_;
  for (const auto& [name, v] : h.items()) {
    if (name == kMetadataKey) {
      if (v.is_null()) continue;  // the reference format allows "__metadata__": null
      CALQ_CHECK(v.is_object(), "{}: __metadata__ must be an object of strings, got {}", label,
                 brief(v));
      for (const auto& [k, mv] : v.items()) {
        CALQ_CHECK(mv.is_string(), "{}: __metadata__ value of '{}' is not a string: {}", label, k,
                   brief(mv));
        metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    const std::string where = fmt::format("{}: tensor {}", label, name);
    CALQ_CHECK(v.is_object(), "{}: entry is not a JSON object: {}", where, brief(v));

    auto dt = v.find("dtype");
    CALQ_CHECK(dt != v.end() && dt->is_string(), "{}: 'dtype' is missing or not a string", where);
    const std::string& dt_name = dt->get_ref<const std::string&>();
    auto dtype = dtype_from_name(dt_name);
    CALQ_CHECK(dtype.has_value(), "{}: unknown dtype '{}'", where, dt_name);

    TensorInfo t;
    t.name = name;
    t.dtype = *dtype;
    auto sh = v.find("shape");
    CALQ_CHECK(sh != v.end() && sh->is_array(),
               "{}: 'shape' must be an array of non-negative integers, got {}", where,
               sh == v.end() ? std::string("nothing") : brief(*sh));
    for (const auto& d : *sh) {
      // nlohmann stores non-negative integers as unsigned; values above INT64_MAX would wrap.
      CALQ_CHECK(d.is_number_unsigned() &&
                     d.get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max()),
                 "{}: 'shape' must be an array of non-negative integers, got {}", where,
                 brief(*sh));
      t.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    }
    const uint64_t numel =
        static_cast<uint64_t>(with_context(where, [&] { return shape_numel(t.shape); }));
    const uint64_t nbytes = with_context(
        fmt::format("{}: shape {} of {}", where, shape_str(t.shape), dt_name),
        [&] { return dtype_nbytes(t.dtype, numel); });

    auto off = v.find("data_offsets");
    CALQ_CHECK(off != v.end() && off->is_array() && off->size() == 2 &&
                   (*off)[0].is_number_unsigned() && (*off)[1].is_number_unsigned(),
               "{}: 'data_offsets' must be [begin, end], two non-negative integers, got {}", where,
               off == v.end() ? std::string("nothing") : brief(*off));
    t.begin = (*off)[0].get<uint64_t>();
    t.end = (*off)[1].get<uint64_t>();
    CALQ_CHECK(t.begin <= t.end, "{}: data_offsets [{}, {}] are reversed (begin > end)", where,
               t.begin, t.end);
    CALQ_CHECK(t.end - t.begin == nbytes,
               "{}: data_offsets [{}, {}] span {} bytes but shape {} of {} needs {}", where,
               t.begin, t.end, t.end - t.begin, shape_str(t.shape), dt_name, nbytes);
    CALQ_CHECK(t.end <= data_size,
               "{}: data ends at byte {} of the data buffer, but the file holds only {} data bytes "
               "(truncated)",
               where, t.end, data_size);
    tensors_.push_back(std::move(t));
  }

  // The tensors must tile the data buffer exactly: sorted by offsets, each one starts where the
  // previous ended (so overlaps, gaps, and a zero-size tensor inside another are all rejected).
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const auto& t : tensors_) {
    if (t.begin < pos) {
      fail("{}: tensor {} (data bytes [{}, {})) overlaps tensor {} (data bytes [{}, {}))", label,
           t.name, t.begin, t.end, prev->name, prev->begin, prev->end);
    }
    CALQ_CHECK(t.begin == pos,
               "{}: gap of {} bytes before tensor {} (data bytes [{}, {}) belong to no tensor)",
               label, t.begin - pos, t.name, pos, t.begin);
    pos = t.end;
    prev = &t;
  }
  CALQ_CHECK(pos == data_size,
             "{}: {} trailing bytes after the last tensor (the tensors end at data byte {}, "
             "the file at {})",
             label, data_size - pos, pos, data_size);
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

bool SafetensorsFile::contains(const std::string& name) const {
  return index_.count(name) > 0;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  CALQ_CHECK(it != index_.end(), "{}: no tensor named {}", path_.string(), name);
  return tensors_[it->second];
}

TensorView SafetensorsFile::view(const std::string& name) const { return view(info(name)); }

TensorView SafetensorsFile::view(const TensorInfo& t) const {
  CALQ_CHECK(t.begin <= t.end && t.end <= size_ - data_start_,
             "{}: tensor {}: bytes [{}, {}) lie outside the data buffer", path_.string(), t.name, t.begin, t.end);
  return {t.dtype, t.shape, base_ + data_start_ + t.begin, static_cast<size_t>(t.end - t.begin)};
}

void SafetensorsFile::release(const std::string& name) const { release(info(name)); }

void SafetensorsFile::release(const TensorInfo& t) const {
  if (!mapped_ || t.end == t.begin) return;  // from_memory(): the caller owns those bytes
  // The page-aligned range covering the tensor. Rounding outward may drop pages that a
  // neighbouring tensor shares; that is harmless because the mapping is a read-only view of the
  // file: MADV_DONTNEED only unmaps the pages and the next access faults them in again.
  const uint64_t page = page_size();
  const uint64_t first = (data_start_ + t.begin) / page * page;
  const uint64_t last =
      (data_start_ + t.end + page - 1) / page * page;  // within the mapping's last page
  // Advisory: if the kernel refuses, the pages merely stay resident.
  (void)::madvise(const_cast<std::byte*>(base_) + first, last - first, MADV_DONTNEED);
}

// ---------------- Checkpoint ----------------

namespace {

// Reads model.safetensors.index.json: the weight_map (tensor -> shard file name).
std::map<std::string, std::string> read_weight_map(const fs::path& index) {
  std::ifstream in(index, std::ios::binary);
  CALQ_CHECK(in.good(), "{}: cannot open: {}", index.string(), errno_text(errno));
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", index.string(), e.what());
  }
  CALQ_CHECK(j.is_object(), "{}: not a JSON object", index.string());
  auto wm = j.find("weight_map");
  CALQ_CHECK(wm != j.end(), "{}: missing 'weight_map'", index.string());
  CALQ_CHECK(wm->is_object(), "{}: 'weight_map' is not an object", index.string());
  CALQ_CHECK(!wm->empty(), "{}: 'weight_map' lists no tensors", index.string());
  std::map<std::string, std::string> out;
  for (const auto& [name, f] : wm->items()) {
    CALQ_CHECK(f.is_string(), "{}: weight_map entry of {} is not a file name: {}", index.string(),
               name, brief(f));
    const std::string& s = f.get_ref<const std::string&>();
    // Shards live next to the index; a path could point anywhere (and "../x" outside the model).
    CALQ_CHECK(!s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos,
               "{}: weight_map entry of {} must be a plain file name, got '{}'", index.string(),
               name, s);
    out.emplace(name, s);
  }
  return out;
}

}  // namespace

Checkpoint Checkpoint::open(const fs::path& p) {
  std::error_code ec;
  const fs::file_status st = fs::status(p, ec);
  CALQ_CHECK(fs::exists(st), "{}: no such file or directory", p.string());
  Checkpoint c;
  fs::path dir, index;
  if (fs::is_directory(st)) {
    dir = p;
    if (fs::exists(p / kIndexName, ec)) index = p / kIndexName;
  } else if (p.filename() == kIndexName) {
    dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
    index = p;
  }

  std::map<std::string, std::string> weight_map;
  std::vector<fs::path> files;
  if (!index.empty()) {
    weight_map = read_weight_map(index);
    std::set<std::string> shards;
    for (const auto& [name, shard] : weight_map) shards.insert(shard);
    std::vector<std::string> missing;
    for (const auto& s : shards) {
      if (!fs::is_regular_file(dir / s, ec)) missing.push_back(s);
      files.push_back(dir / s);
    }
    if (!missing.empty()) {
      std::string list;
      for (const auto& m : missing) list += (list.empty() ? "" : ", ") + (dir / m).string();
      fail("{}: shard{} listed in {} {} missing: {}", dir.string(), missing.size() > 1 ? "s" : "",
           kIndexName, missing.size() > 1 ? "are" : "is", list);
    }
  } else if (!dir.empty()) {
    CALQ_CHECK(fs::exists(dir / "model.safetensors", ec),
               "{}: no model.safetensors or {} in this directory", dir.string(), kIndexName);
    files.push_back(dir / "model.safetensors");
  } else {
    CALQ_CHECK(p.extension() == ".safetensors", "{}: not a .safetensors file or a model directory",
               p.string());
    files.push_back(p);
  }

  std::map<std::string, size_t> stored_in;  // stored tensor -> file
  std::vector<TensorInfo> stored;
  for (const auto& f : files) {
    c.files_.push_back(SafetensorsFile::open(f));
    c.shard_paths_.push_back(f);
    const size_t idx = c.files_.size() - 1;
    const std::string shard = f.filename().string();
    for (const auto& t : c.files_.back()->tensors()) {
      if (!index.empty()) {
        auto it = weight_map.find(t.name);
        CALQ_CHECK(it != weight_map.end(), "{}: tensor {} is in this shard but not listed in {}",
                   f.string(), t.name, kIndexName);
        CALQ_CHECK(it->second == shard, "{}: tensor {} is in this shard but {} assigns it to {}",
                   f.string(), t.name, kIndexName, it->second);
      }
      // With an index this cannot fire (a name maps to one shard), but keep lookups unambiguous.
      CALQ_CHECK(stored_in.emplace(t.name, idx).second, "{}: tensor {} appears in two shards",
                 f.string(), t.name);
      stored.push_back(t);
    }
  }
  for (const auto& [name, shard] : weight_map)
    CALQ_CHECK(stored_in.count(name), "{}: tensor {} listed in {} is missing from this shard",
               (dir / shard).string(), name, kIndexName);
  c.root_ = p;

  // Expert tensors under calq's per-expert names (io/moe_layout.h), checked against config.json.
  const fs::path config = (dir.empty() ? (p.parent_path().empty() ? fs::path(".") : p.parent_path()) : dir) /
                          "config.json";
  std::vector<ExposedTensor> exposed;
  if (fs::exists(config, ec)) {
    const ModelConfig cfg = load_config(config);
    exposed = expose_moe_tensors(stored, cfg, p.string());
  } else {
    for (const auto& t : stored) {
      CALQ_CHECK(!is_fused_expert_bank(t.name),
                 "{}: tensor {} is a fused expert bank; splitting it into per-expert tensors needs the model's "
                 "config.json, which is not in {}",
                 p.string(), t.name, config.parent_path().string());
      exposed.push_back({t.name, t});
    }
  }
  for (auto& x : exposed) {
    std::string name = x.info.name;
    c.where_.emplace(std::move(name), Located{stored_in.at(x.stored), std::move(x.info)});
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> n;
  n.reserve(where_.size());
  for (const auto& [k, v] : where_) n.push_back(k);
  return n;
}

bool Checkpoint::contains(const std::string& name) const {
  return where_.count(name) > 0;
}

const Checkpoint::Located& Checkpoint::locate(const std::string& name) const {
  auto it = where_.find(name);
  CALQ_CHECK(it != where_.end(), "{}: no tensor named {}", root_.string(), name);
  return it->second;
}

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  return *files_[locate(name).file];
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return locate(name).info; }
TensorView Checkpoint::view(const std::string& name) const {
  const Located& l = locate(name);
  return files_[l.file]->view(l.info);
}
void Checkpoint::release(const std::string& name) const {
  const Located& l = locate(name);
  files_[l.file]->release(l.info);
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_)
    for (const auto& t : f->tensors()) n += t.end - t.begin;
  return n;
}

// ---------------- SafetensorsWriter ----------------

struct SafetensorsWriter::Impl {
  enum class State { Pending, Writing, Written };
  struct Decl {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t nbytes = 0, offset = 0;  // offset within its shard's data buffer
    size_t shard = 0;
    State state = State::Pending;
  };
  struct Shard {
    std::string name;
    fs::path tmp, final;
    int fd = -1;
    bool created = false, renamed = false;
    uint64_t data_start = 0, bytes = 0;
  };

  fs::path dir;
  uint64_t max_shard = 0;
  std::map<std::string, std::string> metadata;
  std::vector<Decl> decls;
  std::map<std::string, size_t> index;
  std::vector<Shard> shards;
  // write() may be called from several threads; the lock guards the bookkeeping, not the pwrite.
  std::mutex mu;
  bool planned = false, finished = false, failed = false;

  // Fixes the layout (shards, offsets, headers) and creates the temp files. Called under mu; a
  // failure leaves the writer unusable (its destructor still removes what was created).
  void plan() {
    planned = true;
    try {
      plan_files();
    } catch (...) {
      failed = true;
      throw;
    }
  }

  void plan_files() {
    for (auto& d : decls) {
      // A new shard when this tensor would push a non-empty shard over the limit; a tensor larger
      // than the limit therefore lands alone in a shard of its own.
      if (shards.empty() || (shards.back().bytes > 0 && shards.back().bytes + d.nbytes > max_shard))
        shards.emplace_back();
      d.shard = shards.size() - 1;
      d.offset = shards.back().bytes;
      shards.back().bytes += d.nbytes;
    }
    if (shards.empty()) shards.emplace_back();
    for (size_t s = 0; s < shards.size(); ++s) {
      Shard& sh = shards[s];
      sh.name = shards.size() == 1
                    ? std::string("model.safetensors")
                    : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
      sh.final = dir / sh.name;
      sh.tmp = dir / (sh.name + ".tmp");
      const std::string header = header_of(s);
      sh.fd = ::open(sh.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (sh.fd < 0) fail("{}: cannot create: {}", sh.tmp.string(), errno_text(errno));
      sh.created = true;
      sh.data_start = 8 + header.size();
      // Reserve the space now so that a full disk stops the run at its start rather than after
      // hours of work. Filesystems without fallocate just skip this (the writes still report).
      const off_t total = static_cast<off_t>(sh.data_start + sh.bytes);
      if (total > 0 && ::fallocate(sh.fd, 0, 0, total) != 0 && errno == ENOSPC)
        fail("{}: cannot reserve {} bytes: {}", sh.tmp.string(), total, errno_text(ENOSPC));
      std::string prefix(8, '\0');
      const uint64_t n = header.size();
      std::memcpy(prefix.data(), &n, 8);
      prefix += header;
      pwrite_all(sh, prefix.data(), prefix.size(), 0);
    }
  }

  // The JSON header of shard s: __metadata__ first, then the tensors in declaration order (which
  // is also offset order), padded with spaces so the data buffer starts 8-byte aligned.
  std::string header_of(size_t s) const {
    // Built by hand rather than through an ordered JSON object, whose inserts are linear scans
    // (quadratic for the tens of thousands of tensors of a large MoE model). Names are unique.
    std::string out = "{";
    try {
      if (!metadata.empty()) out += fmt::format("\"{}\":{}", kMetadataKey, json(metadata).dump());
      for (const auto& d : decls) {
        if (d.shard != s) continue;
        json entry = {{"dtype", dtype_name(d.dtype)},
                      {"shape", d.shape},
                      {"data_offsets", {d.offset, d.offset + d.nbytes}}};
        if (out.size() > 1) out += ',';
        out += json(d.name).dump() + ":" + entry.dump();
      }
    } catch (const json::exception& e) {  // e.g. a name or metadata value that is not UTF-8
      fail("{}: cannot encode the header: {}", (dir / shards[s].name).string(), e.what());
    }
    out += '}';
    out.resize((out.size() + 7) / 8 * 8, ' ');
    return out;
  }

  void pwrite_all(Shard& sh, const void* data, size_t n, uint64_t off) {
    const uint64_t start = off;
    const size_t total = n;
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::pwrite(sh.fd, p, std::min<size_t>(n, size_t{1} << 30), static_cast<off_t>(off));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        fail("{}: write failed: {}", sh.tmp.string(),
             w < 0 ? errno_text(errno) : std::string("wrote nothing"));
      }
      p += w;
      n -= static_cast<size_t>(w);
      off += static_cast<uint64_t>(w);
    }
#ifdef __linux__
    // Start writing these pages back now (asynchronous): finish()'s fsync then waits only for the
    // last tensors instead of the whole file. Advisory; a failure here shows up in the fsync.
    if (total >= (size_t{1} << 20))
      (void)::sync_file_range(sh.fd, static_cast<off_t>(start), static_cast<off_t>(total), SYNC_FILE_RANGE_WRITE);
#endif
  }

  // Removes everything this writer created: temp files, and shards already renamed by a finish()
  // that failed later on.
  void cleanup() noexcept {
    for (auto& sh : shards) {
      if (sh.fd >= 0) ::close(sh.fd);
      sh.fd = -1;
      if (sh.created && !sh.renamed) ::unlink(sh.tmp.c_str());
      if (sh.renamed) ::unlink(sh.final.c_str());
    }
  }
};

SafetensorsWriter::SafetensorsWriter(fs::path dir, uint64_t max_shard_bytes,
                                     std::map<std::string, std::string> metadata)
    : impl_(std::make_unique<Impl>()) {
  CALQ_CHECK(max_shard_bytes > 0, "safetensors writer: the shard size limit must be positive");
  impl_->dir = std::move(dir);
  impl_->max_shard = max_shard_bytes;
  impl_->metadata = std::move(metadata);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (impl_ && !impl_->finished) impl_->cleanup();
}

void SafetensorsWriter::declare(const std::string& name, DType dtype, const Shape& shape) {
  std::lock_guard lock(impl_->mu);
  CALQ_CHECK(!impl_->planned, "safetensors writer: tensor {} declared after writing started", name);
  CALQ_CHECK(!name.empty() && name != kMetadataKey, "safetensors writer: invalid tensor name '{}'",
             name);
  CALQ_CHECK(!impl_->index.count(name), "safetensors writer: tensor {} declared twice", name);
  Impl::Decl d;
  d.name = name;
  d.dtype = dtype;
  d.shape = shape;
  const auto numel = static_cast<uint64_t>(
      with_context("safetensors writer: tensor " + name, [&] { return shape_numel(shape); }));
  d.nbytes = with_context("safetensors writer: tensor " + name,
                          [&] { return dtype_nbytes(dtype, numel); });
  impl_->index[name] = impl_->decls.size();
  impl_->decls.push_back(std::move(d));
}

void SafetensorsWriter::write(const std::string& name, const void* data, size_t nbytes) {
  Impl& m = *impl_;
  Impl::Decl* d = nullptr;
  {
    std::lock_guard lock(m.mu);
    CALQ_CHECK(!m.finished, "safetensors writer: tensor {} written after finish()", name);
    CALQ_CHECK(!m.failed,
               "safetensors writer: cannot write tensor {}: an earlier write to {} failed", name,
               m.dir.string());
    if (!m.planned) m.plan();
    auto it = m.index.find(name);
    CALQ_CHECK(it != m.index.end(), "safetensors writer: tensor {} was not declared", name);
    d = &m.decls[it->second];
    CALQ_CHECK(d->state == Impl::State::Pending, "safetensors writer: tensor {} written twice",
               name);
    CALQ_CHECK(nbytes == d->nbytes,
               "safetensors writer: tensor {} has {} bytes, but was declared as {} {} ({} bytes)",
               name, nbytes, dtype_name(d->dtype), shape_str(d->shape), d->nbytes);
    d->state = Impl::State::Writing;
  }
  Impl::Shard& sh = m.shards[d->shard];
  try {
    m.pwrite_all(sh, data, nbytes, sh.data_start + d->offset);
  } catch (...) {
    std::lock_guard lock(m.mu);
    m.failed = true;
    d->state = Impl::State::Pending;
    throw;
  }
  std::lock_guard lock(m.mu);
  d->state = Impl::State::Written;
}

std::vector<std::string> SafetensorsWriter::finish() {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  CALQ_CHECK(!m.finished, "safetensors writer: finish() called twice");
  CALQ_CHECK(!m.failed, "safetensors writer: cannot finish {}: an earlier write failed",
             m.dir.string());
  if (!m.planned) m.plan();
  std::vector<std::string> unwritten;
  for (const auto& d : m.decls)
    if (d.state != Impl::State::Written) unwritten.push_back(d.name);
  if (!unwritten.empty()) {
    std::string list;
    for (size_t i = 0; i < std::min<size_t>(unwritten.size(), 5); ++i)
      list += (i ? ", " : "") + unwritten[i];
    if (unwritten.size() > 5) list += fmt::format(", ... ({} in all)", unwritten.size());
    fail("safetensors writer: declared tensor{} never written: {}", unwritten.size() > 1 ? "s" : "",
         list);
  }
  m.failed = true;  // until the end is reached: a throw below leaves the writer unusable
  for (auto& sh : m.shards) {
    const off_t size = static_cast<off_t>(sh.data_start + sh.bytes);
    // The size is exact already unless trailing tensors are empty; make it exact regardless.
    if (::ftruncate(sh.fd, size) != 0)
      fail("{}: cannot set the size: {}", sh.tmp.string(), errno_text(errno));
    if (::fsync(sh.fd) != 0) fail("{}: fsync failed: {}", sh.tmp.string(), errno_text(errno));
    const int fd = sh.fd;
    sh.fd = -1;
    if (::close(fd) != 0) fail("{}: close failed: {}", sh.tmp.string(), errno_text(errno));
  }
  std::vector<std::string> names;
  for (auto& sh : m.shards) {
    if (::rename(sh.tmp.c_str(), sh.final.c_str()) != 0)
      fail("{}: cannot rename to {}: {}", sh.tmp.string(), sh.final.string(), errno_text(errno));
    sh.renamed = true;
    names.push_back(sh.name);
  }
  if (m.shards.size() > 1) {
    json wm = json::object();
    uint64_t total = 0;
    for (const auto& d : m.decls) {
      total += d.nbytes;
      wm[d.name] = m.shards[d.shard].name;
    }
    json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
    write_file_atomic(m.dir / kIndexName, idx.dump(2) + "\n");
    names.push_back(kIndexName);
  } else {
    // Durability of the rename itself (write_file_atomic does this for the sharded case).
    int dfd = ::open(m.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  m.failed = false;
  m.finished = true;
  return names;
}

}  // namespace calq::io
