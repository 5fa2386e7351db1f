// calq data: list, fetch and inspect calibration / evaluation datasets.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <iostream>

#include "calq/core/error.h"
#include "calq/core/log.h"
#include "calq/data/dataset.h"
#include "calq/data/fetch.h"
#include "calq/io/atomic.h"
#include "calq/text/tokenizer.h"
#include "commands.h"

namespace calq::cli {

namespace {

struct DataArgs {
  std::string source, tokenizer, json_out, field = "text", packing = "concatenate", bos = "auto";
  bool skip_bad = false, offline = false, no_dedup = false, no_shuffle = false;
  size_t min_chars = 0, samples = 0, seq_len = 512, min_tokens = 0;
  uint64_t seed = 0;
  std::vector<std::string> fetch_names;
};

void add_source_options(CLI::App* c, DataArgs& a) {
  c->add_option("--field", a.field, "JSON/JSONL field holding the text")->capture_default_str();
  c->add_flag("--skip-bad-lines", a.skip_bad, "Skip (and count) JSONL lines that are not JSON or lack the field");
  c->add_option("--min-chars", a.min_chars, "Drop samples shorter than this many bytes");
  c->add_flag("--offline", a.offline, "Never download (also: CALQ_OFFLINE=1)");
}

data::LoadOptions load_options(const DataArgs& a) {
  data::LoadOptions o;
  o.text_field = a.field;
  o.skip_bad_lines = a.skip_bad;
  o.min_chars = a.min_chars;
  o.allow_download = !a.offline;
  o.wikitext_default_split = "train";
  return o;
}

int run_list() {
  fmt::print("{:<22} {}\n", "name", "files (in $CALQ_DATA or the cache, else downloaded)");
  for (auto& s : data::named_sources()) {
    fmt::print("{:<22} {}\n", s.name, s.description);
    for (auto& f : s.files)
      fmt::print("{:<22}   {} <- {}{}\n", "", f.cache_name, f.url, f.zip_member.empty() ? "" : " [" + f.zip_member + "]");
  }
  fmt::print("{:<22} {}\n", "c4:N", "the first N (1-8) c4 validation shards");
  fmt::print("\ncache: {}\n", data::cache_dir().string());
  return 0;
}

int run_fetch(const DataArgs& a) {
  for (auto& name : a.fetch_names) {
    auto src = data::find_named_source(name, "train");
    CALQ_CHECK(src.has_value(), "'{}' is not a named source (see calq data list)", name);
    for (auto& p : data::resolve_source(*src, load_options(a))) fmt::print("{}\n", p.string());
  }
  return 0;
}

int run_inspect(const DataArgs& a) {
  auto ds = data::Dataset::load(a.source, load_options(a));
  std::unique_ptr<text::Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = text::load_tokenizer(a.tokenizer);
  // What would stop the selection is said before the statistics, not after them.
  CALQ_CHECK(a.samples == 0 || tok, "--samples needs --tokenizer (the selection counts tokens)");
  CALQ_CHECK(a.samples == 0 || a.bos != "always" || tok->bos_id().has_value(),
             "--bos always: the tokenizer ({}) has no BOS token; use --bos auto or never", tok->describe());
  auto st = data::inspect(ds, tok.get());
  nlohmann::json j = st.to_json();
  j["source"] = a.source;
  j["name"] = ds.name;
  j["skipped_lines"] = ds.skipped_lines;
  j["dropped_short"] = ds.dropped_short;
  if (tok) j["tokenizer"] = tok->describe();

  fmt::print("source      {} ({})\n", a.source, ds.name);
  fmt::print("samples     {}{}{}\n", st.samples,
             ds.skipped_lines ? fmt::format(" ({} bad lines skipped)", ds.skipped_lines) : "",
             ds.dropped_short ? fmt::format(" ({} shorter than {} chars dropped)", ds.dropped_short,
                                            ds.metadata.value("min_chars", a.min_chars))
                              : "");
  fmt::print("characters  {}\n", st.characters);
  if (st.tokens >= 0) fmt::print("tokens      {} ({})\n", st.tokens, tok->describe());
  fmt::print("duplicates  {} (removed in calibration), empty {}\n", st.duplicates, st.empty);
  fmt::print("length      min {} / median {:.0f} / mean {:.1f} / max {} {}\n", st.min_len, st.median_len, st.mean_len,
             st.max_len, st.length_unit);
  size_t peak = 1;
  for (auto& [b, c] : st.histogram) peak = std::max(peak, c);
  for (auto& [b, c] : st.histogram)
    fmt::print("  {:>16} {:>6} {}\n", b, c, std::string((c * 40 + peak - 1) / peak, '#'));
  auto pct = [&](size_t n) { return st.samples ? 100.0 * static_cast<double>(n) / static_cast<double>(st.samples) : 0.0; };
  fmt::print("domains     code {:.1f}% · math {:.1f}% · chat {:.1f}% · non-English {:.1f}% · prose {:.1f}% "
             "(heuristic)\n",
             pct(st.domains.code), pct(st.domains.math), pct(st.domains.chat), pct(st.domains.non_english),
             pct(st.domains.prose));

  if (a.samples > 0) {
    data::SelectOptions so;
    so.samples = a.samples;
    so.seq_len = a.seq_len;
    so.seed = a.seed;
    so.dedup = !a.no_dedup;
    so.shuffle = !a.no_shuffle;
    so.min_tokens = a.min_tokens;
    so.packing = a.packing == "per-sample" ? data::Packing::PerSample : data::Packing::Concatenate;
    so.bos = a.bos == "always" ? data::BosMode::Always : a.bos == "never" ? data::BosMode::Never : data::BosMode::Auto;
    auto cs = data::make_calibration_set(ds, *tok, so);
    const int64_t slots = static_cast<int64_t>(cs.tokens.size()) * cs.seq_len;
    // What --bos and --no-shuffle did, seen in the sequences themselves: how many start with the
    // tokenizer's BOS, and the start of the first one.
    size_t with_bos = 0;
    const auto bos_id = tok->bos_id();
    for (const auto& seq : cs.tokens) with_bos += bos_id && !seq.empty() && seq.front() == *bos_id;
    std::vector<int32_t> first;
    if (!cs.tokens.empty()) {
      const auto& s0 = cs.tokens.front();
      first.assign(s0.begin(), s0.begin() + std::min<int64_t>({8, cs.lengths.front(), static_cast<int64_t>(s0.size())}));
    }
    const std::string first_text = tok->decode(first, false);
    fmt::print("selection   {} sequences × {} tokens ({}), from {} samples; {} real tokens, {:.1f}% padding; "
               "{} duplicates removed, {} too short\n",
               cs.tokens.size(), cs.seq_len, a.packing, cs.samples_used, cs.real_tokens(),
               slots ? 100.0 * static_cast<double>(slots - cs.real_tokens()) / static_cast<double>(slots) : 0.0,
               cs.duplicates_removed, cs.too_short);
    fmt::print("            order {}; {} of {} sequences start with BOS (--bos {}); the first begins {:?}\n",
               a.no_shuffle ? "as in the source" : fmt::format("shuffled (seed {})", a.seed), with_bos,
               cs.tokens.size(), a.bos, first_text);
    j["selection"] = {{"sequences", cs.tokens.size()}, {"seq_len", cs.seq_len}, {"packing", a.packing},
                      {"samples_used", cs.samples_used}, {"real_tokens", cs.real_tokens()},
                      {"duplicates_removed", cs.duplicates_removed}, {"too_short", cs.too_short}, {"seed", a.seed},
                      {"shuffled", !a.no_shuffle}, {"bos", a.bos}, {"sequences_starting_with_bos", with_bos},
                      {"first_tokens", first}, {"first_text", first_text}};
  }
  if (!a.json_out.empty()) io::write_file_atomic(a.json_out, j.dump(2) + "\n");
  return 0;
}

}  // namespace

Command add_data(CLI::App& app) {
  auto a = std::make_shared<DataArgs>();
  auto* c = app.add_subcommand("data", "List, fetch and inspect calibration and evaluation datasets");
  c->require_subcommand(1);
  auto* list = c->add_subcommand("list", "The named sources and where their files come from");
  auto* fetch = c->add_subcommand("fetch", "Download named sources into the cache (verified by SHA-256)");
  fetch->add_option("names", a->fetch_names, "bartowski-v3, wikitext2[:test|validation|train], c4[:N]")->required();
  fetch->add_flag("--offline", a->offline, "Only report where the files are; never download");
  auto* ins = c->add_subcommand("inspect", "Samples, characters, tokens, lengths, duplicates and domain mix of a source");
  ins->add_option("--calibration,--dataset", a->source,
                  "A named source (bartowski-v3, wikitext2[:split] — train by default here —, c4[:N]) or a file "
                  "(.txt paragraphs, .json, .jsonl, .gz of those)")
      ->required();
  ins->add_option("--tokenizer", a->tokenizer, "Model directory or tokenizer file, to count tokens");
  ins->add_option("--json", a->json_out, "Also write the figures as JSON to this file");
  add_source_options(ins, *a);
  ins->add_option("--samples", a->samples, "Also build a calibration selection of this many sequences and report it");
  ins->add_option("--seq-len", a->seq_len, "Tokens per calibration sequence")->capture_default_str();
  ins->add_option("--seed", a->seed, "Seed of the deterministic shuffle")->capture_default_str();
  ins->add_option("--packing", a->packing, "concatenate: one token stream cut into sequences; per-sample: one "
                  "sample per sequence, right-padded")
      ->check(CLI::IsMember({"concatenate", "per-sample"}))
      ->capture_default_str();
  ins->add_option("--bos", a->bos, "BOS at the start of each sequence: auto (when the tokenizer adds one), always, never")
      ->check(CLI::IsMember({"auto", "always", "never"}))
      ->capture_default_str();
  ins->add_option("--min-tokens", a->min_tokens, "Skip samples with fewer tokens");
  ins->add_flag("--no-dedup", a->no_dedup, "Keep exact duplicate samples");
  ins->add_flag("--no-shuffle", a->no_shuffle, "Keep the source order");
  return {c, [a, list, fetch, ins]() -> int {
            if (list->parsed()) return run_list();
            if (fetch->parsed()) return run_fetch(*a);
            if (ins->parsed()) return run_inspect(*a);
            return 1;
          }};
}

}  // namespace calq::cli
