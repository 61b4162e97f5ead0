// The packed layout of quantized KV-cache rows (one row = one token of one head, head_dim D
// values), shared by the CPU twins and the CUDA kernels. docs/formats.md ("KV cache") has the
// contract; bisup/reference.py (kv_quantize / kv_dequantize) the semantics.
//
// A row is packed_row_bytes(bits, D) bytes (pack_format.h) of unsigned codes:
//   bits 8: one uint8 code per value
//   bits 4: INT4 nibbles (element 2i in the low nibble of byte i)
//   bits 3: INT3 blocks of 32 values (3 little-endian uint32 words)
//
// Codes are asymmetric: value = (code - zero) * scale with one fp16 scale / zero per group of
// `group_size` consecutive values along D (the same math as quantize_pack with sym=False).
#pragma once
#include <cstdint>

#include "pack_format.h"
#include "quant_math.h"

namespace bisup {

// Values per packing unit: the smallest run of values whose bytes no other value shares.
constexpr int kKvUnitValues = 8;  // INT8 / INT4 (4 bytes); INT3 packs whole blocks
BISUP_HD constexpr int kv_unit_values(int bits) { return bits == 3 ? kInt3BlockValues : kKvUnitValues; }

// Code of value i of a packed row (byte reads only, so any alignment works).
BISUP_HD int kv_code(const uint8_t* row, int i, int bits) {
  if (bits == 8) return row[i];
  if (bits == 4) {
    const uint8_t b = row[i >> 1];
    return (i & 1) ? (b >> 4) : (b & 0xF);
  }
  return int3_code(row + (i / kInt3BlockValues) * kInt3BlockBytes, i % kInt3BlockValues);
}

// Packs the codes of one unit (kv_unit_values(bits) values starting at a unit boundary) into
// `out` (packed_row_bytes(bits, unit) bytes, any alignment).
BISUP_HD void kv_pack_unit(const uint8_t* codes, uint8_t* out, int bits) {
  if (bits == 8) {
    for (int i = 0; i < kKvUnitValues; ++i) out[i] = codes[i];
  } else if (bits == 4) {
    for (int i = 0; i < kKvUnitValues / 2; ++i)
      out[i] = pack_nibbles(static_cast<int8_t>(codes[2 * i]), static_cast<int8_t>(codes[2 * i + 1]));
  } else {
    uint32_t words[kInt3BlockWords];
    pack_int3_block(codes, words);
    for (int w = 0; w < kInt3BlockWords; ++w) store_le32(out + 4 * w, words[w]);
  }
}

// KV groups are asymmetric with clip ratio 1, exactly as quantize_pack(sym=False).
BISUP_HD GroupParams kv_group_params(float lo, float hi, int bits) { return asym_group_params(lo, hi, 1.0f, bits); }

}  // namespace bisup
