// Small helpers shared by the CUDA files: launch limits and sizes, CUDA-only argument checks,
// dtype conversion and warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit (like CI's) may not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "checks.h"

#define BISUP_CHECK_CUDA(t) \
  TORCH_CHECK((t).is_cuda(), "bisup: ", #t, " must be a CUDA tensor, got device ", (t).device())

namespace bisup {

constexpr int64_t kMaxGridYZ = 65535;   // gridDim.y / gridDim.z limit (gridDim.x: 2^31 - 1)
constexpr int kSmemNoOptIn = 48 * 1024;  // dynamic shared memory a kernel gets without opting in

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n items.
inline unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(n, threads), 1), 65535LL * 8));
}

// Kernels that use vector loads or cp.async need their base pointers aligned; a view may not be.
inline void check_aligned(const at::Tensor& t, int bytes, const char* op, const char* name, const char* why) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, "bisup: ", op, " on CUDA needs ", name,
              " to start at a ", bytes, "-byte aligned address (", why, "), got a view at byte offset ",
              t.storage_offset() * int64_t(t.element_size()), "; pass a fresh tensor (e.g. .clone())");
}

// Activation dtypes (float, at::Half, at::BFloat16) -> fp32.
template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<at::Half>(at::Half v) { return __half2float(static_cast<__half>(v)); }
template <>
__device__ __forceinline__ float to_float<at::BFloat16>(at::BFloat16 v) {
  return __bfloat162float(static_cast<__nv_bfloat16>(v));
}

// Xor-butterfly reductions over a full warp; every lane gets the result. The sum's order is fixed
// (offsets 16, 8, 4, 2, 1), so it rounds the same on every run.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace bisup
