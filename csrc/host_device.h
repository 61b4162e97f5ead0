// BISUP_HD marks the small inline functions that the CPU twins and the CUDA kernels share, so
// both run the same code: __host__ __device__ under nvcc, plain inline in C++ builds.
#pragma once

#ifdef __CUDACC__
#define BISUP_HD __host__ __device__ __forceinline__
#else
#define BISUP_HD inline
#endif
