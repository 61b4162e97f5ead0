// CPU twin of bisup.ops.attention: softmax attention over a logical KV sequence made of a
// full-precision prompt segment followed by a quantized segment (dequantized on the fly), with
// GQA, end-aligned causal masking and per-batch lengths. Semantics: bisup/reference.py.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "kv_format.h"
#include "ops.h"

namespace bisup {

namespace {

template <typename T>
void attention_rows(const AttentionDims& a, const T* q, const T* kp, const T* vp, const uint8_t* kq,
                    const c10::Half* ks, const c10::Half* kz, const uint8_t* vq, const c10::Half* vs,
                    const c10::Half* vz, const int64_t* lens, bool causal, T* out) {
  const int64_t d = a.d, gqa = a.hq / a.hkv, groups = d / a.group;
  const int bits = static_cast<int>(a.bits);
  const int64_t row_bytes = packed_row_bytes(bits, d);
  const float scale = static_cast<float>(a.scale);
  at::parallel_for(0, a.b * a.hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> k, v, qrow(d), scores, acc(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.hkv;
      const int64_t len = a.p + lens[b];  // valid logical length of this batch entry
      // The logical K/V of this (batch, kv head) in fp32: prompt rows, then dequantized rows.
      k.assign(len * d, 0.f);
      v.assign(len * d, 0.f);
      for (int64_t j = 0; j < a.p; ++j) {
        for (int64_t i = 0; i < d; ++i) {
          k[j * d + i] = static_cast<float>(kp[(bh * a.p + j) * d + i]);
          v[j * d + i] = static_cast<float>(vp[(bh * a.p + j) * d + i]);
        }
      }
      for (int64_t j = 0; j < len - a.p; ++j) {
        const int64_t row = bh * a.s + j;
        for (int64_t i = 0; i < d; ++i) {
          const int64_t g = row * groups + i / a.group;
          k[(a.p + j) * d + i] = (float(kv_code(kq + row * row_bytes, int(i), bits)) - float(kz[g])) * float(ks[g]);
          v[(a.p + j) * d + i] = (float(kv_code(vq + row * row_bytes, int(i), bits)) - float(vz[g])) * float(vs[g]);
        }
      }
      for (int64_t g = 0; g < gqa; ++g) {
        const int64_t hq = (bh % a.hkv) * gqa + g;
        for (int64_t t = 0; t < a.tq; ++t) {
          const int64_t orow = ((b * a.hq + hq) * a.tq + t) * d;
          // Keys 0..visible-1 are visible to this query (end-aligned causal mask).
          const int64_t visible = causal ? std::min(len, len - a.tq + t + 1) : len;
          std::fill(acc.begin(), acc.end(), 0.f);
          if (visible > 0) {
            for (int64_t i = 0; i < d; ++i) qrow[i] = static_cast<float>(q[orow + i]);
            scores.resize(visible);
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < visible; ++j) {
              float dot = 0.f;
              for (int64_t i = 0; i < d; ++i) dot += qrow[i] * k[j * d + i];
              scores[j] = dot * scale;
              m = std::max(m, scores[j]);
            }
            float sum = 0.f;
            for (int64_t j = 0; j < visible; ++j) {
              const float p = std::exp(scores[j] - m);
              sum += p;
              for (int64_t i = 0; i < d; ++i) acc[i] += p * v[j * d + i];
            }
            for (int64_t i = 0; i < d; ++i) acc[i] /= sum;
          }
          for (int64_t i = 0; i < d; ++i) out[orow + i] = static_cast<T>(acc[i]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                         const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                         const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t kv_bits,
                         int64_t group_size, std::optional<double> softmax_scale, bool causal,
                         const std::optional<at::Tensor>& seq_lens) {
  const AttentionDims a = check_attention_args(q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero,
                                               kv_bits, group_size, softmax_scale, seq_lens);
  auto out = at::empty_like(q);
  if (out.numel() == 0) return out;
  const at::Tensor lens = seq_lens.has_value() ? seq_lens->to(at::kLong).contiguous()
                                               : at::full({a.b}, a.s, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    attention_rows<scalar_t>(a, q.data_ptr<scalar_t>(), k_prompt.data_ptr<scalar_t>(), v_prompt.data_ptr<scalar_t>(),
                             k_q.data_ptr<uint8_t>(), k_scale.data_ptr<c10::Half>(), k_zero.data_ptr<c10::Half>(),
                             v_q.data_ptr<uint8_t>(), v_scale.data_ptr<c10::Half>(), v_zero.data_ptr<c10::Half>(),
                             lens.data_ptr<int64_t>(), causal, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace bisup
