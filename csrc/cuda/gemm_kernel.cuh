// The W4A4 / W3A3 group-scaled GEMM kernel template (launched by csrc/cuda/gemm.cu).
//
// One CTA computes a BM x BN tile of y = A * W^T. The K loop walks "tiles" of 64 bytes per row:
// first the INT4 main segment (128 K values per tile; W3 weights: 48 bytes = 4 INT3 blocks per
// row), then the INT8 outlier segment (64 values per tile). Tiles flow through a STAGES-deep
// cp.async pipeline into shared memory (A and INT4/INT8 W rows XOR-swizzled in 16-byte chunks, so
// ldmatrix is conflict-free); rows past M / N and bytes past K are zero-filled, so tails need no
// special compute. Per warp a WM x WN sub-tile: int32 mma accumulators hold the current K-group,
// and at each group end they are folded into fp32 accumulators with a_scale * w_scale (scales of
// the next group are prefetched into registers right after a fold). Epilogue: outlier fold, bias,
// conversion to the output dtype, predicated stores.
//
// Paths (template parameter):
//   kS4: mma.m16n8k64 s4 on INT4 data as stored (Ampere/Ada tensor cores); W4 only, group % 64 == 0.
//   kS8: INT4 / INT3 unpacked to INT8 in registers, mma.m16n8k32 s8 (Hopper; any group % 32 == 0).
// The outlier segment always uses mma.m16n8k32 s8 directly.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gemm_math.h"
#include "gemm_ptx.cuh"
#include "pack_format.h"

