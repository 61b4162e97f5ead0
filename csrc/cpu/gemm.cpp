// CPU twin of the W4A4 / W3A3 group-scaled GEMM (bisup/reference.py::gemm), bit-identical to the
// CUDA kernels (csrc/gemm_math.h fixes the fp32 accumulation order).
//
// The weight stays packed: csrc/cpu/gemm_isa.inc (one micro-kernel, compiled once per ISA below)
// expands each tile's nibbles / INT3 words to bytes in registers, one K-chunk at a time. Only A
// (small at small M) is unpacked per call, to int8 in the decoder's value order, with its
// per-group sums and fp32 scales. Tasks of kTaskRows x kLanes outputs run in parallel (over N
// tiles at small M, M blocks x N tiles at large M); the INT8 outlier segment and the bias come
// last, in portable code shared by every path.
//
// Paths (runtime dispatch, one build): avx512vnni (16 lanes, vpdpbusd zmm), avxvnni (8 lanes,
// VEX vpdpbusd), avx2 (8 lanes, vpmaddubsw + vpmaddwd), scalar (portable C++). The best one the
// CPU has runs unless BISUP_CPU_GEMM_ISA names another (read on every call).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define BISUP_GEMM_X86 1
#endif

#include "checks.h"
#include "gemm_math.h"
#include "ops.h"
#include "pack_format.h"

namespace bisup {

namespace {

constexpr int64_t kTaskRows = 64;  // rows of A per task (their accumulators live in L1)
constexpr int64_t kChunk = 256;    // K values decoded per step: a 16-lane tile's quads are 4 KiB

// Everything a task reads, identical for every ISA.
struct GemmPlan {
  const int32_t* a;     // [M, K/4]: activations as int8, 4 per int32, in the decoder's value order
  const int32_t* asum;  // [M, G]: per-group sums of the activations
  const float* sa;      // [M, G]: activation scales as fp32
  const uint8_t* w;     // [N, row_bytes]: the packed weight as given
  const c10::Half* sw;  // [N, G]
  int64_t m, n, k, group, groups, row_bytes;
};

// Plain per-lane loops (the compiler's baseline vectors): the portable path and the reference
// the SIMD paths are tested against, bit for bit.
namespace isa_scalar {
constexpr int kLanes = 4;
using VU = uint32_t __attribute__((vector_size(16)));
using VI = int32_t __attribute__((vector_size(16)));
using VF = float __attribute__((vector_size(16)));
inline VU gather(const uint8_t* p, VU off) {
  VU r;
  for (int i = 0; i < kLanes; ++i) r[i] = load_le32(p + off[i]);
  return r;
}
inline VI dot(VI acc, VU w, int32_t a4) {
  for (int i = 0; i < kLanes; ++i)
    for (int b = 0; b < 4; ++b)
      acc[i] += int32_t((w[i] >> (8 * b)) & 0xFF) * int32_t(static_cast<int8_t>(uint32_t(a4) >> (8 * b)));
  return acc;
}
inline float half_to_float(c10::Half h) { return static_cast<float>(h); }
#include "gemm_isa.inc"
}  // namespace isa_scalar

#ifdef BISUP_GEMM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")
namespace isa_avx512vnni {
constexpr int kLanes = 16;
using VU = uint32_t __attribute__((vector_size(64)));
using VI = int32_t __attribute__((vector_size(64)));
using VF = float __attribute__((vector_size(64)));
inline VU gather(const uint8_t* p, VU off) { return (VU)_mm512_i32gather_epi32((__m512i)off, p, 1); }
inline VI dot(VI acc, VU w, int32_t a4) {
  return (VI)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, _mm512_set1_epi32(a4));
}
inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }
#include "gemm_isa.inc"
}  // namespace isa_avx512vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avxvnni,avx2,f16c")
namespace isa_avxvnni {
#include "gemm_avx256.inc"
inline VI dot(VI acc, VU w, int32_t a4) {
  return (VI)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)w, _mm256_set1_epi32(a4));
}
#include "gemm_isa.inc"
}  // namespace isa_avxvnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace isa_avx2 {
#include "gemm_avx256.inc"
// u8 x s8 pairs summed to int16 (vpmaddubsw saturates, but |(w + 8) * a| <= 15 * 8, so a pair is
// at most 240), then pairs of int16 to int32.
inline VI dot(VI acc, VU w, int32_t a4) {
  const __m256i pairs = _mm256_maddubs_epi16((__m256i)w, _mm256_set1_epi32(a4));
  return acc + (VI)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#include "gemm_isa.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

using TaskFn = void (*)(const GemmPlan&, int64_t m0, int64_t mb, int64_t n0, float* out);

struct IsaPath {
  const char* name;
  int lanes;
  TaskFn w4, w3;
  bool (*supported)();
};

const std::vector<IsaPath>& isa_paths() {  // best first
  static const std::vector<IsaPath> paths = [] {
    std::vector<IsaPath> v;
#ifdef BISUP_GEMM_X86
    __builtin_cpu_init();
    v.push_back({"avx512vnni", isa_avx512vnni::kLanes, isa_avx512vnni::task_w4, isa_avx512vnni::task_w3, [] {
                   return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c");
                 }});
    v.push_back({"avxvnni", isa_avxvnni::kLanes, isa_avxvnni::task_w4, isa_avxvnni::task_w3, [] {
                   return __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("f16c");
                 }});
    v.push_back({"avx2", isa_avx2::kLanes, isa_avx2::task_w4, isa_avx2::task_w3,
                 [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }});
#endif
    v.push_back({"scalar", isa_scalar::kLanes, isa_scalar::task_w4, isa_scalar::task_w3, [] { return true; }});
    return v;
  }();
  return paths;
}

std::string supported_list() {
  std::string s;
  for (const auto& name : cpu_gemm_isas()) s += (s.empty() ? "" : ", ") + name;
  return s;
}

// BISUP_CPU_GEMM_ISA if set (and not "auto"), else the best path this CPU supports.
const IsaPath& pick_path() {
  const char* env = std::getenv("BISUP_CPU_GEMM_ISA");
  const auto& paths = isa_paths();
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") {
    for (const auto& p : paths)
      if (p.supported()) return p;
  }
  for (const auto& p : paths) {
    if (env == std::string(p.name)) {
      TORCH_CHECK(p.supported(), "bisup: BISUP_CPU_GEMM_ISA=", env, " but this CPU lacks ", env,
                  "; this CPU supports: ", supported_list());
      return p;
    }
  }
  TORCH_CHECK(false, "bisup: BISUP_CPU_GEMM_ISA must be one of avx512vnni, avxvnni, avx2, scalar or auto, got '",
              env, "'; this CPU supports: ", supported_list());
}

