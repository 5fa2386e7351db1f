// Atomic files and directories: nothing half-written is ever visible, failures leave nothing.
#include <gtest/gtest.h>

#include "calq/core/error.h"
#include "calq/io/atomic.h"
#include "support.h"

using namespace calq;
using calq_test::TempDir;
namespace fs = std::filesystem;

namespace {

TEST(Atomic, DirectoryCommitAndAbort) {
  TempDir tmp;
  fs::path out = tmp / "out";
  {
    io::AtomicDir d(out, false);
    io::write_file_atomic(d.path() / "a.txt", "hello");
    EXPECT_FALSE(fs::exists(out));
  }  // not committed: removed
  EXPECT_FALSE(fs::exists(out));
  for (const auto& e : fs::directory_iterator(tmp.path())) ADD_FAILURE() << "left behind: " << e.path();
  {
    io::AtomicDir d(out, false);
    io::write_file_atomic(d.path() / "a.txt", "hello");
    d.commit();
  }
  EXPECT_EQ(calq_test::read_file(out / "a.txt"), "hello");
  try {
    io::AtomicDir d(out, false);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--overwrite"), std::string::npos);
  }
  {
    io::AtomicDir d(out, true);
    io::write_file_atomic(d.path() / "b.txt", "new");
    EXPECT_TRUE(fs::exists(out / "a.txt"));  // the old output stays until commit
    d.commit();
  }
  EXPECT_FALSE(fs::exists(out / "a.txt"));
  EXPECT_EQ(calq_test::read_file(out / "b.txt"), "new");
  EXPECT_THROW(io::AtomicDir(tmp / "no" / "such" / "parent", false), Error);
  EXPECT_THROW(io::write_file_atomic(tmp / "missing-dir" / "f", "x"), Error);
}

}  // namespace
