// calq: calibrate, quantize and evaluate LLMs. Thin front end over the calq library.
#include <omp.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/engine/gemm.h"
#include "calq/io/cleanup.h"
#include "commands.h"

namespace calq::cli {
namespace {
std::string g_invocation;
}
const std::string& invocation() { return g_invocation; }
}  // namespace calq::cli

namespace {
// calq allocates tensors of tens to hundreds of MB again and again (weights, codes, dequantized
// copies); each fresh allocation is an mmap whose 4 KiB pages fault in one by one on first write,
// which costs more than the work on them (≈ 70 ms per 110 MB on the GPU host). glibc's
// glibc.malloc.hugetlb=1 tunable backs those mappings with transparent huge pages (512× fewer
// faults), but glibc reads tunables only at process start: so calq re-executes itself once with
// the tunable added (glibc without it ignores the name). CALQ_THP=0 turns this off.
void reexec_with_huge_pages(char** argv) {
  const char* off = std::getenv("CALQ_THP");
  if (off && std::strcmp(off, "0") == 0) return;
  const char* cur = std::getenv("GLIBC_TUNABLES");
  if (cur && std::strstr(cur, "glibc.malloc.hugetlb")) return;  // set already (by us, or the user)
  const std::string old = cur ? cur : "";
  const std::string t = old.empty() ? "glibc.malloc.hugetlb=1" : old + ":glibc.malloc.hugetlb=1";
  if (setenv("GLIBC_TUNABLES", t.c_str(), 1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: go on without huge pages
  if (cur) setenv("GLIBC_TUNABLES", old.c_str(), 1);
  else unsetenv("GLIBC_TUNABLES");
}
}  // namespace

int main(int argc, char** argv) {
  reexec_with_huge_pages(argv);
  // A file-size limit (ulimit -f) must surface as a write error naming the file, not kill us.
  std::signal(SIGXFSZ, SIG_IGN);
  // Killed by SIGINT/SIGTERM/SIGHUP: remove the temporary outputs being written, then die of it.
  calq::io::install_signal_cleanup();
  for (int i = 0; i < argc; ++i) calq::cli::g_invocation += (i ? " " : "") + std::string(i ? argv[i] : "calq");
  CLI::App app{"calq " CALQ_VERSION " — calibrate, quantize and evaluate large language models"};
  app.require_subcommand(1);
  app.fallthrough();  // global options may also follow the subcommand
  app.set_version_flag("--version", "calq " CALQ_VERSION);
  int threads = 0;
  bool quiet = false, verbose = false;
  app.add_option("--threads", threads, "Worker threads (default: all cores)")->check(CLI::NonNegativeNumber);
  app.add_flag("-q,--quiet", quiet, "Print only errors and results");
  app.add_flag("-v,--verbose", verbose, "Print debug messages");

  std::vector<calq::cli::Command> commands = {calq::cli::add_inspect(app), calq::cli::add_quantize(app),
                                                calq::cli::add_generate(app), calq::cli::add_export(app),
                                                calq::cli::add_tokenize(app), calq::cli::add_data(app),
                                                calq::cli::add_eval(app), calq::cli::add_calibrate(app),
                                                calq::cli::add_train(app)};

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (quiet) calq::set_log_level(calq::LogLevel::Warn);
  if (verbose) calq::set_log_level(calq::LogLevel::Debug);
  if (threads > 0) calq::engine::set_num_threads(threads);
  if (const char* t = std::getenv("GLIBC_TUNABLES")) calq::log_debug("GLIBC_TUNABLES={}", t);
  try {
    for (const auto& c : commands)
      if (c.sub->parsed()) return c.run();
  } catch (const calq::Error& e) {
    std::fprintf(stderr, "calq: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "calq: internal error: %s\n", e.what());
    return 2;
  }
  return 1;
}
