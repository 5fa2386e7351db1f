// Removal of registered temporary outputs on SIGINT/SIGTERM/SIGHUP (see cleanup.h).
#include "calq/io/cleanup.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>

#include "calq/core/log.h"

namespace calq::io {

namespace {

constexpr int kSlots = 64;
constexpr size_t kPathMax = 4096;

// A slot is claimed with `state` 0 → 1 (being written), published as 2 (active); the handler
// only reads slots in state 2, so it never sees a half-copied path.
struct Slot {
  std::atomic<int> state{0};
  char path[kPathMax];
};
Slot g_slots[kSlots];
std::atomic<bool> g_installed{false};
std::atomic<bool> g_warned{false};

// struct linux_dirent64 (getdents64(2)): u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, then the
// NUL-terminated name at byte 19.
constexpr size_t kReclenAt = 16, kTypeAt = 18, kNameAt = 19;

// Removes everything inside the directory open as `fd` (depth-first), then nothing else.
bool empty_dir_at(int fd, int depth) {
  if (depth > 64) return false;
  alignas(8) char buf[8192];
  bool ok = true;
  // Reads the directory in passes; a pass that reaches the end having removed nothing ends it
  // (empty, or only entries that cannot be removed: then ok is false).
  bool removed_any = false;
  for (;;) {
    const long n = ::syscall(SYS_getdents64, fd, buf, sizeof(buf));
    if (n < 0) return false;
    if (n == 0) {
      if (!removed_any) return ok;
      // Entries were removed while the cursor moved: rewind and read again.
      removed_any = false;
      ::lseek(fd, 0, SEEK_SET);
      continue;
    }
    for (long off = 0; off < n;) {
      const char* ent = buf + off;
      unsigned short reclen;
      std::memcpy(&reclen, ent + kReclenAt, sizeof reclen);
      const unsigned char type = static_cast<unsigned char>(ent[kTypeAt]);
      off += reclen;
      const char* name = ent + kNameAt;
      if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0))) continue;
      bool is_dir = type == DT_DIR;
      if (type == DT_UNKNOWN) {
        struct stat st;
        is_dir = ::fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
      }
      if (is_dir) {
        const int sub = ::openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub < 0) {
          ok = false;
          continue;
        }
        ok = empty_dir_at(sub, depth + 1) && ok;
        ::close(sub);
        if (::unlinkat(fd, name, AT_REMOVEDIR) == 0)
          removed_any = true;
        else
          ok = false;
      } else if (::unlinkat(fd, name, 0) == 0) {
        removed_any = true;
      } else {
        ok = false;
      }
    }
  }
}

void on_signal(int sig) {
  const int saved = errno;
  for (Slot& s : g_slots)
    if (s.state.load(std::memory_order_acquire) == 2) remove_tree_signal_safe(s.path);
  errno = saved;
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

}  // namespace

bool remove_tree_signal_safe(const char* path) {
  struct stat st;
  if (::lstat(path, &st) != 0) return errno == ENOENT;
  if (!S_ISDIR(st.st_mode)) return ::unlink(path) == 0;
  const int fd = ::open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = empty_dir_at(fd, 0);
  ::close(fd);
  return ::rmdir(path) == 0 && ok;
}

void install_signal_cleanup() {
  if (g_installed.exchange(true)) return;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&sa.sa_mask, sig);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
}

TempGuard::TempGuard(const std::filesystem::path& path) {
  const std::string abs = std::filesystem::absolute(path).string();
  if (abs.size() >= kPathMax) return;
  for (int i = 0; i < kSlots; ++i) {
    int expected = 0;
    if (g_slots[i].state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      std::memcpy(g_slots[i].path, abs.c_str(), abs.size() + 1);
      g_slots[i].state.store(2, std::memory_order_release);
      slot_ = i;
      return;
    }
  }
  if (!g_warned.exchange(true))
    log_warn("more than {} temporary outputs at once: {} is not removed if calq is killed", kSlots, abs);
}

TempGuard::~TempGuard() { release(); }

TempGuard& TempGuard::operator=(TempGuard&& o) noexcept {
  if (this != &o) {
    release();
    slot_ = o.slot_;
    o.slot_ = -1;
  }
  return *this;
}

void TempGuard::release() {
  if (slot_ < 0) return;
  g_slots[slot_].state.store(0, std::memory_order_release);
  slot_ = -1;
}

}  // namespace calq::io
