// Scalar quantization math shared (host and device) by the CPU twins and the CUDA kernels, so
// both compute bit-identical results. Semantics: bisup/quant/quantizer.py (group_params and
// _finalize_scale), which bisup/reference.py's quantize_pack and kv_quantize call.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace bisup {

constexpr float kFp16Max = 65504.0f;

// Largest code of a b-bit symmetric (2^(b-1) - 1) or asymmetric (2^b - 1) format.
BISUP_HD constexpr int sym_qmax(int bits) { return (1 << (bits - 1)) - 1; }
BISUP_HD constexpr int asym_qmax(int bits) { return (1 << bits) - 1; }

// Code range [code_min, code_max] of b-bit data: two's complement if signed, else [0, 2^b - 1].
BISUP_HD constexpr int code_min(int bits, bool is_signed) { return is_signed ? -sym_qmax(bits) - 1 : 0; }
BISUP_HD constexpr int code_max(int bits, bool is_signed) { return is_signed ? sym_qmax(bits) : asym_qmax(bits); }

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

BISUP_HD float round_half_even(float v) {
#ifdef __CUDA_ARCH__
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
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

// The rule for every scale: compute in fp32, clamp into fp16 range, round to fp16;
// a scale that is zero there (zero group, or underflow) becomes 1, never 0 or NaN.
BISUP_HD float finalize_scale(float s) {
  s = fminf(s, kFp16Max);
  float h = round_to_fp16(s);
  return h > 0.0f ? h : 1.0f;
}

// Asymmetric zero point: z = round(-(clip * min) / s), NOT clamped to the code range (a group
// that lies entirely on one side of 0 still uses all 2^b codes), then rounded to fp16 as stored.
BISUP_HD float zero_point(float lo_clipped, float s) {
  const float z = clampf(round_half_even(-lo_clipped / s), -kFp16Max, kFp16Max);
  return z < 0.0f ? -round_to_fp16(-z) : round_to_fp16(z);
}

// Quantization parameters of one group: value = (code - zero) * scale.
struct GroupParams {
  float scale, zero;
};

// Symmetric: s = finalize_scale(clip * max|x| / (2^(b-1) - 1)), zero 0.
BISUP_HD GroupParams sym_group_params(float amax, float clip, int bits) {
  return {finalize_scale(mul_rn(clip, amax) / float(sym_qmax(bits))), 0.0f};
}

// Asymmetric: s = finalize_scale((clip * max - clip * min) / (2^b - 1)), z = zero_point(clip * min, s).
// Both ends are clipped first, each product rounded on its own as in the reference (mul_rn: nvcc
// would fuse one of them into the subtraction; clip * (max - min) would round differently).
BISUP_HD GroupParams asym_group_params(float lo, float hi, float clip, int bits) {
  const float lo_c = mul_rn(clip, lo), hi_c = mul_rn(clip, hi);
  const float s = finalize_scale((hi_c - lo_c) / float(asym_qmax(bits)));
  return {s, zero_point(lo_c, s)};
}

// Symmetric: q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1).
BISUP_HD int quantize_sym(float x, float s, int bits) {
  const float qmax = float(sym_qmax(bits));
  return int(clampf(round_half_even(x / s), -qmax - 1.0f, qmax));
}

// Asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1).
BISUP_HD int quantize_asym(float x, float s, float z, int bits) {
  return int(clampf(round_half_even(x / s) + z, 0.0f, float(asym_qmax(bits))));
}

}  // namespace bisup
