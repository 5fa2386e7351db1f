// cuBLAS and cuSOLVER, opened with dlopen the first time the CUDA backend needs them.
//
// Linking them instead costs every calq process about 0.4 s and 210 MB of resident memory at
// start (the dynamic load of libcublasLt, which libcublas and libcusolver pull in), `calq --help`
// and every CPU-only command included. The CUDA runtime stays linked statically.
#pragma once

#include <cublas_v2.h>
#include <cusolverDn.h>

namespace calq::backend::cuda {

// The functions calq calls, by their exported names (cublas_v2.h maps cublasCreate and friends to
// the *_v2 symbols).
#define CALQ_CUBLAS_FUNCTIONS(X)                                                                        \
  X(cublasCreate_v2) X(cublasDestroy_v2) X(cublasSetStream_v2) X(cublasSetMathMode) X(cublasSetAtomicsMode) \
  X(cublasSgemm_v2) X(cublasDgemm_v2) X(cublasSsyrk_v2)
// C++ overloads these two (inline ones taking a cudaDataType compute type); calq calls the library's
// functions, which take a cublasComputeType_t.
#define CALQ_CUBLAS_OVERLOADED(X) X(cublasGemmEx, GemmEx) X(cublasGemmBatchedEx, GemmBatchedEx)
using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                  const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                                  cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
using GemmBatchedEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                         const void*, const void* const[], cudaDataType, int, const void* const[],
                                         cudaDataType, int, const void*, void* const[], cudaDataType, int, int,
                                         cublasComputeType_t, cublasGemmAlgo_t);
#define CALQ_CUSOLVER_FUNCTIONS(X)                                                                       \
  X(cusolverDnCreate) X(cusolverDnDestroy) X(cusolverDnSetStream) X(cusolverDnDpotrf_bufferSize)       \
  X(cusolverDnDpotrf) X(cusolverDnXtrtri_bufferSize) X(cusolverDnXtrtri)

struct Libs {
#define CALQ_LIBS_MEMBER(f) decltype(&::f) f = nullptr;
#define CALQ_LIBS_TYPED_MEMBER(f, T) T f = nullptr;
  CALQ_CUBLAS_FUNCTIONS(CALQ_LIBS_MEMBER)
  CALQ_CUBLAS_OVERLOADED(CALQ_LIBS_TYPED_MEMBER)
  CALQ_CUSOLVER_FUNCTIONS(CALQ_LIBS_MEMBER)
#undef CALQ_LIBS_MEMBER
#undef CALQ_LIBS_TYPED_MEMBER
};

// Loads both libraries once (thread-safe) and returns their entry points. Throws calq::Error naming
// the library, where it was looked for and the loader's message when one is missing or lacks a
// function; the CPU backend never calls this.
const Libs& libs();

// dlopen of one library by soname, then in the toolkit's library folder of the build; throws the
// message above when both fail. libs() uses it; exposed for the test of that message.
void* open_cuda_library(const char* what, const char* soname);

// The file names tried, for messages and tests: the soname (found through LD_LIBRARY_PATH and the
// system's library paths), then the same name in the toolkit's library folder of the build.
const char* cublas_soname();
const char* cusolver_soname();

}  // namespace calq::backend::cuda
