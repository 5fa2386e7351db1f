// calq: calibrate, quantize and evaluate LLMs. Thin front end over the calq library.
#include <omp.h>
#include <csignal>

#include <cstdio>
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

int main(int argc, char** argv) {
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
