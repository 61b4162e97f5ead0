// CUDA quantize_pack / dequantize. One warp per (row, group): warp-reduce the group's range,
// then each lane quantizes pairs of values into INT4 nibbles. Same scalar math as the CPU
// twin (quant_math.h), so results are bit-identical.
#include "cuda_utils.cuh"
#include "ops.h"
#include "pack_format.h"
#include "quant_math.h"

namespace bisup {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void quantize_pack_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, __half* __restrict__ scale,
                                     __half* __restrict__ zero, int64_t n_groups, int group, int bits, bool sym,
                                     float clip) {
  const int lane = threadIdx.x % 32;
  const int64_t rg = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  if (rg >= n_groups) return;
  const T* xg = x + rg * group;
  float lo = INFINITY, hi = -INFINITY;
  for (int i = lane; i < group; i += 32) {
    const float v = to_float(xg[i]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const float amax = fmaxf(fabsf(lo), fabsf(hi));
  const GroupParams gp = sym ? sym_group_params(amax, clip, bits) : asym_group_params(lo, hi, clip, bits);
  const float s = gp.scale, z = gp.zero;
  if (lane == 0) {
    scale[rg] = __float2half_rn(s);
    if (!sym) zero[rg] = __float2half_rn(z);
  }
  uint8_t* qg = q + packed_row_bytes(4, rg * group);
  for (int i = lane; i < group / 2; i += 32) {
    const float a = to_float(xg[2 * i]), c = to_float(xg[2 * i + 1]);
    const int qa = sym ? quantize_sym(a, s, bits) : quantize_asym(a, s, z, bits);
    const int qc = sym ? quantize_sym(c, s, bits) : quantize_asym(c, s, z, bits);
    qg[i] = pack_nibbles(static_cast<int8_t>(qa), static_cast<int8_t>(qc));
  }
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const __half* __restrict__ scale,
                                  const __half* __restrict__ zero, T* __restrict__ out, int64_t n_bytes, int group) {
  const int half_group = group / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_bytes; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rg = i / half_group;
    const float s = __half2float(scale[rg]);
    const float z = zero ? __half2float(zero[rg]) : 0.f;
    const uint8_t byte = q[i];
    out[2 * i] = static_cast<T>((float(nibble_value(byte & 0xF, zero == nullptr)) - z) * s);
    out[2 * i + 1] = static_cast<T>((float(nibble_value(byte >> 4, zero == nullptr)) - z) * s);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cuda(const at::Tensor& x, int64_t bits,
                                                                  int64_t group_size, bool sym, double clip_ratio) {
  BISUP_CHECK_CUDA(x);
  check_quantize_pack_args(x, bits, group_size, clip_ratio);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1);
  const int64_t group = effective_group(k, group_size);
  const auto sshape = with_last_dim(x, num_groups(k, group_size));
  auto q = at::empty(with_last_dim(x, packed_row_bytes(4, k)), x.options().dtype(at::kByte));
  auto scale = at::empty(sshape, x.options().dtype(at::kHalf));
  auto zero = sym ? at::empty({0}, x.options().dtype(at::kHalf)) : at::empty(sshape, x.options().dtype(at::kHalf));
  const int64_t n_groups = scale.numel();
  if (x.numel() == 0) return {q, scale, zero};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_pack_cuda", [&] {
    quantize_pack_kernel<scalar_t><<<ceil_div(n_groups, kWarpsPerBlock), kWarpsPerBlock * 32, 0,
                                     current_stream()>>>(
        x.data_ptr<scalar_t>(), q.data_ptr<uint8_t>(), reinterpret_cast<__half*>(scale.data_ptr<at::Half>()),
        sym ? nullptr : reinterpret_cast<__half*>(zero.data_ptr<at::Half>()), n_groups, static_cast<int>(group),
        static_cast<int>(bits), sym, static_cast<float>(clip_ratio));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale, zero};
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                           int64_t group_size, at::ScalarType out_dtype) {
  BISUP_CHECK_CUDA(q);
  check_dequantize_args(q, scale, zero, group_size);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t k = packed_row_values(4, q.size(-1));
  auto out = at::empty(with_last_dim(q, k), q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_cuda", [&] {
    dequantize_kernel<scalar_t><<<grid_for(q.numel(), 256), 256, 0, current_stream()>>>(
        q.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(scale.data_ptr<at::Half>()),
        zero.has_value() ? reinterpret_cast<const __half*>(zero->data_ptr<at::Half>()) : nullptr,
        out.data_ptr<scalar_t>(), q.numel(), static_cast<int>(effective_group(k, group_size)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace bisup
