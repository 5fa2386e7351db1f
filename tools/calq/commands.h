// Subcommands of the calq CLI. Each registers its options on the CLI11 app and returns the
// function that runs it; the library does the work.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace calq::cli {

using Runner = std::function<int()>;
struct Command {
  CLI::App* sub;
  Runner run;
};
// The command line as typed (for reports).
const std::string& invocation();
Command add_inspect(CLI::App& app);
Command add_quantize(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_export(CLI::App& app);
Command add_tokenize(CLI::App& app);
Command add_data(CLI::App& app);
Command add_eval(CLI::App& app);
Command add_calibrate(CLI::App& app);
Command add_train(CLI::App& app);

}  // namespace calq::cli
