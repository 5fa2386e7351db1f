// Atomic file and directory creation: a reader never sees a half-written file or output
// directory, and a failed run leaves nothing behind.
#pragma once

#include <filesystem>
#include <string_view>

#include "calq/io/cleanup.h"

namespace calq::io {

namespace fs = std::filesystem;

// Writes `content` to a temp file in p's directory, fsyncs it and renames it to p.
void write_file_atomic(const fs::path& p, std::string_view content);

// Builds an output directory under a temporary sibling name and renames it into place on commit().
class AtomicDir {
 public:
  // Errors if final_dir exists and !overwrite, or if its parent does not exist.
  AtomicDir(fs::path final_dir, bool overwrite);
  ~AtomicDir();  // removes the temp directory unless commit() succeeded
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  const fs::path& path() const { return tmp_; }
  const fs::path& final_path() const { return final_; }
  void commit();

 private:
  fs::path final_, tmp_;
  TempGuard guard_;  // removes tmp_ if calq is killed before commit()
  bool overwrite_ = false, committed_ = false;
};

}  // namespace calq::io