namespace bisup {
namespace gemm {

enum class MmaPath { kS4, kS8 };
enum OutKind : int { kOutHalf = 0, kOutBFloat16 = 1, kOutFloat = 2 };

constexpr int kTileBytes = 64;  // bytes per row per pipeline stage (A, INT4/INT8 W)
constexpr int kTileK = 128;     // INT4 values per main tile
// W3 bytes per row per main tile: 4 INT3 blocks of 12 bytes (48), copied as 16-byte chunks.
constexpr int kInt3TileBytes = kTileK / kInt3BlockValues * kInt3BlockBytes;
constexpr int kInt3TileChunks = kInt3TileBytes / 16;
static_assert(kInt3TileBytes % 16 == 0 && packed_row_bytes(4, kTileK) == kTileBytes, "tile sizes");

struct Params {
  const uint8_t* a;        // [M, K/2] INT4 nibbles
  const uint8_t* w;        // [N, K/2] INT4 or [N, 3K/8] INT3
  const __half* sa;        // [M, groups]
  const __half* sw;        // [N, groups]
  const int8_t* ao;        // [M, ko] or null
  const int8_t* wo;        // [N, ko] or null
  const __half* sao;       // [M]
  const __half* swo;       // [N]
  const float* bias;       // [N] or null
  void* out;               // [M, N]
  int out_kind;
  int m, n, k, group, groups, ko;
};

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;  // mma tiles per warp
  static constexpr int kStageBytes = (BM + BN) * kTileBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16 x 16 (ldmatrix pairs of n8 tiles)");
};

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` in a swizzled 64-byte-row tile: the
// chunk index is XORed with bits 1-2 of the row, so the 8 rows an ldmatrix reads at one logical
// chunk land in 8 distinct 16-byte bank groups.
__device__ __forceinline__ int swizzle(int row, int chunk) { return row * kTileBytes + ((chunk ^ ((row >> 1) & 3)) << 4); }

// Async copy of a rows x 64-byte tile (rows from row0, bytes from byte0 of each row_bytes-long
// row) into swizzled shared memory; missing rows / bytes become zeros.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_rows64(uint8_t* dst, const uint8_t* src, int64_t row0, int64_t rows_total,
                                            int64_t row_bytes, int64_t byte0) {
  for (int c = threadIdx.x; c < kRows * 4; c += kThreads) {
    const int row = c >> 2, chunk = c & 3;
    const int64_t gr = row0 + row, gb = byte0 + 16 * chunk;
    const bool ok = gr < rows_total && gb < row_bytes;
    cp_async16(smem_addr(dst + swizzle(row, chunk)), ok ? src + gr * row_bytes + gb : src, ok ? 16 : 0);
  }
}

// W3 tile: rows x 48 bytes, unswizzled (read with 32-bit loads, conflict-free at a 48-byte stride).
template <int kRows, int kThreads>
__device__ __forceinline__ void load_rows48(uint8_t* dst, const uint8_t* src, int64_t row0, int64_t rows_total,
                                            int64_t row_bytes, int64_t byte0) {
  for (int c = threadIdx.x; c < kRows * kInt3TileChunks; c += kThreads) {
    const int row = c / kInt3TileChunks, chunk = c % kInt3TileChunks;
    const int64_t gr = row0 + row;
    const bool ok = gr < rows_total;
    cp_async16(smem_addr(dst + row * kInt3TileBytes + 16 * chunk), ok ? src + gr * row_bytes + byte0 + 16 * chunk : src,
               ok ? 16 : 0);
  }
}

template <class Cfg, MmaPath kPath, int kWBits>
__global__ void __launch_bounds__(Cfg::kThreads, 1) gemm_kernel(const Params p) {
  static_assert(kPath == MmaPath::kS8 || kWBits == 4, "the s4 path needs INT4 weights");
  constexpr int MT = Cfg::MT, NT = Cfg::NT, STAGES = Cfg::STAGES;
  // int32 accumulators of the INT8 unpack path hold 16 * 16 (W4) or 16 * 32 (W3) times the dot.
  constexpr float kUnpackScale = kPath == MmaPath::kS4 ? 1.0f : (kWBits == 4 ? 1.0f / 256.0f : 1.0f / 512.0f);

  extern __shared__ __align__(128) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
  const int64_t m0 = int64_t(blockIdx.y) * Cfg::BM, n0 = int64_t(blockIdx.x) * Cfg::BN;

  const int64_t a_row_bytes = packed_row_bytes(4, p.k);
  const int64_t w_row_bytes = packed_row_bytes(kWBits, p.k);
  const int tiles_main = (p.k + kTileK - 1) / kTileK;
  const int tiles_total = tiles_main + (p.ko + kTileBytes - 1) / kTileBytes;

  auto load_tile = [&](int stage, int tile) {
    uint8_t* as = smem + stage * Cfg::kStageBytes;
    uint8_t* ws = as + Cfg::BM * kTileBytes;
    if (tile < tiles_main) {
      load_rows64<Cfg::BM, Cfg::kThreads>(as, p.a, m0, p.m, a_row_bytes, int64_t(tile) * kTileBytes);
      if constexpr (kWBits == 4)
        load_rows64<Cfg::BN, Cfg::kThreads>(ws, p.w, n0, p.n, w_row_bytes, int64_t(tile) * kTileBytes);
      else
        load_rows48<Cfg::BN, Cfg::kThreads>(ws, p.w, n0, p.n, w_row_bytes, int64_t(tile) * kInt3TileBytes);
    } else {
      const int64_t byte0 = int64_t(tile - tiles_main) * kTileBytes;
      load_rows64<Cfg::BM, Cfg::kThreads>(as, reinterpret_cast<const uint8_t*>(p.ao), m0, p.m, p.ko, byte0);
      load_rows64<Cfg::BN, Cfg::kThreads>(ws, reinterpret_cast<const uint8_t*>(p.wo), n0, p.n, p.ko, byte0);
    }
  };

  int32_t acc_i[MT][NT][4];
  float acc_f[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        acc_i[i][j][r] = 0;
        acc_f[i][j][r] = 0.0f;
      }

  // This thread's output rows (i, half h: + 8h) and columns (j, c: + c), clamped for scale reads.
  auto row_of = [&](int i, int h) { return m0 + wm0 + i * 16 + g + 8 * h; };
  auto col_of = [&](int j, int c) { return n0 + wn0 + j * 8 + 2 * t + c; };

  // Scales of the next group to fold, prefetched into registers.
  __half sa_next[MT][2], sw_next[NT][2];
  auto prefetch_scales = [&](int grp) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) sa_next[i][h] = p.sa[min(row_of(i, h), int64_t(p.m) - 1) * p.groups + grp];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) sw_next[j][c] = p.sw[min(col_of(j, c), int64_t(p.n) - 1) * p.groups + grp];
  };
  int next_group = 0;
  prefetch_scales(0);

  // Fold the int32 group accumulators into fp32 when a main-segment k-step ends at a group end.
  auto maybe_fold = [&](int64_t k_end) {
    if (k_end % p.group != 0 || k_end > p.k) return;  // uniform across the CTA
    float sa_f[MT][2], sw_f[NT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) sa_f[i][h] = __half2float(sa_next[i][h]) * kUnpackScale;  // exact: power of 2
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) sw_f[j][c] = __half2float(sw_next[j][c]);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float s = gemm_scale_product(sa_f[i][r >> 1], sw_f[j][r & 1]);
          acc_f[i][j][r] = gemm_accumulate(acc_f[i][j][r], static_cast<float>(acc_i[i][j][r]), s);
          acc_i[i][j][r] = 0;
        }
    if (++next_group < p.groups) prefetch_scales(next_group);
  };

  auto compute_tile = [&](int stage, int tile) {
    const uint8_t* as = smem + stage * Cfg::kStageBytes;
    const uint8_t* ws = as + Cfg::BM * kTileBytes;
    const bool main = tile < tiles_main;
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {  // two 32-byte k-chunks per 64-byte row
      // A fragments: lanes 0-7 rows 0-7 / 8-15 rows 8-15 at chunk 2kc; lanes 16-31 the same at 2kc+1.
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = wm0 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(a[i], smem_addr(as + swizzle(row, 2 * kc + (lane >> 4))));
      }
      // W fragments for INT4 / INT8 rows: per pair of n8 tiles, regs {b[j][0], b[j][1], b[j+1][0], b[j+1][1]}.
      uint32_t b[NT][2];
      if (kWBits == 4 || !main) {
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          const int row = wn0 + j * 8 + (lane & 7) + (lane >> 4) * 8;
          uint32_t r[4];
          ldmatrix_x4(r, smem_addr(ws + swizzle(row, 2 * kc + ((lane >> 3) & 1))));
          b[j][0] = r[0];
          b[j][1] = r[1];
          b[j + 1][0] = r[2];
          b[j + 1][1] = r[3];
        }
      }
      if (!main) {  // INT8 outlier segment: one k32 step per chunk, fragments as loaded
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_s8(acc_i[i][j], a[i], b[j][0], b[j][1]);
        continue;
      }
      const int64_t k_chunk0 = int64_t(tile) * kTileK + kc * 64;
      if constexpr (kPath == MmaPath::kS4) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_s4(acc_i[i][j], a[i], b[j][0], b[j][1]);
        maybe_fold(k_chunk0 + 64);
      } else {
#pragma unroll
        for (int step = 0; step < 2; ++step) {  // 16 bytes = 32 INT4 values per k32 step
          uint32_t a8[MT][4], b8[NT][2];
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            a8[i][0] = int4_even_x16(a[i][2 * step]);      // row g,   even k
            a8[i][1] = int4_even_x16(a[i][2 * step + 1]);  // row g+8, even k
            a8[i][2] = int4_odd_x16(a[i][2 * step]);       // row g,   odd k
            a8[i][3] = int4_odd_x16(a[i][2 * step + 1]);   // row g+8, odd k
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            if constexpr (kWBits == 4) {
              b8[j][0] = int4_even_x16(b[j][step]);
              b8[j][1] = int4_odd_x16(b[j][step]);
            } else {
              // INT3 block (2kc + step) of row n = wn0 + 8j + g: this lane needs its low-bit word t/2 and word 2
              // (32-bit shared loads: blocks sit at multiples of 12 bytes).
              const uint32_t* blk = reinterpret_cast<const uint32_t*>(ws + (wn0 + j * 8 + g) * kInt3TileBytes +
                                                                      (2 * kc + step) * kInt3BlockBytes);
              int3_lane_x32(int3_word(blk, t >> 1), int3_word(blk, 2), t, b8[j][0], b8[j][1]);
            }
          }
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j) mma_s8(acc_i[i][j], a8[i], b8[j][0], b8[j][1]);
          maybe_fold(k_chunk0 + 32 * (step + 1));
        }
      }
    }
  };

  // Pipeline: STAGES-1 tiles in flight ahead of the one being computed.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles_total) load_tile(s, s);
    cp_async_commit();
  }
  for (int tile = 0; tile < tiles_total; ++tile) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of `tile` have landed ...
    __syncthreads();              // ... everyone's have, and everyone is done with tile - 1's slot
    const int ahead = tile + STAGES - 1;
    if (ahead < tiles_total) load_tile(ahead % STAGES, ahead);
    cp_async_commit();
    compute_tile(tile % STAGES, tile);
  }
  cp_async_wait<0>();

  // Epilogue: outlier fold (acc_i was zeroed by the last group fold), bias, convert, store.
  float so_m[MT][2], so_n[NT][2];
  if (p.ko > 0) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) so_m[i][h] = __half2float(p.sao[min(row_of(i, h), int64_t(p.m) - 1)]);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) so_n[j][c] = __half2float(p.swo[min(col_of(j, c), int64_t(p.n) - 1)]);
  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t row = row_of(i, r >> 1), col = col_of(j, r & 1);
        if (row >= p.m || col >= p.n) continue;
        float y = acc_f[i][j][r];
        if (p.ko > 0)
          y = gemm_accumulate(y, static_cast<float>(acc_i[i][j][r]), gemm_scale_product(so_m[i][r >> 1], so_n[j][r & 1]));
        if (p.bias != nullptr) y = __fadd_rn(y, p.bias[col]);
        const int64_t idx = row * p.n + col;
        if (p.out_kind == kOutHalf)
          static_cast<__half*>(p.out)[idx] = __float2half_rn(y);
        else if (p.out_kind == kOutBFloat16)
          static_cast<__nv_bfloat16*>(p.out)[idx] = __float2bfloat16_rn(y);
        else
          static_cast<float*>(p.out)[idx] = y;
      }
}

}  // namespace gemm
}  // namespace bisup
