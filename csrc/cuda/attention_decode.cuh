// Flash-decoding kernels of bisup.ops.attention (few query rows, long KV).
//
// Grid (split, batch * kv_head, row_tile). A block owns one KV head, a contiguous range of
// logical key positions (its split of the keys its rows may see: [first, visible) over its rows,
// first > 0 only under a sliding window) and up to kMaxRows query rows of that head's GQA group
// (row = g * Tq + t, query head = kv_head * (Hq/Hkv) + g). It walks its range in tiles of
// kTile keys: the block loads the tile into shared memory as fp32 -- prompt rows converted,
// quantized rows dequantized on the fly (never written back to global memory) -- then each warp
// updates an online softmax for its rows: lane j scores key j of the tile, the warp reduces the
// tile max / sum, and accumulates P.V with lane-owned output dims (D/32 per lane). Each split
// writes its normalised partial output and log-sum-exp; combine_kernel merges the splits.
#pragma once
#include "attention_common.cuh"

namespace bisup {
namespace kv {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // keys per shared-memory tile: one per lane when scoring
constexpr int kRowsPerWarp = 4;
constexpr int kMaxRows = kWarps * kRowsPerWarp;  // query rows per block
// Row stride of the key tile in shared memory: D + kKeyPad floats, so lanes reading different
// key rows (one each when scoring) hit different banks.
constexpr int kKeyPad = 4;

struct DecodeParams {
  const void* q;   // [B, Hq, Tq, D]
  const void* kp;  // [B, Hkv, P, D]
  const void* vp;
  const uint8_t* kq;  // [B, Hkv, S, row bytes]
  const uint8_t* vq;
  const __half* ks;  // [B, Hkv, S, groups]
  const __half* kz;
  const __half* vs;
  const __half* vz;
  const int64_t* lens;  // [B] valid quantized lengths, or nullptr (= S)
  float* part_o;        // [splits, B * Hq * Tq, D]
  float* part_lse;      // [splits, B * Hq * Tq]
  int b, hq, hkv, tq, p, s, groups, group, split_len;
  int window;  // 0: none; else a query at logical position i sees keys j > i - window
  float scale;
  bool causal;
};

template <int D>
constexpr int decode_smem_bytes() {
  return (kTile * (D + kKeyPad) + kTile * D + kMaxRows * D) * int(sizeof(float));
}

// Loads keys [t0, t0 + kTile) of one (batch, kv head) into ks (row stride D + kKeyPad) and vs
// (stride D); keys at or past `end` become zeros.
template <typename T, int D, int BITS>
__device__ __forceinline__ void load_kv_tile(const DecodeParams& p, int64_t bh, int t0, int end, float* ks,
                                             float* vs) {
  constexpr int kChunks = D / 8;
  constexpr int64_t kRowBytes = packed_row_bytes(BITS, D);
  for (int c = threadIdx.x; c < kTile * kChunks; c += kThreads) {
    const int j = c / kChunks, d0 = (c % kChunks) * 8, pos = t0 + j;
    float kf[8], vf[8];
    if (pos >= end) {
#pragma unroll
      for (int i = 0; i < 8; ++i) kf[i] = vf[i] = 0.f;
    } else if (pos < p.p) {
      const int64_t off = (bh * p.p + pos) * D + d0;
      load8(static_cast<const T*>(p.kp) + off, kf);
      load8(static_cast<const T*>(p.vp) + off, vf);
    } else {
      const int64_t row = bh * p.s + (pos - p.p);
      const int64_t g = row * p.groups + d0 / p.group;
      dequant8<BITS>(p.kq + row * kRowBytes, d0, __half2float(p.ks[g]), __half2float(p.kz[g]), kf);
      dequant8<BITS>(p.vq + row * kRowBytes, d0, __half2float(p.vs[g]), __half2float(p.vz[g]), vf);
    }
    float4* kd = reinterpret_cast<float4*>(ks + j * (D + kKeyPad) + d0);
    float4* vd = reinterpret_cast<float4*>(vs + j * D + d0);
    kd[0] = make_float4(kf[0], kf[1], kf[2], kf[3]);
    kd[1] = make_float4(kf[4], kf[5], kf[6], kf[7]);
    vd[0] = make_float4(vf[0], vf[1], vf[2], vf[3]);
    vd[1] = make_float4(vf[4], vf[5], vf[6], vf[7]);
  }
}

template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  static_assert(D % 32 == 0, "lanes own D/32 output dims");
  extern __shared__ float4 smem4[];
  float* ks = reinterpret_cast<float*>(smem4);  // [kTile][D + kKeyPad]
  float* vs = ks + kTile * (D + kKeyPad);        // [kTile][D]
  float* qs = vs + kTile * D;                    // [kMaxRows][D], pre-scaled by softmax_scale
  const int split = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const int b = int(bh / p.hkv), hkv = int(bh % p.hkv);
  const int gqa = p.hq / p.hkv, row0 = blockIdx.z * kMaxRows;
  const int nrows = min(kMaxRows, gqa * p.tq - row0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int len = p.p + (p.lens ? int(p.lens[b]) : p.s);  // valid logical length

  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < nrows * D; i += kThreads) {
    const int gr = row0 + i / D, hq = hkv * gqa + gr / p.tq, t = gr % p.tq;
    qs[i] = to_float(q[((int64_t(b) * p.hq + hq) * p.tq + t) * D + i % D]) * p.scale;
  }

