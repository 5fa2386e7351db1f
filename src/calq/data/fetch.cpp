#include "calq/data/fetch.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <vector>

#include "calq/core/error.h"
#include "calq/core/log.h"

namespace calq::data {

namespace fs = std::filesystem;

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  CALQ_CHECK(ctx_ && EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr) == 1,
             "sha256: cannot initialise OpenSSL digest");
}
Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }
void Sha256::update(const void* data, size_t n) {
  if (n) EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), data, n);
}
std::string Sha256::hex() {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), md, &len);
  std::string out;
  out.reserve(2 * len);
  for (unsigned i = 0; i < len; ++i) out += fmt::format("{:02x}", md[i]);
  return out;
}

std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes.data(), bytes.size());
  return h.hex();
}

std::string sha256_file(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  CALQ_CHECK(in, "cannot open {}", file.string());
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(buf.data(), static_cast<size_t>(in.gcount()));
  }
  CALQ_CHECK(in.eof(), "error reading {}", file.string());
  return h.hex();
}

fs::path cache_dir() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return fs::path(x) / "calq" / "datasets";
  const char* home = std::getenv("HOME");
  CALQ_CHECK(home && *home, "neither XDG_CACHE_HOME nor HOME is set: cannot locate the dataset cache");
  return fs::path(home) / ".cache" / "calq" / "datasets";
}

namespace {

void curl_global() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct Transfer {
  std::FILE* out = nullptr;
  Sha256 hash;
  uint64_t bytes = 0;
  uint64_t expected = 0;  // from Content-Length when known
  bool write_failed = false;
  std::string declared_sha;  // X-Linked-Etag, when it is a sha256
  std::unique_ptr<Progress> progress;
  std::string label;
};

size_t on_data(char* ptr, size_t size, size_t nmemb, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t n = size * nmemb;
  if (std::fwrite(ptr, 1, n, t->out) != n) {
    t->write_failed = true;
    return 0;  // makes curl abort with CURLE_WRITE_ERROR
  }
  t->hash.update(ptr, n);
  t->bytes += n;
  if (t->progress) t->progress->advance(n, n);
  return n;
}

std::string trim(std::string s) {
  auto issp = [](unsigned char c) { return std::isspace(c) != 0; };
  while (!s.empty() && issp(s.back())) s.pop_back();
  size_t i = 0;
  while (i < s.size() && issp(s[i])) ++i;
  return s.substr(i);
}

size_t on_header(char* buf, size_t size, size_t nitems, void* user) {
  auto* t = static_cast<Transfer*>(user);
  std::string line(buf, size * nitems);
  auto colon = line.find(':');
  if (colon == std::string::npos) {
    // A new status line (redirects): forget what an earlier response declared.
    if (line.rfind("HTTP/", 0) == 0) t->declared_sha.clear();
    return size * nitems;
  }
  std::string key = line.substr(0, colon);
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string value = trim(line.substr(colon + 1));
  if (key == "x-linked-etag") {
    value.erase(std::remove(value.begin(), value.end(), '"'), value.end());
    if (value.size() == 64 &&
        std::all_of(value.begin(), value.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }))
      t->declared_sha = value;
  }
  return size * nitems;
}

}  // namespace

DownloadResult download_file(const std::string& url, const fs::path& dest, const DownloadOptions& opts) {
  curl_global();
  std::error_code ec;
  if (!dest.parent_path().empty()) fs::create_directories(dest.parent_path(), ec);
  CALQ_CHECK(!ec, "cannot create {}: {}", dest.parent_path().string(), ec.message());
  const fs::path tmp = dest.parent_path() /
                       fmt::format(".{}.calq-download-{}", dest.filename().string(), ::getpid());
  Transfer t;
  t.out = std::fopen(tmp.c_str(), "wb");
  CALQ_CHECK(t.out, "cannot write {}", tmp.string());
  auto cleanup = [&] {
    if (t.out) std::fclose(t.out);
    t.out = nullptr;
    fs::remove(tmp, ec);
  };

  CURL* c = curl_easy_init();
  if (!c) {
    cleanup();
    fail("download {}: cannot initialise libcurl", url);
  }
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(c, CURLOPT_FAILONERROR, 0L);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &t);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, opts.connect_timeout_s);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1024L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, opts.low_speed_timeout_s);
  curl_easy_setopt(c, CURLOPT_USERAGENT, "calq/" CALQ_VERSION);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  if (opts.progress) t.progress = std::make_unique<Progress>("download " + dest.filename().string(), 0, "B");

  // Only a 2xx body goes to the file: the status is known before the first body byte.
  CURLcode rc = curl_easy_perform(c);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  curl_off_t content_length = -1;
  curl_easy_getinfo(c, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &content_length);
  curl_easy_cleanup(c);
  if (t.progress) t.progress->finish();

  if (rc != CURLE_OK) {
    std::string why = errbuf[0] ? errbuf : curl_easy_strerror(rc);
    if (t.write_failed) why = fmt::format("writing {} failed (disk full?)", tmp.string());
    cleanup();
    if (rc == CURLE_PARTIAL_FILE)
      fail("download {}: the transfer was cut off after {} bytes ({}); nothing was kept", url, t.bytes, why);
    fail("download {}: {}; nothing was kept", url, why);
  }
  if (status < 200 || status >= 300) {
    cleanup();
    fail("download {}: the server answered HTTP {}{}; nothing was kept", url, status,
         status == 404 ? " (not found)" : "");
  }
  if (content_length >= 0 && static_cast<uint64_t>(content_length) != t.bytes) {
    cleanup();
    fail("download {}: received {} bytes but the server announced {}; nothing was kept", url, t.bytes,
         static_cast<uint64_t>(content_length));
  }
  const bool flushed = std::fflush(t.out) == 0 && ::fsync(fileno(t.out)) == 0;
  const bool closed = std::fclose(t.out) == 0;
  t.out = nullptr;
  if (!flushed || !closed) {
    cleanup();
    fail("download {}: cannot write {} (disk full?); nothing was kept", url, tmp.string());
  }
  DownloadResult r;
  r.bytes = t.bytes;
  r.sha256 = t.hash.hex();
  const std::string& want = !opts.sha256.empty() ? opts.sha256 : t.declared_sha;
  if (!want.empty()) {
    r.checked = true;
    if (r.sha256 != want) {
      cleanup();
      fail("download {}: SHA-256 mismatch: got {}, expected {}{}; nothing was kept", url, r.sha256, want,
           opts.sha256.empty() ? " (declared by the server)" : "");
    }
  }
  fs::rename(tmp, dest, ec);
  if (ec) {
    cleanup();
    fail("download {}: cannot move the file into place as {}: {}", url, dest.string(), ec.message());
  }
  return r;
}

}  // namespace calq::data
