#include "calq/io/atomic.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "calq/core/error.h"

namespace calq::io {

namespace {

void fsync_path(const fs::path& p, bool dir) {
  int fd = ::open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

void write_file_atomic(const fs::path& p, std::string_view content) {
  fs::path tmp = p;
  tmp += ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  CALQ_CHECK(fd >= 0, "cannot create {}: {}", tmp.string(), std::strerror(errno));
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail("cannot write {}: {}", p.string(), std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail("cannot write {}: {}", p.string(), std::strerror(err));
  }
  if (::rename(tmp.c_str(), p.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail("cannot rename {} to {}: {}", tmp.string(), p.string(), std::strerror(err));
  }
}

AtomicDir::AtomicDir(fs::path final_dir, bool overwrite) : overwrite_(overwrite) {
  CALQ_CHECK(!final_dir.empty(), "output directory path is empty");
  final_ = fs::absolute(final_dir).lexically_normal();
  if (final_.filename().empty()) final_ = final_.parent_path();
  std::error_code ec;
  if (fs::exists(final_, ec) && !overwrite)
    fail("output directory {} exists; pass --overwrite to replace it", final_.string());
  if (fs::exists(final_, ec) && !fs::is_directory(final_, ec))
    fail("output path {} exists and is not a directory", final_.string());
  fs::path parent = final_.parent_path();
  CALQ_CHECK(fs::is_directory(parent, ec), "cannot create {}: parent directory {} does not exist",
             final_.string(), parent.string());
  tmp_ = parent / ("." + final_.filename().string() + ".calq-tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp_, ec);
  if (!fs::create_directory(tmp_, ec))
    fail("cannot create {}: {}", tmp_.string(), ec ? ec.message() : "already exists");
}

AtomicDir::~AtomicDir() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

void AtomicDir::commit() {
  CALQ_CHECK(!committed_, "output directory {} already committed", final_.string());
  std::error_code ec;
  fs::path old;
  if (fs::exists(final_, ec)) {
    CALQ_CHECK(overwrite_, "output directory {} appeared while writing; pass --overwrite", final_.string());
    old = final_.parent_path() / ("." + final_.filename().string() + ".calq-old-" + std::to_string(::getpid()));
    fs::remove_all(old, ec);
    fs::rename(final_, old, ec);
    if (ec) fail("cannot move the old {} aside: {}", final_.string(), ec.message());
  }
  fs::rename(tmp_, final_, ec);
  if (ec) {
    std::error_code ec2;
    if (!old.empty()) fs::rename(old, final_, ec2);
    fail("cannot rename {} to {}: {}", tmp_.string(), final_.string(), ec.message());
  }
  committed_ = true;
  fsync_path(final_.parent_path(), true);
  if (!old.empty()) fs::remove_all(old, ec);
}

}  // namespace calq::io
