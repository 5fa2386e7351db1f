#include "calq/data/archive.h"

#include <zlib.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include "calq/core/error.h"

namespace calq::data {

namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  CALQ_CHECK(in, "cannot open {}", file.string());
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CALQ_CHECK(!in.bad(), "error reading {}", file.string());
  return s;
}

// Inflates `in` (zlib window bits as given: 15+32 = gzip/zlib auto, -15 = raw deflate) until the
// input ends; gzip members that follow each other are all decoded.
std::string inflate_all(std::string_view in, int window_bits, const std::string& what, size_t size_hint) {
  std::string out;
  out.reserve(size_hint);
  z_stream z{};
  CALQ_CHECK(inflateInit2(&z, window_bits) == Z_OK, "{}: cannot initialise zlib", what);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());  // callers keep inputs under 4 GiB per call below
  std::vector<char> buf(1 << 18);
  int rc = Z_OK;
  for (;;) {
    z.next_out = reinterpret_cast<Bytef*>(buf.data());
    z.avail_out = static_cast<uInt>(buf.size());
    rc = inflate(&z, Z_NO_FLUSH);
    out.append(buf.data(), buf.size() - z.avail_out);
    if (rc == Z_STREAM_END) {
      // Another gzip member may follow (concatenated .gz files are valid gzip).
      if (window_bits > 0 && z.avail_in > 0) {
        CALQ_CHECK(inflateReset(&z) == Z_OK, "{}: zlib reset failed", what);
        continue;
      }
      break;
    }
    if (rc == Z_BUF_ERROR && z.avail_in == 0) {
      inflateEnd(&z);
      fail("{}: the compressed data is truncated", what);
    }
    if (rc != Z_OK) {
      std::string msg = z.msg ? z.msg : "error";
      inflateEnd(&z);
      fail("{}: corrupt compressed data ({})", what, msg);
    }
  }
  inflateEnd(&z);
  return out;
}

uint32_t le32(const std::string& s, size_t at) {
  uint32_t v;
  std::memcpy(&v, s.data() + at, 4);
  return v;
}
uint16_t le16(const std::string& s, size_t at) {
  uint16_t v;
  std::memcpy(&v, s.data() + at, 2);
  return v;
}

struct ZipEntry {
  std::string name;
  uint16_t method;
  uint32_t crc, csize, usize, local_offset;
};

std::vector<ZipEntry> zip_directory(const std::string& z, const fs::path& archive) {
  const std::string where = archive.string();
  CALQ_CHECK(z.size() >= 22, "{}: not a ZIP archive (too short)", where);
  // The end-of-central-directory record is within the last 64 KiB + 22 bytes.
  size_t eocd = std::string::npos;
  const size_t lo = z.size() > 65557 ? z.size() - 65557 : 0;
  for (size_t i = z.size() - 22 + 1; i-- > lo;)
    if (le32(z, i) == 0x06054b50u) { eocd = i; break; }
  CALQ_CHECK(eocd != std::string::npos, "{}: not a ZIP archive (no end of central directory)", where);
  const uint16_t count = le16(z, eocd + 10);
  const uint32_t dir_size = le32(z, eocd + 12), dir_off = le32(z, eocd + 16);
  CALQ_CHECK(dir_off != 0xFFFFFFFFu, "{}: ZIP64 archives are not supported", where);
  CALQ_CHECK(uint64_t(dir_off) + dir_size <= eocd, "{}: the central directory lies outside the file", where);
  std::vector<ZipEntry> out;
  size_t p = dir_off;
  for (uint16_t i = 0; i < count; ++i) {
    CALQ_CHECK(p + 46 <= eocd && le32(z, p) == 0x02014b50u, "{}: corrupt central directory entry {}", where, i);
    ZipEntry e;
    e.method = le16(z, p + 10);
    e.crc = le32(z, p + 16);
    e.csize = le32(z, p + 20);
    e.usize = le32(z, p + 24);
    const uint16_t nlen = le16(z, p + 28), xlen = le16(z, p + 30), clen = le16(z, p + 32);
    e.local_offset = le32(z, p + 42);
    CALQ_CHECK(p + 46 + nlen <= eocd, "{}: corrupt central directory entry {}", where, i);
    e.name = z.substr(p + 46, nlen);
    out.push_back(std::move(e));
    p += 46 + size_t(nlen) + xlen + clen;
  }
  return out;
}

}  // namespace

std::string read_gzip(const fs::path& file) {
  std::string raw = slurp(file);
  const std::string what = file.string();
  CALQ_CHECK(raw.size() >= 2 && static_cast<unsigned char>(raw[0]) == 0x1f &&
                 static_cast<unsigned char>(raw[1]) == 0x8b,
             "{}: not a gzip file", what);
  CALQ_CHECK(raw.size() < (uint64_t(1) << 32), "{}: gzip files over 4 GiB are not supported", what);
  return inflate_all(raw, 15 + 16, what, raw.size() * 4);
}

std::string read_maybe_gzip(const fs::path& file) {
  if (file.extension() == ".gz") return read_gzip(file);
  return slurp(file);
}

std::vector<std::string> zip_members(const fs::path& archive) {
  std::vector<std::string> names;
  for (auto& e : zip_directory(slurp(archive), archive))
    if (!e.name.empty() && e.name.back() != '/') names.push_back(e.name);
  return names;
}

std::string zip_extract(const fs::path& archive, const std::string& name) {
  const std::string z = slurp(archive);
  const std::string where = archive.string() + ": " + name;
  for (auto& e : zip_directory(z, archive)) {
    if (e.name != name) continue;
    const size_t p = e.local_offset;
    CALQ_CHECK(p + 30 <= z.size() && le32(z, p) == 0x04034b50u, "{}: corrupt local header", where);
    const size_t data = p + 30 + le16(z, p + 26) + le16(z, p + 28);
    CALQ_CHECK(data + e.csize <= z.size(), "{}: the member's data lies outside the archive", where);
    std::string out;
    if (e.method == 0) {
      out = z.substr(data, e.csize);
    } else if (e.method == 8) {
      out = inflate_all(std::string_view(z).substr(data, e.csize), -15, where, e.usize);
    } else {
      fail("{}: compression method {} is not supported (only stored and deflate)", where, e.method);
    }
    CALQ_CHECK(out.size() == e.usize, "{}: {} bytes decompressed, the directory says {}", where, out.size(), e.usize);
    const uint32_t crc = static_cast<uint32_t>(
        crc32(0L, reinterpret_cast<const Bytef*>(out.data()), static_cast<uInt>(out.size())));
    CALQ_CHECK(crc == e.crc, "{}: CRC-32 mismatch (corrupt archive)", where);
    return out;
  }
  fail("{}: no member named {}", archive.string(), name);
}

}  // namespace calq::data
