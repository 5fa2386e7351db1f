// Logging to stderr and a progress bar with rate and ETA.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <string>

namespace calq {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3, Quiet = 4 };
void set_log_level(LogLevel level);
LogLevel log_level();
void log_line(LogLevel level, const std::string& msg);

template <typename... Args>
void log_info(fmt::format_string<Args...> f, Args&&... a) {
  if (log_level() <= LogLevel::Info) log_line(LogLevel::Info, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void log_warn(fmt::format_string<Args...> f, Args&&... a) {
  if (log_level() <= LogLevel::Warn) log_line(LogLevel::Warn, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... a) {
  if (log_level() <= LogLevel::Debug) log_line(LogLevel::Debug, fmt::format(f, std::forward<Args>(a)...));
}

// A progress bar on stderr: "label [#####.....] 12/48 tensors 3.1 GB/s ETA 0:42 | detail".
// On a terminal it redraws one line at most 10 times a second; otherwise (logs, CI) it prints a
// plain line at most every `log_every_s` seconds and at the end. Silent below LogLevel::Info.
class Progress {
 public:
  Progress(std::string label, uint64_t total, std::string unit = "");
  // With the total byte count known, the ETA follows bytes rather than items (tensors differ in
  // size by orders of magnitude).
  void set_total_bytes(uint64_t total_bytes) { total_bytes_ = total_bytes; }
  ~Progress();
  // Advance by `n` units; `bytes` feeds the throughput figure when non-zero.
  void advance(uint64_t n = 1, uint64_t bytes = 0, const std::string& detail = "");
  void finish();
  double elapsed_s() const;

 private:
  void draw(bool final);
  std::string label_, unit_, detail_;
  uint64_t total_, done_ = 0, bytes_ = 0, total_bytes_ = 0;
  std::chrono::steady_clock::time_point start_, last_draw_;
  bool tty_ = false, finished_ = false;
  double log_every_s_ = 10.0;
};

std::string format_duration(double seconds);  // "1:02:03" / "4:05"
std::string format_bytes(double bytes);       // "1.23 GB"
// Peak resident set size of this process in bytes (from /proc/self/status VmHWM).
uint64_t peak_rss_bytes();
// MemAvailable from /proc/meminfo (0 when unknown).
uint64_t mem_available_bytes();

}  // namespace calq
