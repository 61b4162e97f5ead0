// Scalar quantization math shared (host and device) by the CPU twins and the CUDA kernels, so
// both compute bit-identical results. Semantics: bisup/reference.py (compute_scale_*).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define BISUP_HD __host__ __device__ __forceinline__
#else
#define BISUP_HD inline
#endif

namespace bisup {

constexpr float kFp16Max = 65504.0f;

BISUP_HD float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

// a * b rounded on its own, so that a following add or subtract can never be contracted into an
// FMA (nvcc/ptxas fuse plain a * b + c by default; the CPU twins and the reference do not).
BISUP_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// fp32 -> nearest fp16 value, returned as fp32 (round to nearest even, like a.to(float16)).
BISUP_HD float round_to_fp16(float v);

// The rule for every scale: compute in fp32, clamp into fp16 range, round to fp16;
// a scale that is zero there (zero group, or underflow) becomes 1, never 0 or NaN.
BISUP_HD float finalize_scale(float s) {
  s = fminf(s, kFp16Max);
  float h = round_to_fp16(s);
  return h > 0.0f ? h : 1.0f;
}

BISUP_HD float round_half_even(float v);

// Asymmetric zero point: z = round(-(clip * min) / s), NOT clamped to the code range (a group
// that lies entirely on one side of 0 still uses all 2^b codes), then rounded to fp16 as stored.
BISUP_HD float zero_point(float lo_clipped, float s) {
  const float z = clampf(round_half_even(-lo_clipped / s), -kFp16Max, kFp16Max);
  return z < 0.0f ? -round_to_fp16(-z) : round_to_fp16(z);
}

BISUP_HD float round_half_even(float v) {
#ifdef __CUDA_ARCH__
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

// Symmetric: q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1).
BISUP_HD int quantize_sym(float x, float s, int bits) {
  const float qmax = float((1 << (bits - 1)) - 1);
  return int(clampf(round_half_even(x / s), -qmax - 1.0f, qmax));
}

// Asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1).
BISUP_HD int quantize_asym(float x, float s, float z, int bits) {
  const float qmax = float((1 << bits) - 1);
  return int(clampf(round_half_even(x / s) + z, 0.0f, qmax));
}

// Software fp32 -> fp16 -> fp32 rounding (RNE), valid for finite non-negative inputs <= 65504;
// written out so host and device agree without depending on a half type.
BISUP_HD float round_to_fp16(float v) {
  if (!(v > 0.0f)) return 0.0f;
  // fp16 subnormal spacing is 2^-24; normal numbers keep 11 significant bits.
  int e;
  (void)frexpf(v, &e);  // v = m * 2^e with m in [0.5, 1)
  int shift = e < -13 ? -24 : e - 11;  // exponent of the fp16 ulp at v
  float ulp = ldexpf(1.0f, shift);
  return round_half_even(v / ulp) * ulp;
}

}  // namespace bisup
