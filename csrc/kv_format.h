// The packed layout of quantized KV-cache rows (one row = one token of one head, head_dim D
// values), shared by the CPU twins and the CUDA kernels. docs/formats.md ("KV cache") has the
// contract; bisup/reference.py (kv_quantize / kv_dequantize) the semantics.
//
//   bits 8: one uint8 code per value, D bytes per row
//   bits 4: unsigned INT4 nibbles (element 2i in the low nibble of byte i), D/2 bytes per row
//   bits 3: unsigned INT3 blocks of 32 values (3 little-endian uint32 words), 3D/8 bytes per row
//
// Codes are asymmetric: value = (code - zero) * scale with one fp16 scale / zero per group of
// `group_size` consecutive values along D (the same math as quantize_pack with sym=False).
#pragma once
#include <cstdint>

#include "quant_math.h"

namespace bisup {

// Values per packing unit: the smallest run of values whose bytes no other value shares.
BISUP_HD int kv_unit_values(int bits) { return bits == 3 ? 32 : 8; }

BISUP_HD int64_t kv_row_bytes(int64_t d, int bits) {
  return bits == 8 ? d : bits == 4 ? d / 2 : d / 32 * 12;
}

// Code of value i of a packed row (byte reads only, so any alignment works).
BISUP_HD int kv_code(const uint8_t* row, int i, int bits) {
  if (bits == 8) return row[i];
  if (bits == 4) {
    const uint8_t b = row[i >> 1];
    return (i & 1) ? (b >> 4) : (b & 0xF);
  }
  // INT3 (docs/formats.md): low 2 bits of value 16h + 4s + b live in byte b of word h at bit 2s;
  // bit 2 of value 4s + b lives in byte b of word 2 at bit s.
  const uint8_t* blk = row + (i >> 5) * 12;
  const int v = i & 31, j = v & 15;
  const int lo = (blk[4 * (v >> 4) + (j & 3)] >> (2 * (j >> 2))) & 3;
  const int hi = (blk[8 + (v & 3)] >> (v >> 2)) & 1;
  return lo | (hi << 2);
}

// Packs the codes of one unit (kv_unit_values(bits) values starting at a unit boundary) into
// `out` (bits*unit/8 bytes).
BISUP_HD void kv_pack_unit(const uint8_t* codes, uint8_t* out, int bits) {
  if (bits == 8) {
    for (int i = 0; i < 8; ++i) out[i] = codes[i];
  } else if (bits == 4) {
    for (int i = 0; i < 4; ++i) out[i] = static_cast<uint8_t>((codes[2 * i] & 0xF) | (codes[2 * i + 1] << 4));
  } else {
    for (int i = 0; i < 12; ++i) out[i] = 0;
    for (int v = 0; v < 32; ++v) {
      const int j = v & 15;
      out[4 * (v >> 4) + (j & 3)] |= static_cast<uint8_t>((codes[v] & 3) << (2 * (j >> 2)));
      out[8 + (v & 3)] |= static_cast<uint8_t>(((codes[v] >> 2) & 1) << (v >> 2));
    }
  }
}

// Asymmetric group parameters from the group's range (clip ratio 1), exactly as quantize_pack:
// s = finalize_scale((hi - lo) / (2^b - 1)), z = zero_point(lo, s).
BISUP_HD void kv_group_params(float lo, float hi, int bits, float* s, float* z) {
  const float qmax = float((1 << bits) - 1);
  *s = finalize_scale((1.0f * hi - 1.0f * lo) / qmax);
  *z = zero_point(1.0f * lo, *s);
}

}  // namespace bisup
