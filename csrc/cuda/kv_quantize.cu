// CUDA kv_quantize / kv_dequantize. Two small kernels quantize: one thread per (row, group)
// computes the group's fp16 scale and zero point, then one thread per packing unit (8 values,
// or a 32-value INT3 block) writes the codes with the stored scale / zero -- the CPU twin's
// order of operations, so the bytes match exactly.
#include "cuda_utils.cuh"
#include "kv_format.h"
#include "ops.h"

namespace bisup {
namespace {

template <typename T>
__global__ void kv_group_params_kernel(const T* __restrict__ x, __half* __restrict__ scale, __half* __restrict__ zero,
                                       int64_t n_groups, int group, int bits) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n_groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const T* xg = x + g * group;  // groups are consecutive along the row
    float lo = to_float(xg[0]), hi = lo;
    for (int i = 1; i < group; ++i) {
      const float v = to_float(xg[i]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    const GroupParams gp = kv_group_params(lo, hi, bits);
    scale[g] = __float2half_rn(gp.scale);
    zero[g] = __float2half_rn(gp.zero);
  }
}

template <typename T>
__global__ void kv_codes_kernel(const T* __restrict__ x, const __half* __restrict__ scale,
                                const __half* __restrict__ zero, uint8_t* __restrict__ q, int64_t n_units, int d,
                                int group, int bits) {
  const int unit = kv_unit_values(bits), units_per_row = d / unit;
  const int64_t unit_bytes = packed_row_bytes(bits, unit), row_bytes = packed_row_bytes(bits, d);
  const int groups = d / group;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < n_units; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = u / units_per_row;
    const int k0 = int(u % units_per_row) * unit;
    uint8_t codes[kInt3BlockValues];  // the largest unit
    for (int i = 0; i < unit; ++i) {
      const int64_t g = row * groups + (k0 + i) / group;
      codes[i] = static_cast<uint8_t>(
          quantize_asym(to_float(x[row * d + k0 + i]), __half2float(scale[g]), __half2float(zero[g]), bits));
    }
    kv_pack_unit(codes, q + row * row_bytes + int64_t(k0 / unit) * unit_bytes, bits);
  }
}

template <typename T>
__global__ void kv_dequantize_kernel(const uint8_t* __restrict__ q, const __half* __restrict__ scale,
                                     const __half* __restrict__ zero, T* __restrict__ out, int64_t n, int d,
                                     int group, int bits) {
  const int64_t row_bytes = packed_row_bytes(bits, d);
  const int groups = d / group;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / d;
    const int k = int(i % d);
    const int64_t g = row * groups + k / group;
    const float v = (float(kv_code(q + row * row_bytes, k, bits)) - __half2float(zero[g])) * __half2float(scale[g]);
    out[i] = static_cast<T>(v);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size) {
  BISUP_CHECK_CUDA(x);
  check_kv_quantize_args(x, bits, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1), group = effective_group(d, group_size);
  const auto sshape = with_last_dim(x, num_groups(d, group_size));
  auto q = at::empty(with_last_dim(x, packed_row_bytes(static_cast<int>(bits), d)), x.options().dtype(at::kByte));
  auto scale = at::empty(sshape, x.options().dtype(at::kHalf));
  auto zero = at::empty(sshape, x.options().dtype(at::kHalf));
  if (x.numel() == 0) return {q, scale, zero};
  const int64_t n_groups = scale.numel(), n_units = x.numel() / kv_unit_values(static_cast<int>(bits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kv_quantize_cuda", [&] {
    auto* s = reinterpret_cast<__half*>(scale.data_ptr<at::Half>());
    auto* z = reinterpret_cast<__half*>(zero.data_ptr<at::Half>());
    kv_group_params_kernel<scalar_t><<<grid_for(n_groups, 256), 256, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), s, z, n_groups, static_cast<int>(group), static_cast<int>(bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kv_codes_kernel<scalar_t><<<grid_for(n_units, 256), 256, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), s, z, q.data_ptr<uint8_t>(), n_units, static_cast<int>(d), static_cast<int>(group),
        static_cast<int>(bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scale, zero};
}

at::Tensor kv_dequantize_cuda(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                              int64_t group_size, at::ScalarType out_dtype) {
  BISUP_CHECK_CUDA(q);
  const int64_t d = check_kv_dequantize_args(q, scale, zero, bits, group_size, out_dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(with_last_dim(q, d), q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "kv_dequantize_cuda", [&] {
    kv_dequantize_kernel<scalar_t><<<grid_for(out.numel(), 256), 256, 0, current_stream()>>>(
        q.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(scale.data_ptr<at::Half>()),
        reinterpret_cast<const __half*>(zero.data_ptr<at::Half>()), out.data_ptr<scalar_t>(), out.numel(),
        static_cast<int>(d), static_cast<int>(effective_group(d, group_size)), static_cast<int>(bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace bisup
