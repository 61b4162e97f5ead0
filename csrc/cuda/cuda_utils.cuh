// Small helpers shared by the CUDA files.
#pragma once
// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit (like CI's) may not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"

#define BISUP_CHECK_CUDA(t) \
  TORCH_CHECK((t).is_cuda(), "bisup: ", #t, " must be a CUDA tensor, got device ", (t).device())

namespace bisup {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n items.
inline unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(n, threads), 1), 65535LL * 8));
}

}  // namespace bisup
