// calq export: a model (HF checkpoint or calq output) to another serving format.
#include <filesystem>

#include "calq/core/error.h"
#include "calq/export/gguf_export.h"
#include "commands.h"

namespace calq::cli {

Command add_export(CLI::App& app) {
  struct Args {
    std::string input, output, format = "gguf", outtype = "bf16", pre;
    bool overwrite = false;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("export", "Export a model (Hugging Face or calq output, dequantized) to GGUF for llama.cpp");
  c->add_option("--input,-i", a->input, "Model directory (Hugging Face checkpoint or calq output)")->required();
  c->add_option("--output,-o", a->output, "Output file (.gguf)")->required();
  c->add_option("--format", a->format, "Output format")->check(CLI::IsMember({"gguf"}))->capture_default_str();
  c->add_option("--outtype", a->outtype, "Weight type: f32, f16 or bf16 (norms and biases stay f32)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
  c->add_option("--pre", a->pre,
                "llama.cpp pre-tokenizer name (qwen2, llama-bpe, gpt-2, ...); default: detected from tokenizer.json");
  c->add_flag("--overwrite", a->overwrite, "Replace an existing output file");
  return {c, [a]() -> int {
            namespace fs = std::filesystem;
            CALQ_CHECK(a->overwrite || !fs::exists(a->output), "{} exists (use --overwrite to replace it)", a->output);
            gguf_export::Options o;
            o.outtype = a->outtype == "f32" ? io::GgmlType::F32 : a->outtype == "f16" ? io::GgmlType::F16 : io::GgmlType::BF16;
            o.pre = a->pre;
            gguf_export::export_model(a->input, a->output, o);
            return 0;
          }};
}

}  // namespace calq::cli
