#include "calq/backend/cuda/libs.h"

#include <dlfcn.h>

#include <string>

#include "calq/core/error.h"

#ifndef CALQ_CUBLAS_SONAME
#error "CALQ_CUBLAS_SONAME is set by CMakeLists.txt from the toolkit's libcublas"
#endif

namespace calq::backend::cuda {

const char* cublas_soname() { return CALQ_CUBLAS_SONAME; }
const char* cusolver_soname() { return CALQ_CUSOLVER_SONAME; }

void* open_cuda_library(const char* what, const char* soname) {
  // RTLD_LOCAL: nothing else in the process resolves against them; RTLD_NOW: a broken install
  // fails here, with its message, not at the first call.
  if (void* h = dlopen(soname, RTLD_NOW | RTLD_LOCAL)) return h;
  std::string first = dlerror();
  std::string in_toolkit = std::string(CALQ_CUDA_LIBRARY_DIR) + "/" + soname;
  if (void* h = dlopen(in_toolkit.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
  fail("the CUDA backend needs {} ({}), which could not be loaded: {}; it was looked for on LD_LIBRARY_PATH, "
       "in the system's library paths and in {}. Install the CUDA toolkit's libraries (or put their folder on "
       "LD_LIBRARY_PATH), or run with --device cpu",
       what, soname, first, CALQ_CUDA_LIBRARY_DIR);
}

namespace {

template <typename F>
void resolve(void* handle, const char* library, const char* name, F& out) {
  dlerror();
  void* p = dlsym(handle, name);
  if (!p) fail("{} has no function {}: the CUDA libraries found do not match the toolkit calq was built with ({})",
               library, name, CALQ_CUDA_TOOLKIT_VERSION);
  out = reinterpret_cast<F>(p);
}

Libs load() {
  Libs l;
  void* blas = open_cuda_library("cuBLAS", CALQ_CUBLAS_SONAME);
  void* solver = open_cuda_library("cuSOLVER", CALQ_CUSOLVER_SONAME);
  // Never closed: the handles live as long as the process, like a linked library's.
#define CALQ_RESOLVE_BLAS(f) resolve(blas, CALQ_CUBLAS_SONAME, #f, l.f);
#define CALQ_RESOLVE_SOLVER(f) resolve(solver, CALQ_CUSOLVER_SONAME, #f, l.f);
#define CALQ_RESOLVE_OVERLOADED(f, T)                                                            \
  [[maybe_unused]] T f##_declared = &::f; /* picks the header's overload of this type */        \
  resolve(blas, CALQ_CUBLAS_SONAME, #f, l.f);
  CALQ_CUBLAS_FUNCTIONS(CALQ_RESOLVE_BLAS)
  CALQ_CUBLAS_OVERLOADED(CALQ_RESOLVE_OVERLOADED)
  CALQ_CUSOLVER_FUNCTIONS(CALQ_RESOLVE_SOLVER)
#undef CALQ_RESOLVE_OVERLOADED
#undef CALQ_RESOLVE_BLAS
#undef CALQ_RESOLVE_SOLVER
  return l;
}

}  // namespace

const Libs& libs() {
  static const Libs l = load();  // a throw leaves it unset; the next call tries again
  return l;
}

}  // namespace calq::backend::cuda
