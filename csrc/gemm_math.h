// GEMM math shared (host and device) by the CPU twin (csrc/cpu/gemm.cpp) and the CUDA kernels
// (csrc/cuda/gemm*.cu*), so both produce bit-identical results. Semantics: bisup/reference.py::gemm.
//
// Per output element the fp32 accumulator is updated once per K-group, in group order:
//     acc = acc + float(dot_g) * (sa[m, g] * sw[n, g])
// then once for the INT8 outlier segment (acc + float(dot_o) * (sao[m] * swo[n])), then bias.
// dot_g is an exact int32 group dot; sa * sw (two fp16 values) is exact in fp32; the multiply and
// the add each round once (never fused into an FMA), the same on every device.
#pragma once
#include <cstdint>

#include "quant_math.h"

namespace bisup {

// Largest group (in K elements) whose int32 dot cannot overflow on any path: the GPU's INT8
// unpack path accumulates 256 * dot (INT4 x INT4) or 512 * dot (INT4 x INT3), |values| <= 64 * g.
constexpr int64_t kGemmMaxGroup = 65536;
// K granularity of every path: one INT3 block, one s8 mma k-step, one 16-byte INT4 chunk.
constexpr int64_t kGemmKMultiple = 32;
// Outlier segment length granularity (16-byte INT8 chunks).
constexpr int64_t kGemmOutlierMultiple = 16;

// acc + dot * scale with two roundings (explicitly unfused on the device).
BISUP_HD float gemm_accumulate(float acc, float dot, float scale) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(acc, __fmul_rn(dot, scale));
#else
  // Host: built with -ffp-contract=off (setup.py, CMakeLists.txt), so this stays two roundings
  // even where the target has FMA (aarch64, -march=native).
  const float prod = dot * scale;
  return acc + prod;
#endif
}

BISUP_HD float gemm_scale_product(float sa, float sw) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(sa, sw);
#else
  return sa * sw;
#endif
}

}  // namespace bisup
