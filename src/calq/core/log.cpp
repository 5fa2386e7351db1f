#include "calq/core/log.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <mutex>

namespace calq {

namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::Info)};
std::mutex g_mutex;
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

void log_line(LogLevel level, const std::string& msg) {
  if (static_cast<int>(level) < g_level.load()) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  const char* prefix = level == LogLevel::Warn ? "warning: " : level == LogLevel::Error ? "error: " : "";
  std::fprintf(stderr, "%s%s\n", prefix, msg.c_str());
}

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e8) return "--:--";
  auto t = static_cast<long long>(s + 0.5);
  if (t >= 3600) return fmt::format("{}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60);
  return fmt::format("{}:{:02}", t / 60, t % 60);
}

std::string format_bytes(double b) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) {
    b /= 1000;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.2f} {}", b, units[u]);
}

uint64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

uint64_t mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

Progress::Progress(std::string label, uint64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
  tty_ = isatty(STDERR_FILENO) != 0;
}

Progress::~Progress() {
  if (!finished_ && done_ > 0) finish();
}

double Progress::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::advance(uint64_t n, uint64_t bytes, const std::string& detail) {
  done_ += n;
  bytes_ += bytes;
  detail_ = detail;
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_draw_).count();
  if (done_ < total_ && since >= (tty_ ? 0.1 : log_every_s_)) {
    last_draw_ = now;
    draw(false);
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  draw(true);
}

void Progress::draw(bool final) {
  if (log_level() > LogLevel::Info) return;
  double el = elapsed_s();
  double frac = total_ ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
  double eta = done_ ? el / static_cast<double>(done_) * static_cast<double>(total_ - std::min(done_, total_)) : -1;
  if (total_bytes_ > 0 && bytes_ > 0)
    eta = el / static_cast<double>(bytes_) * static_cast<double>(total_bytes_ - std::min(bytes_, total_bytes_));
  std::string rate = bytes_ && el > 0 ? fmt::format(" {}/s", format_bytes(bytes_ / el)) : "";
  std::string when = final ? fmt::format(" in {}", format_duration(el))
                           : fmt::format(" ETA {}", format_duration(eta));
  std::string unit = unit_.empty() ? "" : " " + unit_;
  std::string text;
  if (tty_) {
    const int width = 24;
    int fill = static_cast<int>(frac * width);
    text = fmt::format("\r{} [{}{}] {}/{}{}{}{}{}\x1b[K", label_, std::string(fill, '#'),
                       std::string(width - fill, '.'), done_, total_, unit, rate, when,
                       detail_.empty() || final ? "" : " | " + detail_);
    if (final) text += "\n";
  } else {
    text = fmt::format("{}: {}/{}{} ({:.0f}%){}{}{}\n", label_, done_, total_, unit, frac * 100,
                       rate, when, detail_.empty() || final ? "" : " | " + detail_);
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace calq
