// Atomic files and directories: nothing half-written is ever visible, failures leave nothing.
#include "calq/io/atomic.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include "calq/core/error.h"
#include "calq/io/cleanup.h"
#include "support.h"

using namespace calq;
using calq_test::TempDir;
namespace fs = std::filesystem;

namespace {

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "wanted '" << (needle) << "' in: " << (haystack)

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(AtomicFile, WritesAndReplaces) {
  TempDir tmp;
  io::write_file_atomic(tmp / "a.txt", "hello");
  EXPECT_EQ(calq_test::read_file(tmp / "a.txt"), "hello");
  io::write_file_atomic(tmp / "a.txt", "");
  EXPECT_EQ(calq_test::read_file(tmp / "a.txt"), "");
  std::string big(3 << 20, 'x');
  io::write_file_atomic(tmp / "a.txt", big);
  EXPECT_EQ(calq_test::read_file(tmp / "a.txt"), big);
  EXPECT_EQ(entries(tmp.path()), std::vector<std::string>{"a.txt"});  // no temp file left
}

TEST(AtomicFile, ErrorsNameTheFile) {
  TempDir tmp;
  try {
    io::write_file_atomic(tmp / "missing-dir" / "f.json", "x");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "missing-dir/f.json");
    EXPECT_HAS(e.what(), "No such file or directory");
  }
  // A full disk (the temp file is a symlink to /dev/full): the error names the file and the
  // cause, the old content survives, and the temp name is cleaned up.
  if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "/dev/full is not writable here";
  calq_test::write_file(tmp / "f.json", "old");
  fs::create_symlink("/dev/full", tmp / "f.json.tmp");
  try {
    io::write_file_atomic(tmp / "f.json", "new content");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), (tmp / "f.json").string());
    EXPECT_HAS(e.what(), "No space left on device");
  }
  EXPECT_EQ(calq_test::read_file(tmp / "f.json"), "old");
  EXPECT_EQ(entries(tmp.path()), std::vector<std::string>{"f.json"});
}

TEST(AtomicDir, CommitAbortAndOverwrite) {
  TempDir tmp;
  const fs::path out = tmp / "out";
  {
    io::AtomicDir d(out, false);
    // A hidden sibling tagged with the pid.
    EXPECT_EQ(d.path(), tmp / (".out.calq-tmp-" + std::to_string(::getpid())));
    EXPECT_EQ(d.final_path(), out);
    EXPECT_TRUE(fs::is_directory(d.path()));
    io::write_file_atomic(d.path() / "a.txt", "hello");
    EXPECT_FALSE(fs::exists(out));
  }  // not committed: removed
  EXPECT_TRUE(entries(tmp.path()).empty());
  {
    io::AtomicDir d(out, false);
    io::write_file_atomic(d.path() / "a.txt", "hello");
    fs::create_directory(d.path() / "sub");
    d.commit();
    EXPECT_THROW(d.commit(), Error);
  }
  EXPECT_EQ(calq_test::read_file(out / "a.txt"), "hello");
  EXPECT_TRUE(fs::is_directory(out / "sub"));
  EXPECT_EQ(entries(tmp.path()), std::vector<std::string>{"out"});

  // An existing output needs --overwrite.
  try {
    io::AtomicDir d(out, false);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "output directory " + out.string() + " exists; pass --overwrite to replace it");
  }
  {
    io::AtomicDir d(out, true);
    io::write_file_atomic(d.path() / "b.txt", "new");
    EXPECT_TRUE(fs::exists(out / "a.txt"));  // the old output stays until commit
    d.commit();
  }
  EXPECT_EQ(entries(out), std::vector<std::string>{"b.txt"});
  EXPECT_EQ(entries(tmp.path()), std::vector<std::string>{"out"});  // the old tree is gone
  {
    io::AtomicDir d(out, true);
    io::write_file_atomic(d.path() / "c.txt", "abandoned");
  }  // overwrite requested but not committed: the old output is untouched
  EXPECT_EQ(entries(out), std::vector<std::string>{"b.txt"});
  EXPECT_EQ(entries(tmp.path()), std::vector<std::string>{"out"});

  // A trailing slash names the same directory.
  {
    io::AtomicDir d(tmp.path().string() + "/out2/", false);
    EXPECT_EQ(d.final_path(), tmp / "out2");
    d.commit();
  }
  EXPECT_TRUE(fs::is_directory(tmp / "out2"));
}

