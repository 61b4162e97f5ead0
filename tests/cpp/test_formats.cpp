// The shared format helpers (pack_format.h, kv_format.h, quant_math.h): every INT3 access path
// (word reads, unaligned byte reads, the 4-per-register quad, the GEMM's x32 form, the KV unit
// packer) agrees with the one encoder, and the row-size and group-parameter helpers hold their
// documented values.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "kv_format.h"
#include "pack_format.h"
#include "quant_math.h"

namespace {

using namespace bisup;

TEST(Formats, PackedRowSizes) {
  EXPECT_EQ(packed_row_bytes(8, 64), 64);
  EXPECT_EQ(packed_row_bytes(4, 64), 32);
  EXPECT_EQ(packed_row_bytes(3, 64), 24);
  for (int bits : {3, 4, 8})
    for (int64_t k : {32, 96, 4096}) EXPECT_EQ(packed_row_values(bits, packed_row_bytes(bits, k)), k) << bits;
  EXPECT_EQ(kInt3BlockBytes, 12);
  EXPECT_EQ(packed_row_bytes(3, kInt3BlockValues), kInt3BlockBytes);
  EXPECT_EQ(kv_unit_values(3), kInt3BlockValues);
  EXPECT_EQ(packed_row_bytes(4, kv_unit_values(4)), 4);
}

TEST(Formats, Int3DecodersAgreeWithTheEncoder) {
  std::mt19937 rng(0);
  for (int trial = 0; trial < 50; ++trial) {
    int8_t v[kInt3BlockValues];
    for (int8_t& x : v) x = static_cast<int8_t>(int(rng() % 8) - 4);  // signed [-4, 3]
    uint32_t words[kInt3BlockWords];
    pack_int3_block(v, words);
    uint8_t bytes[kInt3BlockBytes + 1];  // one byte of offset: an unaligned block
    std::memcpy(bytes + 1, words, sizeof(words));
    for (int i = 0; i < kInt3BlockValues; ++i) {
      EXPECT_EQ(int3_value(words, i, true), v[i]);
      EXPECT_EQ(int3_value(bytes + 1, i, true), v[i]);
      EXPECT_EQ(int3_code(words, i), v[i] & 7);
    }
    for (int s = 0; s < kInt3BlockValues / 4; ++s) {
      const uint32_t quad = int3_quad(words[s / 4], words[2], s);
      for (int b = 0; b < 4; ++b) {
        EXPECT_EQ(int((quad >> (8 * b)) & 0xFF), v[4 * s + b] & 7);
        // The GEMM's INT8 form (gemm_ptx.cuh int3_quad_x32): the code in bits 5-7 is 32 * value.
        EXPECT_EQ(static_cast<int8_t>(static_cast<uint8_t>((quad << 5) >> (8 * b))), 32 * v[4 * s + b]);
      }
    }
  }
}

TEST(Formats, KvUnitsUseTheSharedLayouts) {
  uint8_t codes[kInt3BlockValues];
  for (int i = 0; i < kInt3BlockValues; ++i) codes[i] = static_cast<uint8_t>((5 * i + 3) % 8);
  uint8_t out[kInt3BlockBytes + 1];
  kv_pack_unit(codes, out + 1, 3);
  uint32_t words[kInt3BlockWords];
  pack_int3_block(codes, words);
  EXPECT_EQ(std::memcmp(out + 1, words, sizeof(words)), 0);
  for (int i = 0; i < kInt3BlockValues; ++i) EXPECT_EQ(kv_code(out + 1, i, 3), codes[i]);
  for (int i = 0; i < kKvUnitValues; ++i) codes[i] = static_cast<uint8_t>(15 - i);
  kv_pack_unit(codes, out, 4);
  for (int i = 0; i < kKvUnitValues; ++i) EXPECT_EQ(kv_code(out, i, 4), 15 - i);
  EXPECT_EQ(out[0], pack_nibbles(15, 14));
}

TEST(Formats, GroupParams) {
  EXPECT_EQ(code_min(4, true), -8);
  EXPECT_EQ(code_max(4, true), 7);
  EXPECT_EQ(code_max(3, false), 7);
  const GroupParams sym = sym_group_params(7.0f, 1.0f, 4);  // 7 / 7
  EXPECT_EQ(sym.scale, 1.0f);
  EXPECT_EQ(sym.zero, 0.0f);
  const GroupParams asym = asym_group_params(-2.0f, 13.0f, 1.0f, 4);  // 15 / 15, z = round(2 / 1)
  EXPECT_EQ(asym.scale, 1.0f);
  EXPECT_EQ(asym.zero, 2.0f);
  const GroupParams clipped = asym_group_params(-4.0f, 26.0f, 0.5f, 4);  // (13 + 2) / 15
  EXPECT_EQ(clipped.scale, 1.0f);
  EXPECT_EQ(clipped.zero, 2.0f);
  const GroupParams zeros = kv_group_params(0.0f, 0.0f, 3);  // an all-zero group: scale 1, never 0
  EXPECT_EQ(zeros.scale, 1.0f);
  EXPECT_EQ(zeros.zero, 0.0f);
}

}  // namespace
