// Export of a model (a Hugging Face checkpoint or a calq output, dequantized) to a GGUF file that
// llama.cpp loads: llama, mistral, qwen2 and qwen3 dense models with a byte-level BPE
// tokenizer.json, weights in F32, F16 or BF16 (norms and biases in F32, as llama.cpp's converter
// writes them).
#pragma once

#include <filesystem>
#include <string>

#include "calq/io/gguf.h"

namespace calq::gguf_export {

struct Options {
  io::GgmlType outtype = io::GgmlType::BF16;  // F32, F16 or BF16
  std::string pre;  // llama.cpp pre-tokenizer name; empty: detected from tokenizer.json
  bool progress = true;
};

// The llama.cpp pre-tokenizer name for a tokenizer.json's pre-tokenizer ("qwen2", "llama-bpe",
// "gpt-2"), or empty when calq does not recognise it.
std::string detect_pre_tokenizer(const std::filesystem::path& tokenizer_json);

void export_model(const std::filesystem::path& model_dir, const std::filesystem::path& out_file, const Options& opts);

}  // namespace calq::gguf_export
