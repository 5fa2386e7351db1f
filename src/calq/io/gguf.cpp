#include "calq/io/gguf.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include "calq/core/error.h"
#include "calq/io/cleanup.h"

namespace calq::io {

namespace fs = std::filesystem;

uint64_t ggml_nbytes(GgmlType t, uint64_t n) {
  switch (t) {
    case GgmlType::F32: return 4 * n;
    case GgmlType::F16:
    case GgmlType::BF16: return 2 * n;
    case GgmlType::Q8_0:
      CALQ_CHECK(n % 32 == 0, "Q8_0 tensors need a multiple of 32 elements, got {}", n);
      return n / 32 * 34;
  }
  fail("unsupported ggml type {}", static_cast<uint32_t>(t));
}

GgufValue GgufValue::u32(uint32_t v) { GgufValue g; g.type = GgufType::U32; g.scalar = uint64_t{v}; return g; }
GgufValue GgufValue::i32(int32_t v) { GgufValue g; g.type = GgufType::I32; g.scalar = int64_t{v}; return g; }
GgufValue GgufValue::u64(uint64_t v) { GgufValue g; g.type = GgufType::U64; g.scalar = v; return g; }
GgufValue GgufValue::f32(float v) { GgufValue g; g.type = GgufType::F32; g.scalar = double{v}; return g; }
GgufValue GgufValue::boolean(bool v) { GgufValue g; g.type = GgufType::BOOL; g.scalar = v; return g; }
GgufValue GgufValue::str(std::string v) { GgufValue g; g.type = GgufType::STRING; g.scalar = std::move(v); return g; }
GgufValue GgufValue::str_array(const std::vector<std::string>& v) {
  GgufValue g;
  g.type = GgufType::ARRAY;
  g.array_type = GgufType::STRING;
  for (auto& s : v) g.array.push_back(str(s));
  return g;
}
GgufValue GgufValue::i32_array(const std::vector<int32_t>& v) {
  GgufValue g;
  g.type = GgufType::ARRAY;
  g.array_type = GgufType::I32;
  for (auto x : v) g.array.push_back(i32(x));
  return g;
}
GgufValue GgufValue::f32_array(const std::vector<float>& v) {
  GgufValue g;
  g.type = GgufType::ARRAY;
  g.array_type = GgufType::F32;
  for (auto x : v) g.array.push_back(f32(x));
  return g;
}

uint64_t GgufValue::as_u64() const {
  if (auto p = std::get_if<uint64_t>(&scalar)) return *p;
  if (auto p = std::get_if<int64_t>(&scalar)) {
    CALQ_CHECK(*p >= 0, "GGUF value {} is negative", *p);
    return static_cast<uint64_t>(*p);
  }
  if (auto p = std::get_if<bool>(&scalar)) return *p;
  fail("GGUF value is not an integer");
}
int64_t GgufValue::as_i64() const {
  if (auto p = std::get_if<int64_t>(&scalar)) return *p;
  if (auto p = std::get_if<uint64_t>(&scalar)) {
    CALQ_CHECK(*p <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "GGUF value too large");
    return static_cast<int64_t>(*p);
  }
  fail("GGUF value is not an integer");
}
double GgufValue::as_f64() const {
  if (auto p = std::get_if<double>(&scalar)) return *p;
  if (auto p = std::get_if<uint64_t>(&scalar)) return static_cast<double>(*p);
  if (auto p = std::get_if<int64_t>(&scalar)) return static_cast<double>(*p);
  fail("GGUF value is not a number");
}
bool GgufValue::as_bool() const {
  if (auto p = std::get_if<bool>(&scalar)) return *p;
  fail("GGUF value is not a bool");
}
const std::string& GgufValue::as_str() const {
  if (auto p = std::get_if<std::string>(&scalar)) return *p;
  fail("GGUF value is not a string");
}

// ---- writer ----

namespace {

template <typename T>
void put(std::string& b, T v) {
  b.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_str(std::string& b, const std::string& s) {
  put<uint64_t>(b, s.size());
  b += s;
}

void put_scalar(std::string& b, GgufType t, const GgufValue& v) {
  switch (t) {
    case GgufType::U8: put<uint8_t>(b, static_cast<uint8_t>(v.as_u64())); break;
    case GgufType::I8: put<int8_t>(b, static_cast<int8_t>(v.as_i64())); break;
    case GgufType::U16: put<uint16_t>(b, static_cast<uint16_t>(v.as_u64())); break;
    case GgufType::I16: put<int16_t>(b, static_cast<int16_t>(v.as_i64())); break;
    case GgufType::U32: put<uint32_t>(b, static_cast<uint32_t>(v.as_u64())); break;
    case GgufType::I32: put<int32_t>(b, static_cast<int32_t>(v.as_i64())); break;
    case GgufType::F32: put<float>(b, static_cast<float>(v.as_f64())); break;
    case GgufType::BOOL: put<uint8_t>(b, v.as_bool() ? 1 : 0); break;
    case GgufType::STRING: put_str(b, v.as_str()); break;
    case GgufType::U64: put<uint64_t>(b, v.as_u64()); break;
    case GgufType::I64: put<int64_t>(b, v.as_i64()); break;
    case GgufType::F64: put<double>(b, v.as_f64()); break;
    case GgufType::ARRAY: fail("GGUF: nested arrays are not supported");
  }
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace

void GgufWriter::set(const std::string& key, GgufValue v) {
  for (auto& [k, old] : kv_)
    if (k == key) {
      old = std::move(v);
      return;
    }
  kv_.emplace_back(key, std::move(v));
}

void GgufWriter::add_tensor(const std::string& name, std::vector<int64_t> ne, GgmlType type,
                            std::function<void(std::vector<char>&)> fill) {
  for (auto& t : tensors_) CALQ_CHECK(t.info.name != name, "GGUF: tensor {} added twice", name);
  CALQ_CHECK(!ne.empty() && ne.size() <= 4, "GGUF: tensor {} has {} dimensions (1..4)", name, ne.size());
  uint64_t n = 1;
  for (auto d : ne) {
    CALQ_CHECK(d > 0, "GGUF: tensor {} has a non-positive dimension", name);
    n *= static_cast<uint64_t>(d);
  }
  GgufTensorInfo info;
  info.name = name;
  info.ne = std::move(ne);
  info.type = type;
  info.nbytes = ggml_nbytes(type, n);
  tensors_.push_back({std::move(info), std::move(fill)});
}

void GgufWriter::write(const fs::path& path) {
  std::string head;
  put<uint32_t>(head, 0x46554747u);  // "GGUF"
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  auto kvs = kv_;
  bool has_align = false;
  for (auto& [k, v] : kvs) has_align |= k == "general.alignment";
  if (!has_align && alignment_ != 32) kvs.emplace_back("general.alignment", GgufValue::u32(alignment_));
  put<uint64_t>(head, kvs.size());
  for (auto& [k, v] : kvs) {
    put_str(head, k);
    put<uint32_t>(head, static_cast<uint32_t>(v.type));
    if (v.type == GgufType::ARRAY) {
      put<uint32_t>(head, static_cast<uint32_t>(v.array_type));
      put<uint64_t>(head, v.array.size());
      for (auto& e : v.array) put_scalar(head, v.array_type, e);
    } else {
      put_scalar(head, v.type, v);
    }
  }
  uint64_t off = 0;
  for (auto& t : tensors_) {
    t.info.offset = off;
    off = align_up(off + t.info.nbytes, alignment_);
    put_str(head, t.info.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.info.ne.size()));
    for (auto d : t.info.ne) put<uint64_t>(head, static_cast<uint64_t>(d));
    put<uint32_t>(head, static_cast<uint32_t>(t.info.type));
    put<uint64_t>(head, t.info.offset);
  }
  head.resize(align_up(head.size(), alignment_), '\0');

  const fs::path tmp = path.parent_path() / fmt::format(".{}.calq-tmp-{}", path.filename().string(), ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  CALQ_CHECK(f, "cannot write {}", tmp.string());
  TempGuard guard(tmp);  // removes the partial file if calq is killed
  auto bail = [&](const std::string& why) {
    std::fclose(f);
    std::error_code ec;
    fs::remove(tmp, ec);
    fail("cannot write {}: {}", path.string(), why);
  };
  if (std::fwrite(head.data(), 1, head.size(), f) != head.size()) bail("write failed (disk full?)");
  std::vector<char> buf;
  uint64_t pos = 0;
  for (auto& t : tensors_) {
    if (pos < t.info.offset) {
      std::string pad(t.info.offset - pos, '\0');
      if (std::fwrite(pad.data(), 1, pad.size(), f) != pad.size()) bail("write failed (disk full?)");
      pos = t.info.offset;
    }
    buf.clear();
    try {
      t.fill(buf);
    } catch (const std::exception& e) {
      bail(fmt::format("tensor {}: {}", t.info.name, e.what()));
    }
    if (buf.size() != t.info.nbytes)
      bail(fmt::format("tensor {} produced {} bytes, expected {}", t.info.name, buf.size(), t.info.nbytes));
    if (std::fwrite(buf.data(), 1, buf.size(), f) != buf.size()) bail("write failed (disk full?)");
    pos += buf.size();
  }
  if (pos < off) {
    std::string pad(off - pos, '\0');
    if (std::fwrite(pad.data(), 1, pad.size(), f) != pad.size()) bail("write failed (disk full?)");
  }
  if (std::fflush(f) != 0) bail("flush failed");
  if (std::fclose(f) != 0) {
    std::error_code ec;
    fs::remove(tmp, ec);
    fail("cannot write {}: close failed", path.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  CALQ_CHECK(!ec, "cannot move {} into place: {}", path.string(), ec.message());
}

// ---- reader ----

namespace {

struct Cursor {
  const std::string& b;
  size_t p = 0;
  std::string where;
  template <typename T>
  T get() {
    CALQ_CHECK(p + sizeof(T) <= b.size(), "{}: truncated at byte {}", where, p);
    T v;
    std::memcpy(&v, b.data() + p, sizeof v);
    p += sizeof v;
    return v;
  }
  std::string str() {
    const uint64_t n = get<uint64_t>();
    CALQ_CHECK(n <= b.size() - p, "{}: string of {} bytes runs past the end at byte {}", where, n, p);
    std::string s = b.substr(p, n);
    p += n;
    return s;
  }
};

GgufValue read_scalar(Cursor& c, GgufType t) {
  GgufValue v;
  v.type = t;
  switch (t) {
    case GgufType::U8: v.scalar = uint64_t{c.get<uint8_t>()}; break;
    case GgufType::I8: v.scalar = int64_t{c.get<int8_t>()}; break;
    case GgufType::U16: v.scalar = uint64_t{c.get<uint16_t>()}; break;
    case GgufType::I16: v.scalar = int64_t{c.get<int16_t>()}; break;
    case GgufType::U32: v.scalar = uint64_t{c.get<uint32_t>()}; break;
    case GgufType::I32: v.scalar = int64_t{c.get<int32_t>()}; break;
    case GgufType::F32: v.scalar = double{c.get<float>()}; break;
    case GgufType::BOOL: {
      const uint8_t x = c.get<uint8_t>();
      CALQ_CHECK(x <= 1, "{}: bool value {}", c.where, x);
      v.scalar = x == 1;
      break;
    }
    case GgufType::STRING: v.scalar = c.str(); break;
    case GgufType::U64: v.scalar = c.get<uint64_t>(); break;
    case GgufType::I64: v.scalar = c.get<int64_t>(); break;
    case GgufType::F64: v.scalar = c.get<double>(); break;
    default: fail("{}: bad value type {}", c.where, static_cast<uint32_t>(t));
  }
  return v;
}

}  // namespace

GgufReader::GgufReader(const fs::path& path) : path_(path) {
  const std::string where = path.string();
  std::ifstream in(path, std::ios::binary);
  CALQ_CHECK(in, "cannot open {}", where);
  const uint64_t size = fs::file_size(path);
  // The header is read whole (it is small next to the tensor data, which stays on disk).
  std::string b(static_cast<size_t>(std::min<uint64_t>(size, 256ull << 20)), '\0');
  in.read(b.data(), static_cast<std::streamsize>(b.size()));
  Cursor c{b, 0, where};
  CALQ_CHECK(c.get<uint32_t>() == 0x46554747u, "{} is not a GGUF file (bad magic)", where);
  version_ = c.get<uint32_t>();
  CALQ_CHECK(version_ == 2 || version_ == 3, "{}: GGUF version {} (calq reads 2 and 3)", where, version_);
  const uint64_t nt = c.get<uint64_t>(), nkv = c.get<uint64_t>();
  CALQ_CHECK(nt < (1u << 24) && nkv < (1u << 24), "{}: implausible counts ({} tensors, {} keys)", where, nt, nkv);
  std::set<std::string> keys;
  for (uint64_t i = 0; i < nkv; ++i) {
    std::string k = c.str();
    CALQ_CHECK(keys.insert(k).second, "{}: metadata key {} repeated", where, k);
    const auto t = static_cast<GgufType>(c.get<uint32_t>());
    GgufValue v;
    if (t == GgufType::ARRAY) {
      v.type = t;
      v.array_type = static_cast<GgufType>(c.get<uint32_t>());
      const uint64_t n = c.get<uint64_t>();
      CALQ_CHECK(n <= b.size(), "{}: array {} of {} elements runs past the end", where, k, n);
      v.array.reserve(static_cast<size_t>(n));
      for (uint64_t j = 0; j < n; ++j) v.array.push_back(read_scalar(c, v.array_type));
    } else {
      v = read_scalar(c, t);
    }
    kv_.emplace_back(std::move(k), std::move(v));
  }
  uint64_t alignment = 32;
  if (auto a = find("general.alignment")) alignment = a->as_u64();
  CALQ_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "{}: alignment {} is not a power of two", where,
             alignment);
  std::set<std::string> names;
  for (uint64_t i = 0; i < nt; ++i) {
    GgufTensorInfo t;
    t.name = c.str();
    CALQ_CHECK(names.insert(t.name).second, "{}: tensor {} repeated", where, t.name);
    const uint32_t nd = c.get<uint32_t>();
    CALQ_CHECK(nd >= 1 && nd <= 4, "{}: tensor {} has {} dimensions", where, t.name, nd);
    uint64_t n = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t x = c.get<uint64_t>();
      CALQ_CHECK(x > 0 && x < (1ull << 40) && n <= (1ull << 62) / x, "{}: tensor {} has a bad dimension {}", where,
                 t.name, x);
      n *= x;
      t.ne.push_back(static_cast<int64_t>(x));
    }
    t.type = static_cast<GgmlType>(c.get<uint32_t>());
    t.offset = c.get<uint64_t>();
    t.nbytes = with_context(where + ": tensor " + t.name, [&] { return ggml_nbytes(t.type, n); });
    CALQ_CHECK(t.offset % alignment == 0, "{}: tensor {} offset {} is not aligned to {}", where, t.name, t.offset,
               alignment);
    tensors_.push_back(std::move(t));
  }
  data_start_ = (c.p + alignment - 1) / alignment * alignment;
  for (auto& t : tensors_)
    CALQ_CHECK(data_start_ + t.offset + t.nbytes <= size, "{}: tensor {} runs past the end of the file", where, t.name);
}

const GgufValue* GgufReader::find(const std::string& key) const {
  for (auto& [k, v] : kv_)
    if (k == key) return &v;
  return nullptr;
}

const GgufTensorInfo* GgufReader::tensor(const std::string& name) const {
  for (auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<char> GgufReader::read(const GgufTensorInfo& t) const {
  std::ifstream in(path_, std::ios::binary);
  CALQ_CHECK(in, "cannot open {}", path_.string());
  in.seekg(static_cast<std::streamoff>(data_start_ + t.offset));
  std::vector<char> out(static_cast<size_t>(t.nbytes));
  in.read(out.data(), static_cast<std::streamsize>(out.size()));
  CALQ_CHECK(static_cast<uint64_t>(in.gcount()) == t.nbytes, "{}: tensor {} is truncated", path_.string(), t.name);
  return out;
}

}  // namespace calq::io
