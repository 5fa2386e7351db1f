// cuBLAS and cuSOLVER are opened on first use, not at process start (label "gpu", built with the
// CUDA backend; needs the toolkit's libraries but no GPU, so it also runs where none is visible).
#include <gtest/gtest.h>

#include <dlfcn.h>

#include <fstream>
#include <sstream>
#include <string>

#include "calq/backend/cuda/libs.h"
#include "calq/core/error.h"

namespace {

using namespace calq::backend::cuda;

bool mapped(const std::string& name) {
  std::ifstream f("/proc/self/maps");
  std::stringstream s;
  s << f.rdbuf();
  return s.str().find(name) != std::string::npos;
}

// Each ctest case is its own process, so nothing has touched the backend before this one.
TEST(CudaLibs, NotLoadedUntilTheBackendAsks) {
  EXPECT_FALSE(mapped("libcublasLt")) << "linking cuBLAS costs every calq process ~0.4 s at start";
  EXPECT_FALSE(mapped("libcusolver"));
  const Libs& l = libs();
  EXPECT_TRUE(mapped(cublas_soname()));
  EXPECT_TRUE(mapped(cusolver_soname()));
#define CALQ_EXPECT_SET(f) EXPECT_NE(reinterpret_cast<const void*>(l.f), nullptr) << #f;
#define CALQ_EXPECT_SET_TYPED(f, T) CALQ_EXPECT_SET(f)
  CALQ_CUBLAS_FUNCTIONS(CALQ_EXPECT_SET)
  CALQ_CUBLAS_OVERLOADED(CALQ_EXPECT_SET_TYPED)
  CALQ_CUSOLVER_FUNCTIONS(CALQ_EXPECT_SET)
#undef CALQ_EXPECT_SET_TYPED
#undef CALQ_EXPECT_SET
  EXPECT_EQ(&libs(), &l) << "loaded once";
}

TEST(CudaLibs, ResolvedFunctionsWork) {
  // Every call needs a GPU, so this checks the pointers are the library's own exports: the same
  // as a fresh dlsym (a second dlopen returns the same handle).
  const Libs& l = libs();
  void* h = open_cuda_library("cuBLAS", cublas_soname());
  EXPECT_EQ(reinterpret_cast<void*>(l.cublasGemmEx), dlsym(h, "cublasGemmEx"));
  EXPECT_EQ(reinterpret_cast<void*>(l.cublasCreate_v2), dlsym(h, "cublasCreate_v2"));
}

TEST(CudaLibs, MissingLibraryIsAClearError) {
  try {
    open_cuda_library("cuBLAS", "libcublas.so.999");
    FAIL() << "no error for a library that does not exist";
  } catch (const calq::Error& e) {
    std::string m = e.what();
    for (const char* part : {"cuBLAS", "libcublas.so.999", "LD_LIBRARY_PATH", "--device cpu"})
      EXPECT_NE(m.find(part), std::string::npos) << "missing '" << part << "' in: " << m;
  }
}

}  // namespace
