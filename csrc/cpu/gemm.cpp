// CPU twin of the W4A4 / W3A3 group-scaled GEMM (bisup/reference.py::gemm), bit-identical to the
// CUDA kernels (csrc/gemm_math.h fixes the fp32 accumulation order).
//
// Plan: unpack A to uint8 (a + 8, so a VNNI u8 x s8 dot applies) and W to int8 once, with the
// per-(row, group) sums of W that undo the +8 offset: dot(a, w) = dot(a + 8, w) - 8 * sum(w).
// Then tiles of MB x NB outputs run in parallel; per K-group a tile's int32 dots come from an
// integer micro-kernel (AVX512-VNNI when the CPU has it, portable C++ otherwise) and are folded
// into fp32 accumulators in group order. The INT8 outlier segment and the bias come last.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BISUP_GEMM_X86 1
#endif

#include "checks.h"
#include "gemm_math.h"
#include "ops.h"
#include "pack_format.h"

namespace bisup {

namespace {

constexpr int64_t kTileM = 8;   // rows of A per tile
constexpr int64_t kTileN = 32;  // rows of W per tile: (8 + 32) * group bytes stay in L1

// dots[i * nb + j] = sum_k a[i][k] * w[j][k] for k < len (a: uint8 offset values, w: int8).
using BlockDotFn = void (*)(const uint8_t* a, int64_t a_stride, const int8_t* w, int64_t w_stride, int64_t mb,
                            int64_t nb, int64_t len, int32_t* dots);

void block_dot_portable(const uint8_t* a, int64_t a_stride, const int8_t* w, int64_t w_stride, int64_t mb,
                        int64_t nb, int64_t len, int32_t* dots) {
  for (int64_t i = 0; i < mb; ++i) {
    const uint8_t* ai = a + i * a_stride;
    for (int64_t j = 0; j < nb; ++j) {
      const int8_t* wj = w + j * w_stride;
      int32_t s = 0;
      for (int64_t k = 0; k < len; ++k) s += int32_t(ai[k]) * int32_t(wj[k]);
      dots[i * nb + j] = s;
    }
  }
}

#ifdef BISUP_GEMM_X86
// 4 W rows per A row share each A load; len is a multiple of 32 (kGemmKMultiple).
__attribute__((target("avx512vnni,avx512vl,avx512bw,avx512f"))) void block_dot_vnni(
    const uint8_t* a, int64_t a_stride, const int8_t* w, int64_t w_stride, int64_t mb, int64_t nb, int64_t len,
    int32_t* dots) {
  for (int64_t i = 0; i < mb; ++i) {
    const uint8_t* ai = a + i * a_stride;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      const int8_t* w0 = w + j * w_stride;
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < len; k += 32) {
        const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + k));
        s0 = _mm256_dpbusd_epi32(s0, va, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k)));
        s1 = _mm256_dpbusd_epi32(s1, va, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + w_stride + k)));
        s2 = _mm256_dpbusd_epi32(s2, va, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 2 * w_stride + k)));
        s3 = _mm256_dpbusd_epi32(s3, va, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 3 * w_stride + k)));
      }
      // per 128-bit lane: [sum s0, sum s1, sum s2, sum s3]; then add the two lanes.
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
      const __m128i r = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + i * nb + j), r);
    }
    for (; j < nb; ++j) {
      const int8_t* wj = w + j * w_stride;
      __m256i s = _mm256_setzero_si256();
      for (int64_t k = 0; k < len; k += 32)
        s = _mm256_dpbusd_epi32(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + k)),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + k)));
      const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      const __m128i p = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
      dots[i * nb + j] = _mm_cvtsi128_si32(_mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1)));
    }
  }
}
#endif

BlockDotFn pick_block_dot() {
#ifdef BISUP_GEMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    return block_dot_vnni;
#endif
  return block_dot_portable;
}

// A nibbles -> uint8 (a + 8): the signed nibble v stored as (v & 15) becomes v + 8 = nibble ^ 8.
at::Tensor unpack_a_offset(const at::Tensor& a_q) {
  auto out = at::empty({a_q.size(0), packed_row_values(4, a_q.size(1))}, a_q.options());
  const uint8_t* src = a_q.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, a_q.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      dst[2 * i] = (src[i] & 0xF) ^ 8;
      dst[2 * i + 1] = (src[i] >> 4) ^ 8;
    }
  });
  return out;
}

