// Atomic file and directory creation (temp name, fsync, rename).
#include "calq/io/atomic.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE, RENAME_NOREPLACE (glibc >= 2.28)
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>

#include "calq/core/error.h"

namespace calq::io {

namespace {

std::string errno_text(int err) {
  return std::generic_category().message(err);
}

// Makes a rename in `dir` durable. Failure only weakens crash safety, never correctness, and some
// filesystems refuse fsync on directories, so it is not an error.
void fsync_dir(const fs::path& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// renameat2 with flags; returns errno (0 on success).
int rename_with(const fs::path& from, const fs::path& to, unsigned flags) {
  return ::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags) == 0 ? 0 : errno;
}

bool unsupported(int err) {
  return err == EINVAL || err == ENOSYS || err == ENOTSUP;
}

// The hidden sibling ".NAME.calq-TAG-PID" of dir. (fmt rather than string '+': GCC 12 warns
// falsely, -Wrestrict, on "." + std::string at -O2.)
fs::path sibling(const fs::path& dir, const char* tag) {
  return dir.parent_path() /
         fmt::format(".{}.calq-{}-{}", dir.filename().string(), tag, ::getpid());
}

}  // namespace

void write_file_atomic(const fs::path& p, std::string_view content) {
  fs::path tmp = p;
  tmp += ".tmp";
  TempGuard guard(tmp);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  CALQ_CHECK(fd >= 0, "{}: cannot create: {}", tmp.string(), errno_text(errno));
  auto give_up = [&](const char* what, int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    fail("{}: {}: {}", p.string(), what, errno_text(err));
  };
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) give_up("write failed", n < 0 ? errno : EIO);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) give_up("fsync failed", errno);
  const int closing = fd;
  fd = -1;
  if (::close(closing) != 0) give_up("close failed", errno);
  if (::rename(tmp.c_str(), p.c_str()) != 0)
    give_up("cannot rename the temp file into place", errno);
  fsync_dir(p.parent_path());
}

AtomicDir::AtomicDir(fs::path final_dir, bool overwrite) : overwrite_(overwrite) {
  CALQ_CHECK(!final_dir.empty(), "the output directory path is empty");
  final_ = fs::absolute(final_dir).lexically_normal();
  if (final_.filename().empty()) final_ = final_.parent_path();  // "out/" -> "out"
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(final_, ec);
  if (fs::exists(st)) {
    CALQ_CHECK(overwrite, "output directory {} exists; pass --overwrite to replace it",
               final_.string());
    // Replacing means deleting: only ever a directory, never a file the user pointed at by mistake.
    CALQ_CHECK(fs::is_directory(st),
               "output path {} exists and is not a directory; not replacing it", final_.string());
  }
  const fs::path parent = final_.parent_path();
  CALQ_CHECK(fs::is_directory(parent, ec),
             "cannot create {}: the parent directory {} does not exist", final_.string(),
             parent.string());
  // A sibling, so that the final rename stays within one filesystem; hidden and tagged with the
  // pid so that concurrent runs do not collide and leftovers of a killed run are recognisable.
  tmp_ = sibling(final_, "tmp");
  fs::remove_all(tmp_, ec);  // a leftover of an earlier run that had our pid
  if (!fs::create_directory(tmp_, ec))
    fail("{}: cannot create the temporary output directory: {}", tmp_.string(),
         ec ? ec.message() : std::string("it already exists"));
  guard_ = TempGuard(tmp_);
}

AtomicDir::~AtomicDir() {
  if (!committed_ && !tmp_.empty()) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

void AtomicDir::commit() {
  CALQ_CHECK(!committed_, "output directory {} already committed", final_.string());
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(final_, ec));
  if (!exists) {
    // NOREPLACE: if someone created the directory meanwhile, do not silently replace it.
    int err = rename_with(tmp_, final_, RENAME_NOREPLACE);
    if (unsupported(err)) err = ::rename(tmp_.c_str(), final_.c_str()) == 0 ? 0 : errno;
    if (err == EEXIST || err == ENOTEMPTY)
      fail("output directory {} appeared while calq was writing; pass --overwrite to replace it",
           final_.string());
    if (err) fail("cannot rename {} to {}: {}", tmp_.string(), final_.string(), errno_text(err));
    committed_ = true;
    guard_.release();
    fsync_dir(final_.parent_path());
    return;
  }
  CALQ_CHECK(overwrite_,
             "output directory {} appeared while calq was writing; pass --overwrite to replace it",
             final_.string());
  CALQ_CHECK(fs::is_directory(fs::symlink_status(final_, ec)),
             "output path {} exists and is not a directory; not replacing it", final_.string());
  // Swap old and new in one step, so the output path never disappears; the old tree then sits at
  // the temp name and is removed.
  int err = rename_with(tmp_, final_, RENAME_EXCHANGE);
  if (err == 0) {
    committed_ = true;  // tmp_ now holds the old output, still guarded until it is removed
    fsync_dir(final_.parent_path());
    fs::remove_all(tmp_, ec);  // the old output; if this fails only a hidden directory remains
    return;
  }
  if (!unsupported(err))
    fail("cannot replace {} with {}: {}", final_.string(), tmp_.string(), errno_text(err));
  // No RENAME_EXCHANGE on this filesystem: move the old directory aside, move the new one in.
  const fs::path old = sibling(final_, "old");
  fs::remove_all(old, ec);
  fs::rename(final_, old, ec);
  if (ec) fail("cannot move the old {} aside: {}", final_.string(), ec.message());
  fs::rename(tmp_, final_, ec);
  if (ec) {
    std::error_code ec2;
    fs::rename(old, final_, ec2);  // put the old output back
    fail("cannot rename {} to {}: {}", tmp_.string(), final_.string(), ec.message());
  }
  committed_ = true;
  guard_.release();
  fsync_dir(final_.parent_path());
  fs::remove_all(old, ec);
}

}  // namespace calq::io