TEST(AtomicDir, Errors) {
  TempDir tmp;
  try {
    io::AtomicDir d(tmp / "no" / "such" / "parent", false);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "parent directory");
    EXPECT_HAS(e.what(), (tmp / "no" / "such").string());
  }
  // An existing file is never replaced, even with overwrite.
  calq_test::write_file(tmp / "file", "precious");
  EXPECT_THROW(io::AtomicDir(tmp / "file", false), Error);
  try {
    io::AtomicDir d(tmp / "file", true);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "is not a directory");
  }
  EXPECT_EQ(calq_test::read_file(tmp / "file"), "precious");
  // The output appearing while we work (another run) is not silently replaced.
  {
    io::AtomicDir d(tmp / "race", false);
    fs::create_directory(tmp / "race");
    try {
      d.commit();
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_HAS(e.what(), "appeared while calq was writing");
    }
  }
  EXPECT_TRUE(fs::is_empty(tmp / "race"));
  EXPECT_EQ(entries(tmp.path()), (std::vector<std::string>{"file", "race"}));
  EXPECT_THROW(io::AtomicDir("", false), Error);
}

}  // namespace

// Killed by a signal: registered temporary outputs are removed (with async-signal-safe calls
// only), the process still dies of the signal, and unrelated files survive.
namespace {

// Runs `body` in a child that has the handlers installed; returns the child's wait status.
template <class F>
int in_child(F body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    calq::io::install_signal_cleanup();
    body();
    ::_exit(0);  // not reached when body raises
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

}  // namespace

TEST(SignalCleanup, RemovesAnAtomicDirBeingWritten) {
  TempDir tmp;
  const fs::path out = tmp / "model-out";
  const int status = in_child([&] {
    io::AtomicDir d(out, false);
    fs::create_directories(d.path() / "a" / "b");
    calq_test::write_file(d.path() / "x.safetensors", std::string(1 << 16, 'w'));
    calq_test::write_file(d.path() / "a" / "b" / "deep.txt", "deep");
    fs::create_symlink("/etc/hostname", d.path() / "link");  // removed as a link, target untouched
    ::raise(SIGTERM);
  });
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGTERM);
  EXPECT_TRUE(entries(tmp.path()).empty()) << "left: " << (entries(tmp.path()).empty() ? "" : entries(tmp.path())[0]);
}

TEST(SignalCleanup, KeepsCommittedOutputsAndUnguardedFiles) {
  TempDir tmp;
  calq_test::write_file(tmp / "keep.txt", "mine");
  const int status = in_child([&] {
    {
      io::AtomicDir d(tmp / "done", false);
      calq_test::write_file(d.path() / "w", "1");
      d.commit();
    }
    io::AtomicDir pending(tmp / "pending", false);
    io::TempGuard file_guard(tmp / "partial.bin");
    calq_test::write_file(tmp / "partial.bin", "half");
    {
      io::TempGuard released(tmp / "keep.txt");
      released.release();
    }
    ::raise(SIGINT);
  });
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGINT);
  EXPECT_EQ(entries(tmp.path()), (std::vector<std::string>{"done", "keep.txt"}));
  EXPECT_EQ(calq_test::read_file(tmp / "done" / "w"), "1");
}

TEST(SignalCleanup, RemoveTreeHandlesManyEntriesAndMissingPaths) {
  TempDir tmp;
  const fs::path d = tmp / "big";
  fs::create_directories(d);
  for (int i = 0; i < 700; ++i)  // more entries than one getdents64 buffer holds
    calq_test::write_file(d / fmt::format("file_with_a_long_name_{:05d}.bin", i), "x");
  fs::create_directories(d / "sub" / "subsub");
  EXPECT_TRUE(io::remove_tree_signal_safe(d.c_str()));
  EXPECT_FALSE(fs::exists(d));
  EXPECT_TRUE(io::remove_tree_signal_safe((tmp / "never-existed").c_str()));
  calq_test::write_file(tmp / "f", "1");
  EXPECT_TRUE(io::remove_tree_signal_safe((tmp / "f").c_str()));
  EXPECT_TRUE(entries(tmp.path()).empty());
}