// W (INT4 or INT3) -> int8 [N, K] plus per-(row, group) sums [N, G].
std::pair<at::Tensor, at::Tensor> unpack_w(const at::Tensor& w_q, int64_t w_bits, const GemmDims& d) {
  auto w = at::empty({d.n, d.k}, w_q.options().dtype(at::kChar));
  auto sums = at::empty({d.n, d.groups}, w_q.options().dtype(at::kInt));
  const uint8_t* src = w_q.data_ptr<uint8_t>();
  int8_t* dst = w.data_ptr<int8_t>();
  int32_t* sum = sums.data_ptr<int32_t>();
  const int64_t row_bytes = w_q.size(1);
  at::parallel_for(0, d.n, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* s = src + n * row_bytes;
      int8_t* o = dst + n * d.k;
      if (w_bits == 4) {
        for (int64_t i = 0; i < row_bytes; ++i) {  // shifts instead of branches: vectorizes
          o[2 * i] = static_cast<int8_t>(static_cast<uint8_t>(s[i] << 4)) >> 4;
          o[2 * i + 1] = static_cast<int8_t>(s[i]) >> 4;
        }
      } else {
        for (int64_t blk = 0; blk < d.k / kInt3BlockValues; ++blk) {
          uint32_t words[kInt3BlockWords];
          std::memcpy(words, s + blk * kInt3BlockBytes, sizeof(words));  // rows need not be 4-byte aligned
          for (int i = 0; i < kInt3BlockValues; ++i) o[blk * kInt3BlockValues + i] = int3_value(words, i, true);
        }
      }
      for (int64_t g = 0; g < d.groups; ++g) {
        int32_t t = 0;
        for (int64_t k = g * d.group; k < (g + 1) * d.group; ++k) t += o[k];
        sum[n * d.groups + g] = t;
      }
    }
  });
  return {w, sums};
}

template <typename OutT>
void gemm_tiles(const uint8_t* a, const int8_t* w, const int32_t* wsum, const c10::Half* sa, const c10::Half* sw,
                const int8_t* ao, const c10::Half* sao, const int8_t* wo, const c10::Half* swo, const float* bias,
                OutT* out, const GemmDims& d) {
  const BlockDotFn block_dot = pick_block_dot();
  const int64_t tiles_m = (d.m + kTileM - 1) / kTileM, tiles_n = (d.n + kTileN - 1) / kTileN;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t tb, int64_t te) {
    int32_t dots[kTileM * kTileN];
    float acc[kTileM * kTileN];
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t m0 = (tile / tiles_n) * kTileM, n0 = (tile % tiles_n) * kTileN;
      const int64_t mb = std::min(kTileM, d.m - m0), nb = std::min(kTileN, d.n - n0);
      std::fill(acc, acc + mb * nb, 0.0f);
      for (int64_t g = 0; g < d.groups; ++g) {
        const int64_t k0 = g * d.group;
        block_dot(a + m0 * d.k + k0, d.k, w + n0 * d.k + k0, d.k, mb, nb, d.group, dots);
        for (int64_t i = 0; i < mb; ++i) {
          const float sa_i = static_cast<float>(sa[(m0 + i) * d.groups + g]);
          for (int64_t j = 0; j < nb; ++j) {
            const int32_t dot = dots[i * nb + j] - 8 * wsum[(n0 + j) * d.groups + g];
            const float s = gemm_scale_product(sa_i, static_cast<float>(sw[(n0 + j) * d.groups + g]));
            acc[i * nb + j] = gemm_accumulate(acc[i * nb + j], static_cast<float>(dot), s);
          }
        }
      }
      for (int64_t i = 0; i < mb; ++i) {
        for (int64_t j = 0; j < nb; ++j) {
          float y = acc[i * nb + j];
          if (d.ko > 0) {
            const int8_t* ar = ao + (m0 + i) * d.ko;
            const int8_t* wr = wo + (n0 + j) * d.ko;
            int32_t dot = 0;
            for (int64_t k = 0; k < d.ko; ++k) dot += int32_t(ar[k]) * int32_t(wr[k]);
            const float s = gemm_scale_product(static_cast<float>(sao[m0 + i]), static_cast<float>(swo[n0 + j]));
            y = gemm_accumulate(y, static_cast<float>(dot), s);
          }
          if (bias != nullptr) y = y + bias[n0 + j];
          out[(m0 + i) * d.n + n0 + j] = static_cast<OutT>(y);
        }
      }
    }
  });
}

}  // namespace

at::Tensor gemm_cpu(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                    int64_t a_bits, int64_t w_bits, int64_t group_size, at::ScalarType out_dtype,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& a_outlier,
                    const std::optional<at::Tensor>& a_outlier_scale, const std::optional<at::Tensor>& w_outlier,
                    const std::optional<at::Tensor>& w_outlier_scale) {
  const GemmDims d = check_gemm_args(a_q, a_scale, w_q, w_scale, a_bits, w_bits, group_size, out_dtype, bias,
                                     a_outlier, a_outlier_scale, w_outlier, w_outlier_scale);
  auto out = at::empty({d.m, d.n}, a_q.options().dtype(out_dtype));
  if (d.m == 0 || d.n == 0) return out;
  const at::Tensor a = unpack_a_offset(a_q);
  const auto [w, wsum] = unpack_w(w_q, w_bits, d);
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "gemm_cpu", [&] {
    gemm_tiles<scalar_t>(a.data_ptr<uint8_t>(), w.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(),
                         a_scale.data_ptr<c10::Half>(), w_scale.data_ptr<c10::Half>(),
                         d.ko ? a_outlier->data_ptr<int8_t>() : nullptr,
                         d.ko ? a_outlier_scale->data_ptr<c10::Half>() : nullptr,
                         d.ko ? w_outlier->data_ptr<int8_t>() : nullptr,
                         d.ko ? w_outlier_scale->data_ptr<c10::Half>() : nullptr,
                         bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), d);
  });
  return out;
}

}  // namespace bisup
