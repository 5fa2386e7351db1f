// Fetching dataset files: SHA-256, the cache directory, and HTTPS downloads through libcurl that
// either leave a complete, verified file or nothing.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace calq::data {

// Incremental SHA-256 (FIPS 180-4, through OpenSSL's EVP interface).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  std::string hex();  // lower-case hex digest; the hasher cannot be updated afterwards

 private:
  void* ctx_;
};
std::string sha256_hex(std::string_view bytes);
std::string sha256_file(const std::filesystem::path& file);

// Where named datasets are looked for, in order: $CALQ_DATA (when set), then the cache
// ($XDG_CACHE_HOME/calq/datasets, else ~/.cache/calq/datasets), where downloads go.
std::filesystem::path cache_dir();

struct DownloadOptions {
  // Lower-case hex SHA-256 the file must have. When empty, a SHA-256 the server declares for the
  // content (Hugging Face's X-Linked-Etag for LFS files) is checked instead, when it sends one.
  std::string sha256;
  long connect_timeout_s = 30;
  long low_speed_timeout_s = 60;  // abort when under 1 KB/s for this long
  bool progress = true;
};

struct DownloadResult {
  uint64_t bytes = 0;
  std::string sha256;           // of what was written
  bool checked = false;         // whether a checksum (given or declared) was compared
};

// Downloads `url` to `dest`: into a temporary sibling first, then renamed once the transfer is
// complete, the HTTP status is 2xx, and the checksum matches. On any failure (HTTP error, cut-off
// transfer, checksum mismatch, disk error) the temporary file is removed and calq::Error names the
// URL and the cause; `dest` is never left half-written.
DownloadResult download_file(const std::string& url, const std::filesystem::path& dest,
                             const DownloadOptions& opts = {});

}  // namespace calq::data
