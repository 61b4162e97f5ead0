// CPU twin of bisup.ops.attention: softmax attention over a logical KV sequence made of a
// full-precision prompt segment followed by a quantized segment, with GQA, end-aligned causal
// masking, per-batch lengths and an optional sliding window (a query at logical position i sees
// keys j > i - window, the prompt segment included). Semantics: bisup/reference.py.
//
// Streaming (flash-decoding style): a work item is one (batch, kv head), a block of its query
// rows (GQA group x Tq) and a range of its keys. Keys are read once per item, a row at a time:
// the packed K row is dequantized into an L1 row buffer and dotted with every query row of the
// block, then the packed V row likewise feeds p * v into the rows' accumulators, with an online
// softmax (running max and sum). No dequantized copy of the cache is made. When (batch, kv head)
// pairs are fewer than twice the threads, each one's keys are split into ranges whose partial
// softmax states are merged at the end (split-K).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "kv_format.h"
#include "ops.h"

namespace bisup {

namespace {

constexpr int64_t kKeyBlock = 64;       // keys scored before their values are accumulated
constexpr int64_t kRowBlock = 64;       // query rows per work item
constexpr int64_t kMinSplitKeys = 128;  // a split-K range is at least this many keys
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class Dtype { kFloat, kHalf, kBFloat16 };

// The logical K (or V) rows of one (batch, kv head): prompt rows in q's dtype, then packed rows.
struct KvRows {
  const void* prompt;  // [P, D]
  Dtype dtype;
  int64_t p;
  const uint8_t* packed;  // [S, row bytes]
  const c10::Half* scale;  // [S, G]
  const c10::Half* zero;
  int64_t d, group, row_bytes;
  int bits;
};

// Rows are handled in a "storage order" of their D values: natural, except for 4-bit rows, where
// each group keeps its low-nibble values (even offsets) first and then the odd ones, so a packed
// row expands with contiguous loops. q rows and prompt rows are permuted the same way on load and
// outputs are permuted back on store; dots and p * v sums do not depend on the order.
// pos[i] = storage position of value i.
std::vector<int64_t> storage_positions(int64_t d, int64_t group, int bits) {
  std::vector<int64_t> pos(d);
  for (int64_t i = 0; i < d; ++i) {
    const int64_t w = i % group;
    pos[i] = bits == 4 ? i - w + (w % 2) * (group / 2) + w / 2 : i;
  }
  return pos;
}

// Row j of the logical sequence as fp32 in storage order: a prompt row converted, or
// (code - zero) * scale in fp32 exactly as kv_dequantize.
__attribute__((always_inline)) inline void fetch_row(const KvRows& kv, const int64_t* pos, int64_t j, float* out) {
  const int64_t d = kv.d;
  if (j < kv.p) {
    if (kv.dtype == Dtype::kFloat) {
      const float* r = static_cast<const float*>(kv.prompt) + j * d;
      for (int64_t i = 0; i < d; ++i) out[pos[i]] = r[i];
    } else if (kv.dtype == Dtype::kHalf) {
      const c10::Half* r = static_cast<const c10::Half*>(kv.prompt) + j * d;
      for (int64_t i = 0; i < d; ++i) out[pos[i]] = static_cast<float>(r[i]);
    } else {
      const c10::BFloat16* r = static_cast<const c10::BFloat16*>(kv.prompt) + j * d;
      for (int64_t i = 0; i < d; ++i) out[pos[i]] = static_cast<float>(r[i]);
    }
    return;
  }
  const int64_t row = j - kv.p, groups = d / kv.group;
  const uint8_t* codes = kv.packed + row * kv.row_bytes;
  for (int64_t g = 0; g < groups; ++g) {
    const float s = static_cast<float>(kv.scale[row * groups + g]), z = static_cast<float>(kv.zero[row * groups + g]);
    float* o = out + g * kv.group;
    const int64_t i0 = g * kv.group;
    if (kv.bits == 4) {
      const uint8_t* c = codes + i0 / 2;
      const int64_t half = kv.group / 2;
      for (int64_t i = 0; i < half; ++i) o[i] = (float(c[i] & 0xF) - z) * s;
      for (int64_t i = 0; i < half; ++i) o[half + i] = (float(c[i] >> 4) - z) * s;
    } else if (kv.bits == 8) {
      for (int64_t i = 0; i < kv.group; ++i) o[i] = (float(codes[i0 + i]) - z) * s;
    } else {
      for (int64_t i = 0; i < kv.group; ++i) o[i] = (float(kv_code(codes, int(i0 + i), 3)) - z) * s;
    }
  }
}

// 16 floats as a GCC vector: explicit so the dot and axpy loops are vector code in every clone
// of attend_keys (a float sum the compiler may not reorder would stay scalar).
using F16 = float __attribute__((vector_size(64)));
__attribute__((always_inline)) inline F16 load16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t d) {
  F16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) acc += load16(a + i) * load16(b + i);
  float s = 0.f;
  for (; i < d; ++i) s += a[i] * b[i];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// y += p * x over d values.
__attribute__((always_inline)) inline void axpy(float p, const float* x, float* y, int64_t d) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const F16 r = load16(y + i) + p * load16(x + i);
    std::memcpy(y + i, &r, sizeof(r));
  }
  for (; i < d; ++i) y[i] += p * x[i];
}

