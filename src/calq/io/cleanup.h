// Temporary outputs removed when calq is killed by SIGINT, SIGTERM or SIGHUP.
//
// Every writer that builds a file or directory under a temporary name (AtomicDir, the logits file,
// GGUF export, write_file_atomic) registers that name with a TempGuard for as long as it exists.
// install_signal_cleanup() installs handlers that remove every registered path — only with
// async-signal-safe system calls (openat, getdents64, unlinkat) — and then re-raise the signal
// with its default action, so the exit status still says which signal ended the run. Normal error
// paths clean up through destructors as before; this covers the kill.
#pragma once

#include <filesystem>

namespace calq::io {

// Installs the handlers (idempotent). calq's main() calls it once.
void install_signal_cleanup();

// Registers `path` (a file or a directory tree) for removal on a fatal signal while the guard
// lives. Up to 64 paths at once; more are not registered (logged once, not an error).
class TempGuard {
 public:
  TempGuard() = default;
  explicit TempGuard(const std::filesystem::path& path);
  ~TempGuard();
  TempGuard(const TempGuard&) = delete;
  TempGuard& operator=(const TempGuard&) = delete;
  TempGuard(TempGuard&& o) noexcept : slot_(o.slot_) { o.slot_ = -1; }
  TempGuard& operator=(TempGuard&& o) noexcept;
  // Stops guarding (the path was renamed into place or removed).
  void release();

 private:
  int slot_ = -1;
};

// Removes a file or directory tree using only async-signal-safe calls; returns false if anything
// could not be removed. Exposed for tests.
bool remove_tree_signal_safe(const char* path);

}  // namespace calq::io
