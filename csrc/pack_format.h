// The bit layouts of INT4 and INT3 data (docs/formats.md), as host/device inline functions used
// by the CPU twins and the CUDA kernels alike.
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

#include "quant_math.h"

namespace bisup {

constexpr int kInt3BlockValues = 32;
constexpr int kInt3BlockBytes = 12;

BISUP_HD uint8_t pack_nibbles(int8_t lo, int8_t hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

BISUP_HD int8_t nibble_value(uint8_t nib, bool is_signed) {
  return static_cast<int8_t>(is_signed && nib >= 8 ? int(nib) - 16 : int(nib));
}

BISUP_HD int8_t int3_value(const uint32_t* words, int i, bool is_signed) {
  const int half = i >> 4, j = i & 15;
  const uint32_t lo = (words[half] >> (8 * (j & 3) + 2 * (j >> 2))) & 3u;
  const uint32_t hi = (words[2] >> (8 * (i & 3) + (i >> 2))) & 1u;
  const int v = int(lo | (hi << 2));
  return static_cast<int8_t>(is_signed && v >= 4 ? v - 8 : v);
}

BISUP_HD void pack_int3_block(const int8_t* v, uint32_t* words) {
  uint32_t w0 = 0, w1 = 0, w2 = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t u = static_cast<uint32_t>(v[i]) & 7u;
    const int j = i & 15;
    const uint32_t lo = (u & 3u) << (8 * (j & 3) + 2 * (j >> 2));
    if (i < 16) w0 |= lo; else w1 |= lo;
    w2 |= (u >> 2) << (8 * (i & 3) + (i >> 2));
  }
  words[0] = w0;
  words[1] = w1;
  words[2] = w2;
}

}  // namespace bisup
