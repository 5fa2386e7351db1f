// Reading compressed dataset files: gzip (.gz, multi-member) and single members of ZIP archives
// (stored or deflated), through zlib.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace calq::data {

// The decompressed contents of a gzip file. Errors (not gzip, truncated, corrupt) name the file.
std::string read_gzip(const std::filesystem::path& file);
// Reads a whole file; a .gz file is decompressed.
std::string read_maybe_gzip(const std::filesystem::path& file);

// Names of the regular-file members of a ZIP archive, in central-directory order.
std::vector<std::string> zip_members(const std::filesystem::path& archive);
// The contents of member `name`; its CRC-32 and size are checked. Errors name the archive.
std::string zip_extract(const std::filesystem::path& archive, const std::string& name);

}  // namespace calq::data
