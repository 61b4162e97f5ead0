// CPU twin of the INT4 / INT3 packing ops. Formats: docs/formats.md; semantics: bisup/reference.py.
#include <ATen/Parallel.h>

#include "checks.h"
#include "ops.h"
#include "pack_format.h"
#include "quant_math.h"

namespace bisup {

namespace {

// Range check on the host: out-of-range values would silently wrap into other codes.
void check_range(const at::Tensor& q, int bits, bool is_signed, const char* op) {
  if (q.numel() == 0) return;
  const int lo = code_min(bits, is_signed), hi = code_max(bits, is_signed);
  auto [mn, mx] = at::aminmax(q);
  const int vmin = mn.item<int8_t>(), vmax = mx.item<int8_t>();
  TORCH_CHECK(vmin >= lo && vmax <= hi, "bisup: ", op, " expects ", is_signed ? "signed" : "unsigned",
              " ", bits, "-bit values in [", lo, ", ", hi, "], got values in [", vmin, ", ", vmax, "]");
}

}  // namespace

at::Tensor pack_int4_cpu(const at::Tensor& q, bool is_signed) {
  const int64_t kp = check_pack_int4_args(q);
  check_range(q, 4, is_signed, "pack_int4");
  auto out = at::empty(with_last_dim(q, kp), q.options().dtype(at::kByte));
  const int8_t* src = q.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = pack_nibbles(src[2 * i], src[2 * i + 1]);
  });
  return out;
}

at::Tensor unpack_int4_cpu(const at::Tensor& packed, bool is_signed) {
  const int64_t k = check_unpack_int4_args(packed);
  auto out = at::empty(with_last_dim(packed, k), packed.options().dtype(at::kChar));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, packed.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      dst[2 * i] = nibble_value(src[i] & 0xF, is_signed);
      dst[2 * i + 1] = nibble_value(src[i] >> 4, is_signed);
    }
  });
  return out;
}

at::Tensor pack_int3_cpu(const at::Tensor& q, bool is_signed) {
  const int64_t kp = check_pack_int3_args(q);
  check_range(q, 3, is_signed, "pack_int3");
  auto out = at::empty(with_last_dim(q, kp), q.options().dtype(at::kByte));
  const int8_t* src = q.data_ptr<int8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>());
  const int64_t blocks = q.numel() / kInt3BlockValues;
  at::parallel_for(0, blocks, 1 << 12, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk)
      pack_int3_block(src + blk * kInt3BlockValues, dst + blk * kInt3BlockWords);
  });
  return out;
}

at::Tensor unpack_int3_cpu(const at::Tensor& packed, bool is_signed) {
  const int64_t k = check_unpack_int3_args(packed);
  auto out = at::empty(with_last_dim(packed, k), packed.options().dtype(at::kChar));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(packed.data_ptr<uint8_t>());
  int8_t* dst = out.data_ptr<int8_t>();
  const int64_t blocks = out.numel() / kInt3BlockValues;
  at::parallel_for(0, blocks, 1 << 12, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk)
      for (int i = 0; i < kInt3BlockValues; ++i)
        dst[blk * kInt3BlockValues + i] = int3_value(src + blk * kInt3BlockWords, i, is_signed);
  });
  return out;
}

}  // namespace bisup