  // Row k sees keys first[k] <= j < visible[k] (end-aligned causal mask, sliding window).
  int first[kRowsPerWarp], visible[kRowsPerWarp];
  int block_first = len, block_visible = 0;
  for (int r = 0; r < nrows; ++r) {
    const int at = len - p.tq + (row0 + r) % p.tq;  // the row's logical position
    block_visible = max(block_visible, p.causal ? min(len, at + 1) : len);
    block_first = min(block_first, p.window > 0 ? max(0, at - p.window + 1) : 0);
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int at = len - p.tq + (row0 + warp + kWarps * k) % p.tq;
    visible[k] = p.causal ? min(len, at + 1) : len;
    first[k] = p.window > 0 ? max(0, at - p.window + 1) : 0;
  }
  const int begin = block_first + split * p.split_len;
  const int end = min(begin + p.split_len, block_visible);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][D / 32];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    m[k] = -INFINITY;
    l[k] = 0.f;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) acc[k][i] = 0.f;
  }

  for (int t0 = begin; t0 < end; t0 += kTile) {
    __syncthreads();  // the previous tile (and, first time, nothing) is no longer read; qs written
    load_kv_tile<T, D, BITS>(p, bh, t0, end, ks, vs);
    __syncthreads();
    const int n = min(kTile, end - t0);
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + kWarps * k;
      if (r >= nrows) break;  // warp-uniform
      const int pos = t0 + lane;
      float s = -INFINITY;
      if (lane < n && pos >= first[k] && pos < visible[k]) {
        const float4* qr = reinterpret_cast<const float4*>(qs + r * D);
        const float4* kr = reinterpret_cast<const float4*>(ks + lane * (D + kKeyPad));
        float dot = 0.f;
#pragma unroll 8
        for (int i = 0; i < D / 4; ++i) {
          const float4 a = qr[i], c = kr[i];
          dot += a.x * c.x + a.y * c.y + a.z * c.z + a.w * c.w;
        }
        s = dot;
      }
      const float m_new = fmaxf(m[k], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible to this row yet (warp-uniform)
      const float alpha = expf(m[k] - m_new);  // 0 when m[k] was -inf
      const float pr = expf(s - m_new);        // 0 for masked keys
      l[k] = l[k] * alpha + warp_sum(pr);
      m[k] = m_new;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) acc[k][i] *= alpha;
      for (int j = 0; j < n; ++j) {
        const float w = __shfl_sync(0xffffffffu, pr, j);
#pragma unroll
        for (int i = 0; i < D / 32; ++i) acc[k][i] += w * vs[j * D + lane + 32 * i];
      }
    }
  }

  const int64_t rows_total = int64_t(p.b) * p.hq * p.tq;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int r = warp + kWarps * k;
    if (r >= nrows) break;
    const int gr = row0 + r, hq = hkv * gqa + gr / p.tq, t = gr % p.tq;
    const int64_t orow = split * rows_total + (int64_t(b) * p.hq + hq) * p.tq + t;
    const float inv = l[k] > 0.f ? 1.f / l[k] : 0.f;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) p.part_o[orow * D + lane + 32 * i] = acc[k][i] * inv;
    if (lane == 0) p.part_lse[orow] = l[k] > 0.f ? m[k] + logf(l[k]) : -INFINITY;
  }
}

// out[row] = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M); zeros for a row no split saw.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const float* __restrict__ part_o,
                                                    const float* __restrict__ part_lse, T* __restrict__ out,
                                                    int splits, int64_t rows) {
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_lse[s * rows + row]);
  float num = 0.f, den = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float lse = part_lse[s * rows + row];
      if (lse == -INFINITY) continue;
      const float w = expf(lse - mx);
      num += w * part_o[(s * rows + row) * D + d];
      den += w;
    }
  }
  out[row * D + d] = static_cast<T>(den > 0.f ? num / den : 0.f);
}

}  // namespace kv
}  // namespace bisup
