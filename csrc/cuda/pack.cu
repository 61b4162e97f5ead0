// CUDA INT4 / INT3 packing kernels; same layout functions as the CPU twin (pack_format.h).
#include "cuda_utils.cuh"
#include "ops.h"
#include "pack_format.h"
#include "quant_math.h"

namespace bisup {
namespace {

// Flags any value outside [lo, hi] so the host can raise a clear error after the launch.
__global__ void pack_int4_kernel(const int8_t* __restrict__ q, uint8_t* __restrict__ out, int64_t n_out,
                                 int lo, int hi, int* __restrict__ bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_out; i += int64_t(gridDim.x) * blockDim.x) {
    const int8_t a = q[2 * i], b = q[2 * i + 1];
    if (a < lo || a > hi || b < lo || b > hi) *bad = 1;
    out[i] = pack_nibbles(a, b);
  }
}

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ packed, int8_t* __restrict__ out, int64_t n_in,
                                   bool is_signed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_in; i += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t v = packed[i];
    out[2 * i] = nibble_value(v & 0xF, is_signed);
    out[2 * i + 1] = nibble_value(v >> 4, is_signed);
  }
}

__global__ void pack_int3_kernel(const int8_t* __restrict__ q, uint32_t* __restrict__ out, int64_t blocks, int lo,
                                 int hi, int* __restrict__ bad) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks; b += int64_t(gridDim.x) * blockDim.x) {
    int8_t v[kInt3BlockValues];
    for (int i = 0; i < kInt3BlockValues; ++i) {
      v[i] = q[b * kInt3BlockValues + i];
      if (v[i] < lo || v[i] > hi) *bad = 1;
    }
    pack_int3_block(v, out + b * kInt3BlockWords);
  }
}

__global__ void unpack_int3_kernel(const uint32_t* __restrict__ packed, int8_t* __restrict__ out, int64_t n_out,
                                   bool is_signed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_out; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = int3_value(packed + (i / kInt3BlockValues) * kInt3BlockWords, int(i % kInt3BlockValues), is_signed);
  }
}

void raise_if_bad(const at::Tensor& bad, int bits, bool is_signed, const char* op) {
  TORCH_CHECK(bad.item<int>() == 0, "bisup: ", op, " expects ", is_signed ? "signed" : "unsigned", " ", bits,
              "-bit values in [", code_min(bits, is_signed), ", ", code_max(bits, is_signed),
              "], got values outside that range");
}

constexpr int kThreads = 256;

}  // namespace

at::Tensor pack_int4_cuda(const at::Tensor& q, bool is_signed) {
  BISUP_CHECK_CUDA(q);
  const int64_t kp = check_pack_int4_args(q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(with_last_dim(q, kp), q.options().dtype(at::kByte));
  auto bad = at::zeros({1}, q.options().dtype(at::kInt));
  if (out.numel() > 0) {
    pack_int4_kernel<<<grid_for(out.numel(), kThreads), kThreads, 0, current_stream()>>>(
        q.data_ptr<int8_t>(), out.data_ptr<uint8_t>(), out.numel(), code_min(4, is_signed), code_max(4, is_signed),
        bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  raise_if_bad(bad, 4, is_signed, "pack_int4");
  return out;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed, bool is_signed) {
  BISUP_CHECK_CUDA(packed);
  const int64_t k = check_unpack_int4_args(packed);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(with_last_dim(packed, k), packed.options().dtype(at::kChar));
  if (packed.numel() > 0) {
    unpack_int4_kernel<<<grid_for(packed.numel(), kThreads), kThreads, 0, current_stream()>>>(
        packed.data_ptr<uint8_t>(), out.data_ptr<int8_t>(), packed.numel(), is_signed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor pack_int3_cuda(const at::Tensor& q, bool is_signed) {
  BISUP_CHECK_CUDA(q);
  const int64_t kp = check_pack_int3_args(q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(with_last_dim(q, kp), q.options().dtype(at::kByte));
  auto bad = at::zeros({1}, q.options().dtype(at::kInt));
  const int64_t blocks = q.numel() / kInt3BlockValues;
  if (blocks > 0) {
    pack_int3_kernel<<<grid_for(blocks, kThreads), kThreads, 0, current_stream()>>>(
        q.data_ptr<int8_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>()), blocks, code_min(3, is_signed),
        code_max(3, is_signed), bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  raise_if_bad(bad, 3, is_signed, "pack_int3");
  return out;
}

at::Tensor unpack_int3_cuda(const at::Tensor& packed, bool is_signed) {
  BISUP_CHECK_CUDA(packed);
  const int64_t k = check_unpack_int3_args(packed);
  // The kernel reads whole 32-bit words; rows are 12-byte multiples, so only the start can be off.
  check_aligned(packed, 4, "unpack_int3", "packed", "32-bit word reads");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(with_last_dim(packed, k), packed.options().dtype(at::kChar));
  if (out.numel() > 0) {
    unpack_int3_kernel<<<grid_for(out.numel(), kThreads), kThreads, 0, current_stream()>>>(
        reinterpret_cast<const uint32_t*>(packed.data_ptr<uint8_t>()), out.data_ptr<int8_t>(), out.numel(),
        is_signed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace bisup
