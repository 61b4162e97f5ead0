// CUDA `hadamard` op: y = x @ (S_p / sqrt(p) (x) B)^T along the last dim (see the CPU twin,
// csrc/cpu/hadamard.cpp, and bisup/reference.py). One block per row; the row lives in shared
// memory as fp32 (n <= kMaxN). Step 1 (m > 1): each thread computes its outputs of the dense
// base multiply into registers, reading the base transposed (B^T, coalesced across threads) from
// global/L2; step 2: log2(p) butterfly stages in shared memory; step 3: scale and store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_utils.cuh"
#include "hadamard_plan.h"
#include "ops.h"

namespace bisup {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxPerThread = 32;  // outputs of the base multiply held in registers per thread
constexpr int64_t kMaxN = int64_t(kMaxThreads) * kMaxPerThread;  // 32768 fp32 = 128 KiB smem

template <typename T>
__global__ void hadamard_kernel(const T* __restrict__ x, const float* __restrict__ base_t, T* __restrict__ y,
                                int n, int m, float scale) {
  extern __shared__ float row[];
  const int64_t offset = int64_t(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = static_cast<float>(x[offset + i]);
  __syncthreads();

  if (m > 1) {
    float acc[kMaxPerThread];
#pragma unroll
    for (int s = 0; s < kMaxPerThread; ++s) {
      const int o = threadIdx.x + s * blockDim.x;
      acc[s] = 0.f;
      if (o < n) {
        const int a = o / m, b = o % m;
        const float* chunk = row + a * m;
        float v = 0.f;
        for (int j = 0; j < m; ++j) v = fmaf(base_t[j * m + b], chunk[j], v);  // B[b, j] = B^T[j, b]
        acc[s] = v;
      }
    }
    __syncthreads();  // everyone has read the whole row before it is overwritten
#pragma unroll
    for (int s = 0; s < kMaxPerThread; ++s) {
      const int o = threadIdx.x + s * blockDim.x;
      if (o < n) row[o] = acc[s];
    }
    __syncthreads();
  }

  const int p = n / m;
  for (int h = 1; h < p; h <<= 1) {
    for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
      const int i0 = static_cast<int>(butterfly_index(t, h, m)), i1 = i0 + h * m;
      const float u = row[i0], v = row[i1];
      row[i0] = u + v;
      row[i1] = u - v;
    }
    __syncthreads();
  }

  for (int i = threadIdx.x; i < n; i += blockDim.x) y[offset + i] = static_cast<T>(row[i] * scale);
}

}  // namespace

at::Tensor hadamard_cuda(const at::Tensor& x, const std::optional<at::Tensor>& base) {
  BISUP_CHECK_CUDA(x);
  const int64_t m = check_hadamard_args(x, base);
  const int64_t n = x.size(-1);
  TORCH_CHECK(n <= kMaxN, "bisup: the CUDA hadamard kernel supports a last dim up to ", kMaxN, ", got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t rows = x.numel() / n;
  TORCH_CHECK(rows <= 0x7fffffffLL, "bisup: hadamard supports at most 2^31-1 rows, got ", rows);
  // B^T, so that threads with consecutive b read consecutive addresses.
  at::Tensor base_t = base.has_value() ? base->t().contiguous() : at::Tensor();
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, ceil_div(n / 2 + 1, 32) * 32)));
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  const float scale = 1.0f / std::sqrt(static_cast<float>(n / m));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_cuda", [&] {
    auto kernel = hadamard_kernel<scalar_t>;
    if (smem > kSmemNoOptIn) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(rows), threads, smem, current_stream()>>>(
        x.data_ptr<scalar_t>(), base_t.defined() ? base_t.data_ptr<float>() : nullptr, y.data_ptr<scalar_t>(),
        static_cast<int>(n), static_cast<int>(m), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace bisup
