#include "calq/eval/logits_file.h"

#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstring>

#include "calq/core/error.h"
#include "calq/data/fetch.h"

namespace calq::eval {

namespace fs = std::filesystem;

namespace {
constexpr char kMagic[8] = {'C', 'A', 'L', 'Q', 'L', 'G', 'P', '1'};
constexpr char kEnd[8] = {'C', 'A', 'L', 'Q', 'E', 'N', 'D', '1'};
constexpr double kRange = 24.0;
constexpr double kStep = kRange / 65534.0;

template <typename T>
void put(std::string& b, T v) {
  b.append(reinterpret_cast<const char*>(&v), sizeof v);
}
}  // namespace

nlohmann::json LogitsHeader::to_json() const {
  return {{"format", "calq-logprobs"}, {"version", 1},       {"vocab", vocab},     {"ctx", ctx},
          {"stride", stride},          {"windows", windows}, {"method", method},   {"windows_sha256", windows_sha256},
          {"model", model},            {"tokenizer", tokenizer}};
}

LogitsHeader LogitsHeader::from_json(const nlohmann::json& j, const std::string& where) {
  try {
    CALQ_CHECK(j.value("format", "") == "calq-logprobs" && j.value("version", 0) == 1,
               "{}: not a version-1 calq log-probability file", where);
    LogitsHeader h;
    h.vocab = j.at("vocab").get<int64_t>();
    h.ctx = j.at("ctx").get<int64_t>();
    h.stride = j.at("stride").get<int64_t>();
    h.windows = j.at("windows").get<int64_t>();
    h.method = j.at("method").get<std::string>();
    h.windows_sha256 = j.at("windows_sha256").get<std::string>();
    h.model = j.value("model", "");
    h.tokenizer = j.value("tokenizer", "");
    CALQ_CHECK(h.vocab > 0 && h.ctx > 0 && h.windows > 0, "{}: invalid sizes in the header", where);
    return h;
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed header ({})", where, e.what());
  }
}

std::string windows_digest(const std::vector<Window>& windows) {
  data::Sha256 h;
  for (auto& w : windows) {
    std::string b;
    put<uint64_t>(b, w.input.size());
    put<int64_t>(b, w.scored_from);
    put<uint64_t>(b, w.targets.size());
    h.update(b.data(), b.size());
    h.update(w.input.data(), w.input.size() * sizeof(int32_t));
    h.update(w.targets.data(), w.targets.size() * sizeof(int32_t));
  }
  return h.hex();
}

void encode_logprobs(std::span<const double> lp, float& top, std::span<uint16_t> codes) {
  double mx = -INFINITY;
  for (double v : lp) mx = std::max(mx, v);
  CALQ_CHECK(std::isfinite(mx), "cannot store a row of log-probabilities without a finite maximum (NaN logits?)");
  top = static_cast<float>(mx);
  const double floor = static_cast<double>(top) - kRange;
  for (size_t i = 0; i < lp.size(); ++i) {
    const double v = lp[i];
    if (!(v >= floor)) {
      codes[i] = 0;
      continue;
    }
    const double c = 1.0 + std::nearbyint((v - floor) / kStep);
    codes[i] = static_cast<uint16_t>(std::min(c, 65535.0));
  }
}

void decode_logprobs(float top, std::span<const uint16_t> codes, std::span<double> lp) {
  const double floor = static_cast<double>(top) - kRange;
  for (size_t i = 0; i < codes.size(); ++i)
    lp[i] = codes[i] == 0 ? -INFINITY : floor + static_cast<double>(codes[i] - 1) * kStep;
}

LogitsWriter::LogitsWriter(fs::path path, LogitsHeader header) : path_(std::move(path)), h_(std::move(header)) {
  tmp_ = path_.parent_path() / fmt::format(".{}.calq-tmp-{}", path_.filename().string(), ::getpid());
  f_ = std::fopen(tmp_.c_str(), "wb");
  CALQ_CHECK(f_, "cannot write {}", tmp_.string());
  guard_ = io::TempGuard(tmp_);
  const std::string j = h_.to_json().dump();
  std::string b(kMagic, 8);
  put<uint32_t>(b, static_cast<uint32_t>(j.size()));
  b += j;
  CALQ_CHECK(std::fwrite(b.data(), 1, b.size(), f_) == b.size(), "cannot write {}", tmp_.string());
}

LogitsWriter::~LogitsWriter() {
  if (f_) {
    std::fclose(f_);
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
}

void LogitsWriter::add_window(std::span<const double> lp, int64_t rows) {
  CALQ_CHECK(f_, "logits writer already finished");
  CALQ_CHECK(static_cast<int64_t>(lp.size()) == rows * h_.vocab, "logits writer: {} values for {} rows", lp.size(), rows);
  std::string b;
  put<uint32_t>(b, static_cast<uint32_t>(rows));
  std::vector<uint16_t> codes(static_cast<size_t>(h_.vocab));
  for (int64_t r = 0; r < rows; ++r) {
    float top;
    encode_logprobs(lp.subspan(static_cast<size_t>(r * h_.vocab), static_cast<size_t>(h_.vocab)), top, codes);
    put<float>(b, top);
    b.append(reinterpret_cast<const char*>(codes.data()), codes.size() * sizeof(uint16_t));
  }
  const uint32_t crc = static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(b.data()), static_cast<uInt>(b.size())));
  put<uint32_t>(b, crc);
  CALQ_CHECK(std::fwrite(b.data(), 1, b.size(), f_) == b.size(), "cannot write {} (disk full?)", tmp_.string());
  ++written_;
}

