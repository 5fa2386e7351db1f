// safetensors reading (mmap, validated) and writing (planned layout, sharded, atomic).
//
// File layout (https://github.com/huggingface/safetensors): u64 LE header length N, N bytes of
// UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the data buffer; offsets are relative to the start of the data buffer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "calq/core/tensor.h"

namespace calq::io {

namespace fs = std::filesystem;

struct TensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0;  // byte offsets relative to the data buffer
  uint64_t end = 0;
};

// One mmapped safetensors file. Open() validates everything before returning:
// header length within the file and below 100 MiB, header is a JSON object, every entry has a
// known dtype, a non-negative shape, offsets with end-begin == numel*dtype_size, entries that
// neither overlap nor leave gaps, and a data buffer that ends exactly at the file end.
// Errors name the file and the tensor.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const fs::path& path);
  // Validates an in-memory image of a file (used by the fuzzer and tests); `label` names it in
  // errors. The bytes must outlive the returned object.
  static std::unique_ptr<SafetensorsFile> from_memory(const std::byte* data, size_t size,
                                                      std::string label);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const fs::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws if absent
  TensorView view(const std::string& name) const;
  // Tells the kernel the pages of this tensor are no longer needed (drops them from RSS).
  void release(const std::string& name) const;
  // The same for a byte range of this file's data buffer that the caller described: one of
  // tensors(), or a slice inside one (a Checkpoint's per-expert view of a fused bank).
  TensorView view(const TensorInfo& t) const;
  void release(const TensorInfo& t) const;

 private:
  SafetensorsFile() = default;
  void parse(std::string label);
  fs::path path_;
  const std::byte* base_ = nullptr;  // whole file
  size_t size_ = 0;
  bool mapped_ = false;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model directory: model.safetensors, or the shards listed by
// model.safetensors.index.json (every listed shard must exist and contain exactly the tensors the
// index assigns to it), or a single *.safetensors path.
//
// Mixture-of-experts tensors are seen under calq's per-expert names (io/moe_layout.h): a fused
// 3-D expert bank is exposed as one zero-copy view per expert and projection and its own name is
// hidden. That, and checking the expert tensors against the expert count, needs the model's
// config.json (next to the safetensors files); it is read when present, and a checkpoint with
// fused banks but no config.json is an error. Without a config.json the tensors are as stored.
// info(n).begin/end are byte offsets within the data buffer of file_of(n).
class Checkpoint {
 public:
  static Checkpoint open(const fs::path& dir_or_file);
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  TensorView view(const std::string& name) const;
  void release(const std::string& name) const;
  const std::vector<fs::path>& shard_paths() const { return shard_paths_; }
  const SafetensorsFile& file_of(const std::string& name) const;
  uint64_t total_bytes() const;

 private:
  struct Located {
    size_t file = 0;  // index into files_
    TensorInfo info;  // the exposed name; a byte range of that file
  };
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::vector<fs::path> shard_paths_;
  fs::path root_;  // what open() was given, for error messages
  std::map<std::string, Located> where_;
  const Located& locate(const std::string& name) const;
};

// Writer with a planned layout: declare every tensor first, then write their bytes in any order
// (pwrite at precomputed offsets), then finish(). Files are written under `dir`, which the caller
// makes atomic at directory level (see io/atomic.h); each file is also written as NAME.tmp and
// renamed on finish. Shards: tensors are assigned in declaration order to
// model-0000i-of-0000n.safetensors, a new shard starting when the next tensor would push the
// current one over max_shard_bytes (a tensor larger than the limit gets a shard of its own);
// a single shard is named model.safetensors and no index is written. With shards, the index
// model.safetensors.index.json {"metadata": {"total_size": N}, "weight_map": {...}} is written.
class SafetensorsWriter {
 public:
  SafetensorsWriter(fs::path dir, uint64_t max_shard_bytes, std::map<std::string, std::string> metadata);
  ~SafetensorsWriter();  // removes temp files if finish() was not reached
  void declare(const std::string& name, DType dtype, const Shape& shape);
  void write(const std::string& name, const void* data, size_t nbytes);  // nbytes must match
  void write(const std::string& name, const Tensor& t) { write(name, t.bytes.data(), t.bytes.size()); }
  // Checks every declared tensor was written exactly once, fsyncs, renames, writes the index.
  // Returns the file names written.
  std::vector<std::string> finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace calq::io
