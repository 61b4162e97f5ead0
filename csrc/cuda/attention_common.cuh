// Device helpers of the attention kernels (attention_decode.cuh): vectorised 8-value loads of
// prompt rows (float, at::Half, at::BFloat16) and of quantized KV rows, all returning fp32.
#pragma once
#include "cuda_utils.cuh"
#include "kv_format.h"

namespace bisup {
namespace kv {

// 8 consecutive activations (16-byte aligned for 2-byte types, 32-byte for float) -> fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&out)[8]);

template <>
__device__ __forceinline__ void load8<float>(const float* src, float (&out)[8]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

template <>
__device__ __forceinline__ void load8<at::Half>(const at::Half* src, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void load8<at::BFloat16>(const at::BFloat16* src, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Values d0..d0+7 (d0 a multiple of 8, so one group) of a packed KV row, dequantized as
// (code - z) * s in fp32 -- the CPU twin's arithmetic.
template <int BITS>
__device__ __forceinline__ void dequant8(const uint8_t* row, int d0, float s, float z, float (&out)[8]) {
  if constexpr (BITS == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row + d0);  // row bytes = D: 8-byte aligned
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[i] = (float((raw.x >> (8 * i)) & 0xFF) - z) * s;
      out[4 + i] = (float((raw.y >> (8 * i)) & 0xFF) - z) * s;
    }
  } else if constexpr (BITS == 4) {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(row + d0 / 2);  // row bytes = D/2
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (float((raw >> (4 * i)) & 0xF) - z) * s;
  } else {
    static_assert(BITS == 3, "KV rows are 3, 4 or 8 bits");
    // Values d0..d0+7 are quads q, q+1 of one INT3 block and share its low word; byte reads
    // (int3_word on bytes) keep any alignment valid.
    const uint8_t* blk = row + (d0 / kInt3BlockValues) * kInt3BlockBytes;
    const int q = (d0 % kInt3BlockValues) / 4;
    const uint32_t low_word = int3_word(blk, q >> 2), high_word = int3_word(blk, 2);
    const uint32_t c0 = int3_quad(low_word, high_word, q), c1 = int3_quad(low_word, high_word, q + 1);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[i] = (float((c0 >> (8 * i)) & 0xFF) - z) * s;
      out[4 + i] = (float((c1 >> (8 * i)) & 0xFF) - z) * s;
    }
  }
}

}  // namespace kv
}  // namespace bisup
