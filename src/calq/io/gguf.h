// GGUF (version 3), the file format of llama.cpp: a writer and a reader.
//
// Layout (little-endian): "GGUF" | u32 version | u64 tensor count | u64 metadata count |
// metadata (key string, u32 type, value) | tensor infos (name, u32 n_dims, u64 ne[n_dims],
// u32 ggml type, u64 offset) | zero padding to `general.alignment` (default 32) | tensor data, each
// tensor at its offset from the data start, aligned. Strings are u64 length + bytes. ne[0] is the
// fastest-varying dimension: a row-major [rows, cols] matrix has ne = {cols, rows}.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace calq::io {

enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10,
  I64 = 11, F64 = 12
};

// ggml tensor types calq reads or writes (values from ggml.h).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q8_0 = 8, BF16 = 30 };
// Bytes of n elements of t (n a multiple of the block size for block types).
uint64_t ggml_nbytes(GgmlType t, uint64_t n);

// One metadata value: a scalar, a string, or an array of one element type.
struct GgufValue {
  GgufType type = GgufType::U32;
  GgufType array_type = GgufType::U32;  // for ARRAY
  std::variant<uint64_t, int64_t, double, bool, std::string> scalar;  // by type family
  std::vector<GgufValue> array;

  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue u64(uint64_t v);
  static GgufValue f32(float v);
  static GgufValue boolean(bool v);
  static GgufValue str(std::string v);
  static GgufValue str_array(const std::vector<std::string>& v);
  static GgufValue i32_array(const std::vector<int32_t>& v);
  static GgufValue f32_array(const std::vector<float>& v);

  uint64_t as_u64() const;  // any integer type
  int64_t as_i64() const;
  double as_f64() const;    // any numeric type
  bool as_bool() const;
  const std::string& as_str() const;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] fastest
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;      // from the start of the data section
  uint64_t nbytes = 0;
};

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = 32) : alignment_(alignment) {}
  void set(const std::string& key, GgufValue v);  // keeps insertion order; a repeated key replaces
  // Declares a tensor; `fill` writes exactly its bytes into the buffer it is given, at write time.
  void add_tensor(const std::string& name, std::vector<int64_t> ne, GgmlType type,
                  std::function<void(std::vector<char>&)> fill);
  // Writes the file atomically (temporary sibling, then rename). Errors name the file.
  void write(const std::filesystem::path& path);

 private:
  uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  struct Pending {
    GgufTensorInfo info;
    std::function<void(std::vector<char>&)> fill;
  };
  std::vector<Pending> tensors_;
};

class GgufReader {
 public:
  // Parses and validates the header, metadata and tensor infos (offsets, alignment, sizes against
  // the file size). Errors name the file and what is wrong.
  explicit GgufReader(const std::filesystem::path& path);
  uint32_t version() const { return version_; }
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* tensor(const std::string& name) const;
  // The raw bytes of a tensor.
  std::vector<char> read(const GgufTensorInfo& t) const;

 private:
  std::filesystem::path path_;
  uint32_t version_ = 0;
  uint64_t data_start_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace calq::io