void LogitsWriter::finish() {
  CALQ_CHECK(written_ == h_.windows, "logits file: {} windows written, header says {}", written_, h_.windows);
  std::string b(kEnd, 8);
  put<uint64_t>(b, static_cast<uint64_t>(written_));
  const bool ok = std::fwrite(b.data(), 1, b.size(), f_) == b.size() && std::fflush(f_) == 0;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  std::error_code ec;
  if (!ok || !closed) {
    fs::remove(tmp_, ec);
    fail("cannot write {} (disk full?)", tmp_.string());
  }
  fs::rename(tmp_, path_, ec);
  CALQ_CHECK(!ec, "cannot move {} into place: {}", path_.string(), ec.message());
}

LogitsReader::LogitsReader(const fs::path& path) : path_(path) {
  const std::string where = path.string();
  CALQ_CHECK(fs::is_regular_file(path), "{} does not exist", where);
  const uint64_t size = fs::file_size(path);
  f_ = std::fopen(path.c_str(), "rb");
  CALQ_CHECK(f_, "cannot open {}", where);
  char m[8];
  uint32_t n = 0;
  CALQ_CHECK(size >= 28 && std::fread(m, 1, 8, f_) == 8 && std::memcmp(m, kMagic, 8) == 0 &&
                 std::fread(&n, 4, 1, f_) == 1 && 12 + uint64_t(n) + 16 <= size,
             "{} is not a calq log-probability file (bad magic or too short)", where);
  std::string j(n, '\0');
  CALQ_CHECK(std::fread(j.data(), 1, n, f_) == n, "{}: truncated header", where);
  nlohmann::json hj;
  try {
    hj = nlohmann::json::parse(j);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed header ({})", where, e.what());
  }
  h_ = LogitsHeader::from_json(hj, where);
  // The trailer proves the writer finished: a truncated file has none.
  char e[8];
  uint64_t count = 0;
  const long pos = std::ftell(f_);
  CALQ_CHECK(std::fseek(f_, -16, SEEK_END) == 0 && std::fread(e, 1, 8, f_) == 8 && std::fread(&count, 8, 1, f_) == 1 &&
                 std::memcmp(e, kEnd, 8) == 0,
             "{} is truncated (no end marker): it was not written completely", where);
  CALQ_CHECK(count == static_cast<uint64_t>(h_.windows), "{}: end marker counts {} windows, header {}", where, count,
             h_.windows);
  std::fseek(f_, pos, SEEK_SET);
}

LogitsReader::~LogitsReader() {
  if (f_) std::fclose(f_);
}

int64_t LogitsReader::next_window(std::vector<double>& lp) {
  const std::string where = path_.string();
  CALQ_CHECK(read_ < h_.windows, "{}: no more windows (has {})", where, h_.windows);
  uint32_t rows = 0;
  CALQ_CHECK(std::fread(&rows, 4, 1, f_) == 1 && rows <= static_cast<uint32_t>(h_.ctx), "{}: window {} is corrupt",
             where, read_);
  const size_t row_bytes = 4 + static_cast<size_t>(h_.vocab) * 2;
  std::string b(4 + rows * row_bytes, '\0');
  std::memcpy(b.data(), &rows, 4);
  uint32_t crc = 0;
  CALQ_CHECK(std::fread(b.data() + 4, 1, rows * row_bytes, f_) == rows * row_bytes && std::fread(&crc, 4, 1, f_) == 1,
             "{}: window {} is truncated", where, read_);
  const uint32_t got = static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(b.data()), static_cast<uInt>(b.size())));
  CALQ_CHECK(got == crc, "{}: window {} fails its CRC-32 check (corrupt file)", where, read_);
  lp.resize(rows * static_cast<size_t>(h_.vocab));
  std::vector<uint16_t> codes(static_cast<size_t>(h_.vocab));
  for (uint32_t r = 0; r < rows; ++r) {
    float top;
    const char* p = b.data() + 4 + r * row_bytes;
    std::memcpy(&top, p, 4);
    std::memcpy(codes.data(), p + 4, codes.size() * 2);
    decode_logprobs(top, codes, std::span<double>(lp).subspan(r * static_cast<size_t>(h_.vocab), static_cast<size_t>(h_.vocab)));
  }
  ++read_;
  return rows;
}

}  // namespace calq::eval
