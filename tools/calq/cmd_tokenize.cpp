// calq tokenize: text -> token ids (or ids -> text with --decode).
#include <fmt/format.h>
#include <omp.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/text/tokenizer.h"
#include "commands.h"

namespace calq::cli {

namespace {

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open input {}: {}", path, std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_all(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  if (!f) fail("cannot open output {}: {}", path, std::strerror(errno));
  f.write(data.data(), std::streamsize(data.size()));
  f.close();
  if (!f) fail("cannot write output {}", path);
}

std::vector<int32_t> parse_ids(const std::string& data, const std::string& format, const std::string& path) {
  std::vector<int32_t> ids;
  if (format == "bin") {
    if (data.size() % 4) fail("{}: {} bytes is not a whole number of int32 ids", path, data.size());
    ids.resize(data.size() / 4);
    for (size_t i = 0; i < ids.size(); ++i) {
      auto* p = reinterpret_cast<const unsigned char*>(data.data()) + 4 * i;
      ids[i] = int32_t(uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
    }
    return ids;
  }
  size_t i = 0, n = data.size();
  while (i < n) {
    while (i < n && std::isspace(static_cast<unsigned char>(data[i]))) ++i;
    if (i >= n) break;
    size_t j = i;
    if (data[j] == '-') ++j;
    while (j < n && std::isdigit(static_cast<unsigned char>(data[j]))) ++j;
    if (j == i || (j < n && !std::isspace(static_cast<unsigned char>(data[j]))) || (data[i] == '-' && j == i + 1))
      fail("{}: \"{}\" is not a token id", path, data.substr(i, std::min<size_t>(20, data.find_first_of(" \t\r\n", i) - i)));
    ids.push_back(int32_t(std::stol(data.substr(i, j - i))));
    i = j;
  }
  return ids;
}

}  // namespace

Command add_tokenize(CLI::App& app) {
  auto* sub = app.add_subcommand("tokenize", "Tokenize a text file into token ids (or decode ids with --decode)");
  struct Opts {
    std::string tokenizer, input, output, format = "txt";
    bool count = false, special = false, decode = false;
  };
  auto o = std::make_shared<Opts>();
  sub->add_option("--tokenizer", o->tokenizer, "Model directory or tokenizer file")->required();
  sub->add_option("--input", o->input, "Input file (text; ids with --decode)")->required();
  sub->add_option("--output", o->output, "Output file (ids; text with --decode)");
  sub->add_option("--format", o->format, "Ids as bin (int32 little-endian) or txt (space-separated)")
      ->check(CLI::IsMember({"bin", "txt"}));
  sub->add_flag("--count", o->count, "Print only the number of tokens");
  sub->add_flag("--add-special-tokens", o->special, "Add the BOS/EOS the tokenizer adds (default: none)");
  sub->add_flag("--decode", o->decode, "Decode ids from --input into text");
  auto run = [o]() -> int {
    if (!o->count && o->output.empty()) fail("tokenize: --output is required (or use --count)");
    using clk = std::chrono::steady_clock;
    auto t0 = clk::now();
    auto tok = text::load_tokenizer(o->tokenizer);
    double load_s = std::chrono::duration<double>(clk::now() - t0).count();
    log_info("tokenizer: {} (loaded in {:.2f} s)", tok->describe(), load_s);
    std::string data = read_all(o->input);
    if (o->decode) {
      auto ids = parse_ids(data, o->format, o->input);
      std::string text = tok->decode(ids, false);
      if (o->count) {
        fmt::print("{}\n", ids.size());
        if (o->output.empty()) return 0;
      }
      write_all(o->output, text);
      return 0;
    }
    auto t1 = clk::now();
    auto ids = tok->encode_parallel(data, o->special, omp_get_max_threads());
    double enc_s = std::chrono::duration<double>(clk::now() - t1).count();
    log_info("{} tokens from {} bytes in {:.3f} s: {:.0f} tokens/s, {:.1f} MB/s, {} threads", ids.size(), data.size(),
             enc_s, ids.size() / std::max(enc_s, 1e-9), data.size() / 1e6 / std::max(enc_s, 1e-9), omp_get_max_threads());
    if (o->count) fmt::print("{}\n", ids.size());
    if (!o->output.empty()) {
      std::string out;
      if (o->format == "bin") {
        out.resize(ids.size() * 4);
        for (size_t i = 0; i < ids.size(); ++i) {
          uint32_t v = uint32_t(ids[i]);
          out[4 * i] = char(v & 0xFF), out[4 * i + 1] = char((v >> 8) & 0xFF), out[4 * i + 2] = char((v >> 16) & 0xFF),
                  out[4 * i + 3] = char(v >> 24);
        }
      } else {
        out.reserve(ids.size() * 6);
        for (size_t i = 0; i < ids.size(); ++i) {
          if (i) out += ' ';
          out += std::to_string(ids[i]);
        }
        out += '\n';
      }
      write_all(o->output, out);
    }
    return 0;
  };
  return {sub, run};
}

}  // namespace calq::cli