// Online-softmax state of a block of query rows: running max m, sum l, unnormalised output acc.
struct RowState {
  std::vector<float> m, l, acc;
  void reset(int64_t rows, int64_t d) {
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    acc.assign(rows * d, 0.f);
  }
};

// Keys [j0, j1) against `rows` query rows q (fp32, [rows, D], storage order); row r sees keys
// first[r] <= j < visible[r].
// The hot loop of the op; cloned per ISA (runtime dispatch, one build).
__attribute__((target_clones("avx512f", "avx2", "default"))) void attend_keys(
    const KvRows& k, const KvRows& v, const int64_t* pos, const float* q, int64_t rows, const int64_t* first,
    const int64_t* visible, int64_t j0, int64_t j1, float scale, RowState& st) {
  const int64_t d = k.d;
  std::vector<float> krow(d), vrow(d), p(rows * kKeyBlock);
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, j1 - jb);
    for (int64_t jj = 0; jj < nk; ++jj) {
      fetch_row(k, pos, jb + jj, krow.data());
      for (int64_t r = 0; r < rows; ++r)
        p[r * kKeyBlock + jj] =
            jb + jj >= first[r] && jb + jj < visible[r] ? dot(q + r * d, krow.data(), d) * scale : kNegInf;
    }
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      float* pr = p.data() + r * kKeyBlock;
      const float bm = *std::max_element(pr, pr + nk);
      if (bm == kNegInf) {  // no visible key in this block
        std::fill(pr, pr + nk, 0.f);
        continue;
      }
      any = true;
      const float m_new = std::max(st.m[r], bm);
      const float corr = std::exp(st.m[r] - m_new);  // 0 for the first visible block
      float sum = 0.f;
      for (int64_t jj = 0; jj < nk; ++jj) {
        pr[jj] = std::exp(pr[jj] - m_new);
        sum += pr[jj];
      }
      st.l[r] = st.l[r] * corr + sum;
      st.m[r] = m_new;
      if (corr != 1.f)
        for (int64_t i = 0; i < d; ++i) st.acc[r * d + i] *= corr;
    }
    if (!any) continue;
    for (int64_t jj = 0; jj < nk; ++jj) {
      fetch_row(v, pos, jb + jj, vrow.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float pj = p[r * kKeyBlock + jj];
        if (pj == 0.f) continue;
        axpy(pj, vrow.data(), st.acc.data() + r * d, d);
      }
    }
  }
}