// A nibbles -> int8 in the order the weight decoder emits values (gemm_isa.inc): per uint32 of
// packed INT4 weight (values 8j..8j+7) the even values then the odd ones; natural order for INT3.
// Also the per-group sums and the scales as fp32.
void prepare_a(const at::Tensor& a_q, const at::Tensor& a_scale, int64_t w_bits, const GemmDims& d, at::Tensor& a,
               at::Tensor& asum, at::Tensor& sa) {
  a = at::empty({d.m, d.k / 4}, a_q.options().dtype(at::kInt));
  asum = at::empty({d.m, d.groups}, a_q.options().dtype(at::kInt));
  sa = a_scale.to(at::kFloat).contiguous();
  const uint8_t* src = a_q.data_ptr<uint8_t>();
  int8_t* dst = reinterpret_cast<int8_t*>(a.data_ptr<int32_t>());
  int32_t* sums = asum.data_ptr<int32_t>();
  at::parallel_for(0, d.m, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const uint8_t* s = src + m * (d.k / 2);
      int8_t* o = dst + m * d.k;
      for (int64_t i = 0; i < d.k / 2; ++i) {
        const int8_t lo = static_cast<int8_t>(static_cast<uint8_t>(s[i] << 4)) >> 4;
        const int8_t hi = static_cast<int8_t>(s[i]) >> 4;
        const int64_t at = w_bits == 4 ? 8 * (i / 4) + i % 4 : 2 * i;
        o[at] = lo;
        o[at + (w_bits == 4 ? 4 : 1)] = hi;
      }
      for (int64_t g = 0; g < d.groups; ++g) {
        int32_t t = 0;
        for (int64_t k = g * d.group; k < (g + 1) * d.group; ++k) t += o[k];
        sums[m * d.groups + g] = t;
      }
    }
  });
}

