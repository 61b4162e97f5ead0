// The bit layouts of packed INT4 / INT3 data (docs/formats.md) and the only code that encodes or
// decodes them: host/device inline functions used by the packing ops, the KV-cache rows
// (kv_format.h) and the GEMM (CPU twin and CUDA kernel).
//
// INT4: element 2i in the LOW nibble of byte i, element 2i+1 in the high nibble; signed values
// are two's complement nibbles.
//
// INT3: blocks of 32 values along K, 3 little-endian uint32 words (12 bytes) per block:
//   word 0: low 2 bits of values 0..15,  value 4s+b (s<4, b<4) at bits [8b+2s, 8b+2s+1]
//   word 1: low 2 bits of values 16..31, same placement for value 16+4s+b
//   word 2: bit 2 of values 0..31,       value 4s+b (s<8, b<4) at bit 8b+s
// so (w >> 2s) & 0x03030303 puts 4 consecutive values into the 4 bytes of a register, and
// ((w2 >> s) & 0x01010101) << 2 adds their third bit: an INT3 -> INT8 unpack is a few LOP3s.
// Signed values are stored as 3-bit two's complement (q & 7).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace bisup {

constexpr int kInt3BlockValues = 32;                  // values per INT3 block
constexpr int kInt3BlockWords = 3;                    // little-endian uint32 words per block
constexpr int kInt3BlockBytes = 4 * kInt3BlockWords;  // 12

// Bytes of a packed row of k values (k a whole number of blocks / pairs): 8 bits one value per
// byte (K), 4 bits two per byte (K/2), 3 bits 12 bytes per 32 values (K/32*12).
BISUP_HD constexpr int64_t packed_row_bytes(int bits, int64_t k) {
  return bits == 8 ? k : bits == 4 ? k / 2 : k / kInt3BlockValues * kInt3BlockBytes;
}

// Values held by a packed row of `bytes` bytes: the inverse of packed_row_bytes.
BISUP_HD constexpr int64_t packed_row_values(int bits, int64_t bytes) {
  return bits == 8 ? bytes : bits == 4 ? bytes * 2 : bytes / kInt3BlockBytes * kInt3BlockValues;
}

// Little-endian uint32 at p, one byte at a time: valid at any alignment (KV rows, tensor views).
BISUP_HD uint32_t load_le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

BISUP_HD void store_le32(uint8_t* p, uint32_t w) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(w >> (8 * i));
}

// ---- INT4 ----

BISUP_HD uint8_t pack_nibbles(int8_t lo, int8_t hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

BISUP_HD int8_t nibble_value(uint8_t nib, bool is_signed) {
  return static_cast<int8_t>(is_signed && nib >= 8 ? int(nib) - 16 : int(nib));
}

// ---- INT3 ----

// The decoder, in its register form: codes (0..7) of values 4s..4s+3 (s < 8) of a block, one per
// byte of the result. low_word is word s/4 of the block (their low 2 bits), high_word word 2.
BISUP_HD uint32_t int3_quad(uint32_t low_word, uint32_t high_word, int s) {
  const uint32_t lo = (low_word >> (2 * (s & 3))) & 0x03030303u;
  const uint32_t hi = (high_word >> s) & 0x01010101u;
  return lo | (hi << 2);
}

// Word w of a block, from aligned words or from bytes at any alignment.
BISUP_HD uint32_t int3_word(const uint32_t* block, int w) { return block[w]; }
BISUP_HD uint32_t int3_word(const uint8_t* block, int w) { return load_le32(block + 4 * w); }

// Code (0..7) of value v (< 32) of a block (Word: uint32_t or uint8_t, see int3_word).
template <typename Word>
BISUP_HD int int3_code(const Word* block, int v) {
  return int((int3_quad(int3_word(block, v >> 4), int3_word(block, 2), v >> 2) >> (8 * (v & 3))) & 7u);
}

// Value v of a block: the code, or its 3-bit two's complement for signed data.
template <typename Word>
BISUP_HD int8_t int3_value(const Word* block, int v, bool is_signed) {
  const int c = int3_code(block, v);
  return static_cast<int8_t>(is_signed && c >= 4 ? c - 8 : c);
}

// The encoder: 32 values (any integer type; the low 3 bits are stored) -> the block's 3 words.
template <typename T>
BISUP_HD void pack_int3_block(const T* v, uint32_t* words) {
  uint32_t w0 = 0, w1 = 0, w2 = 0;
  for (int i = 0; i < kInt3BlockValues; ++i) {
    const uint32_t u = static_cast<uint32_t>(v[i]) & 7u;
    const int j = i & 15;
    const uint32_t lo = (u & 3u) << (8 * (j & 3) + 2 * (j >> 2));
    if (i < kInt3BlockValues / 2) w0 |= lo; else w1 |= lo;
    w2 |= (u >> 2) << (8 * (i & 3) + (i >> 2));
  }
  words[0] = w0;
  words[1] = w1;
  words[2] = w2;
}

}  // namespace bisup