template <typename T>
void attention_rows(const AttentionDims& a, const T* q, const T* kp, const T* vp, const uint8_t* kq,
                    const c10::Half* ks, const c10::Half* kz, const uint8_t* vq, const c10::Half* vs,
                    const c10::Half* vz, const int64_t* lens, bool causal, T* out) {
  const int64_t d = a.d, gqa = a.hq / a.hkv, groups = d / a.group, pairs = a.b * a.hkv;
  const int64_t rows_all = gqa * a.tq, row_blocks = (rows_all + kRowBlock - 1) / kRowBlock;
  const int bits = static_cast<int>(a.bits);
  const int64_t row_bytes = packed_row_bytes(bits, d);
  const float scale = static_cast<float>(a.scale);
  const Dtype dt = std::is_same_v<T, float> ? Dtype::kFloat : std::is_same_v<T, c10::Half> ? Dtype::kHalf
                                                                                            : Dtype::kBFloat16;
  // Split-K only when the (batch, kv head, row block) items cannot keep every thread busy.
  const int64_t items0 = pairs * row_blocks;
  // Keys one row block may see: all of them, or with a window at most window + Tq - 1.
  const int64_t max_len = a.window > 0 ? std::min(a.p + a.s, a.window + a.tq - 1) : a.p + a.s;
  const int64_t splits = std::max<int64_t>(
      1, std::min((2 * at::get_num_threads() + items0 - 1) / items0, max_len / kMinSplitKeys));
  // Partial states of split items: [item][kRowBlock] (m, l) and [item][kRowBlock][D] (acc).
  std::vector<float> part_m, part_l, part_acc;
  if (splits > 1) {
    part_m.resize(items0 * splits * kRowBlock);
    part_l.resize(items0 * splits * kRowBlock);
    part_acc.resize(items0 * splits * kRowBlock * d);
  }
  auto out_row = [&](int64_t bh, int64_t r) {  // flattened row r = g * Tq + t of kv pair bh
    const int64_t b = bh / a.hkv, hq = (bh % a.hkv) * gqa + r / a.tq;
    return out + ((b * a.hq + hq) * a.tq + r % a.tq) * d;
  };
  const std::vector<int64_t> pos = storage_positions(d, a.group, bits);
  auto write_row = [&](T* o, float m, float l, const float* acc) {
    const float inv = m == kNegInf ? 0.f : 1.f / l;  // a row that saw no key returns zeros
    for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(m == kNegInf ? 0.f : acc[pos[i]] * inv);
  };

  at::parallel_for(0, items0 * splits, 1, [&](int64_t begin, int64_t end) {
    RowState st;
    std::vector<float> qf(kRowBlock * d);
    int64_t first[kRowBlock], visible[kRowBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits, rb = (item / splits) % row_blocks, bh = item / splits / row_blocks;
      const int64_t b = bh / a.hkv;
      const int64_t len = a.p + lens[b];  // valid logical length of this batch entry
      const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, rows_all - r0);
      int64_t start = len, reach = 0;  // keys [start, reach) are visible to some row of the block
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = (r0 + r) % a.tq, at_pos = len - a.tq + t;  // the row's logical position
        visible[r] = causal ? std::min(len, at_pos + 1) : len;  // end-aligned causal mask
        first[r] = a.window > 0 ? std::max<int64_t>(0, at_pos - a.window + 1) : 0;  // sliding window
        start = std::min(start, first[r]);
        reach = std::max(reach, visible[r]);
        const T* qr = q + (out_row(bh, r0 + r) - out);
        for (int64_t i = 0; i < d; ++i) qf[r * d + pos[i]] = static_cast<float>(qr[i]);
      }
      const int64_t span = std::max<int64_t>(reach - start, 0);
      const int64_t j0 = start + span * split / splits, j1 = start + span * (split + 1) / splits;
      const KvRows k{kp + bh * a.p * d, dt, a.p, kq + bh * a.s * row_bytes, ks + bh * a.s * groups,
                     kz + bh * a.s * groups, d, a.group, row_bytes, bits};
      const KvRows v{vp + bh * a.p * d, dt, a.p, vq + bh * a.s * row_bytes, vs + bh * a.s * groups,
                     vz + bh * a.s * groups, d, a.group, row_bytes, bits};
      st.reset(rows, d);
      attend_keys(k, v, pos.data(), qf.data(), rows, first, visible, j0, j1, scale, st);
      if (splits == 1) {
        for (int64_t r = 0; r < rows; ++r) write_row(out_row(bh, r0 + r), st.m[r], st.l[r], st.acc.data() + r * d);
      } else {
        std::copy_n(st.m.data(), rows, part_m.data() + item * kRowBlock);
        std::copy_n(st.l.data(), rows, part_l.data() + item * kRowBlock);
        std::copy_n(st.acc.data(), rows * d, part_acc.data() + item * kRowBlock * d);
      }
    }
  });
  if (splits == 1) return;
  // Merge the splits of each row: rescale every partial to the common max, add, normalise.
  at::parallel_for(0, items0, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it % row_blocks, bh = it / row_blocks, r0 = rb * kRowBlock;
      const int64_t rows = std::min(kRowBlock, rows_all - r0);
      for (int64_t r = 0; r < rows; ++r) {
        float m = kNegInf, l = 0.f;
        for (int64_t s = 0; s < splits; ++s) m = std::max(m, part_m[(it * splits + s) * kRowBlock + r]);
        std::fill(acc.begin(), acc.end(), 0.f);
        if (m != kNegInf) {
          for (int64_t s = 0; s < splits; ++s) {
            const int64_t at = (it * splits + s) * kRowBlock + r;
            if (part_m[at] == kNegInf) continue;
            const float c = std::exp(part_m[at] - m);
            l += part_l[at] * c;
            const float* pa = part_acc.data() + at * d;
            for (int64_t i = 0; i < d; ++i) acc[i] += pa[i] * c;
          }
        }
        write_row(out_row(bh, r0 + r), m, l, acc.data());
      }
    }
  });
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                         const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                         const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t kv_bits,
                         int64_t group_size, std::optional<double> softmax_scale, bool causal,
                         const std::optional<at::Tensor>& seq_lens, int64_t window) {
  const AttentionDims a = check_attention_args(q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero,
                                               kv_bits, group_size, softmax_scale, seq_lens, window);
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