template <typename OutT>
void gemm_tasks(const GemmPlan& p, const IsaPath& path, int64_t w_bits, const int8_t* ao, const c10::Half* sao,
                const int8_t* wo, const c10::Half* swo, int64_t ko, const float* bias, OutT* out) {
  const TaskFn task = w_bits == 4 ? path.w4 : path.w3;
  const int64_t lanes = path.lanes;
  const int64_t tiles_n = (p.n + lanes - 1) / lanes, blocks_m = (p.m + kTaskRows - 1) / kTaskRows;
  // Task t = (M block t / tiles_n, N tile t % tiles_n): a thread's consecutive tasks share A rows.
  at::parallel_for(0, blocks_m * tiles_n, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> acc(kTaskRows * lanes);
    for (int64_t t = tb; t < te; ++t) {
      const int64_t m0 = (t / tiles_n) * kTaskRows, n0 = (t % tiles_n) * lanes;
      const int64_t mb = std::min(kTaskRows, p.m - m0), nb = std::min(lanes, p.n - n0);
      task(p, m0, mb, n0, acc.data());
      for (int64_t i = 0; i < mb; ++i) {
        for (int64_t j = 0; j < nb; ++j) {
          float y = acc[i * lanes + j];
          if (ko > 0) {
            const int8_t* ar = ao + (m0 + i) * ko;
            const int8_t* wr = wo + (n0 + j) * ko;
            int32_t dot = 0;
            for (int64_t k = 0; k < ko; ++k) dot += int32_t(ar[k]) * int32_t(wr[k]);
            const float s = gemm_scale_product(static_cast<float>(sao[m0 + i]), static_cast<float>(swo[n0 + j]));
            y = gemm_accumulate(y, static_cast<float>(dot), s);
          }
          if (bias != nullptr) y = y + bias[n0 + j];
          out[(m0 + i) * p.n + n0 + j] = static_cast<OutT>(y);
        }
      }
    }
  });
}

}  // namespace

std::vector<std::string> cpu_gemm_isas() {
  std::vector<std::string> names;
  for (const auto& p : isa_paths())
    if (p.supported()) names.emplace_back(p.name);
  return names;
}

std::string cpu_gemm_isa() { return pick_path().name; }

at::Tensor gemm_cpu(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                    int64_t a_bits, int64_t w_bits, int64_t group_size, at::ScalarType out_dtype,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& a_outlier,
                    const std::optional<at::Tensor>& a_outlier_scale, const std::optional<at::Tensor>& w_outlier,
                    const std::optional<at::Tensor>& w_outlier_scale) {
  const GemmDims d = check_gemm_args(a_q, a_scale, w_q, w_scale, a_bits, w_bits, group_size, out_dtype, bias,
                                     a_outlier, a_outlier_scale, w_outlier, w_outlier_scale);
  const IsaPath& path = pick_path();
  auto out = at::empty({d.m, d.n}, a_q.options().dtype(out_dtype));
  if (d.m == 0 || d.n == 0) return out;
  at::Tensor a, asum, sa;
  prepare_a(a_q, a_scale, w_bits, d, a, asum, sa);
  const GemmPlan plan{a.data_ptr<int32_t>(), asum.data_ptr<int32_t>(), sa.data_ptr<float>(), w_q.data_ptr<uint8_t>(),
                      w_scale.data_ptr<c10::Half>(), d.m, d.n, d.k, d.group, d.groups, w_q.size(1)};
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "gemm_cpu", [&] {
    gemm_tasks<scalar_t>(plan, path, w_bits, d.ko ? a_outlier->data_ptr<int8_t>() : nullptr,
                         d.ko ? a_outlier_scale->data_ptr<c10::Half>() : nullptr,
                         d.ko ? w_outlier->data_ptr<int8_t>() : nullptr,
                         d.ko ? w_outlier_scale->data_ptr<c10::Half>() : nullptr, d.ko,
                         bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace bisup
