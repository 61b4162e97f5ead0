// CPU twin of quantize_pack / dequantize: per-row group quantization into INT4 nibbles.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include "checks.h"
#include "ops.h"
#include "pack_format.h"
#include "quant_math.h"

namespace bisup {

namespace {

template <typename T>
void quantize_rows(const T* x, uint8_t* q, c10::Half* scale, c10::Half* zero, int64_t rows, int64_t k,
                   int64_t group, int bits, bool sym, float clip) {
  const int64_t groups = k / group;
  at::parallel_for(0, rows * groups, 64, [&](int64_t b, int64_t e) {
    for (int64_t rg = b; rg < e; ++rg) {
      const T* xg = x + rg * group;  // groups are consecutive in memory
      uint8_t* qg = q + packed_row_bytes(4, rg * group);
      float lo = 0.f, hi = 0.f, amax = 0.f;
      for (int64_t i = 0; i < group; ++i) {
        const float v = static_cast<float>(xg[i]);
        lo = i ? fminf(lo, v) : v;
        hi = i ? fmaxf(hi, v) : v;
        amax = fmaxf(amax, fabsf(v));
      }
      const GroupParams gp = sym ? sym_group_params(amax, clip, bits) : asym_group_params(lo, hi, clip, bits);
      const float s = gp.scale, z = gp.zero;
      scale[rg] = c10::Half(s);
      if (!sym) zero[rg] = c10::Half(z);
      for (int64_t i = 0; i < group; i += 2) {
        const float a = static_cast<float>(xg[i]), c = static_cast<float>(xg[i + 1]);
        const int qa = sym ? quantize_sym(a, s, bits) : quantize_asym(a, s, z, bits);
        const int qc = sym ? quantize_sym(c, s, bits) : quantize_asym(c, s, z, bits);
        qg[i / 2] = pack_nibbles(static_cast<int8_t>(qa), static_cast<int8_t>(qc));
      }
    }
  });
}

template <typename T>
void dequantize_rows(const uint8_t* q, const c10::Half* scale, const c10::Half* zero, T* out,
                     int64_t rows, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  const bool sym = zero == nullptr;
  at::parallel_for(0, rows * groups, 64, [&](int64_t b, int64_t e) {
    for (int64_t rg = b; rg < e; ++rg) {
      const float s = static_cast<float>(scale[rg]);
      const float z = sym ? 0.f : static_cast<float>(zero[rg]);
      for (int64_t i = 0; i < group; ++i) {
        const uint8_t byte = q[(rg * group + i) / 2];
        const int v = nibble_value(i % 2 ? byte >> 4 : byte & 0xF, sym);
        out[rg * group + i] = static_cast<T>((float(v) - z) * s);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cpu(const at::Tensor& x, int64_t bits,
                                                                 int64_t group_size, bool sym,
                                                                 double clip_ratio) {
  check_quantize_pack_args(x, bits, group_size, clip_ratio);
  const int64_t k = x.size(-1), rows = x.numel() / std::max<int64_t>(k, 1);
  const int64_t group = effective_group(k, group_size);
  const auto sshape = with_last_dim(x, num_groups(k, group_size));
  auto q = at::empty(with_last_dim(x, packed_row_bytes(4, k)), x.options().dtype(at::kByte));
  auto scale = at::empty(sshape, x.options().dtype(at::kHalf));
  auto zero = sym ? at::empty({0}, x.options().dtype(at::kHalf)) : at::empty(sshape, x.options().dtype(at::kHalf));
  if (x.numel() == 0) return {q, scale, zero};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_pack_cpu", [&] {
    quantize_rows<scalar_t>(x.data_ptr<scalar_t>(), q.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(),
                            sym ? nullptr : zero.data_ptr<c10::Half>(), rows, k, group, static_cast<int>(bits),
                            sym, static_cast<float>(clip_ratio));
  });
  return {q, scale, zero};
}

at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                          int64_t group_size, at::ScalarType out_dtype) {
  check_dequantize_args(q, scale, zero, group_size);
  const int64_t k = packed_row_values(4, q.size(-1)), rows = q.numel() / std::max<int64_t>(q.size(-1), 1);
  auto out = at::empty(with_last_dim(q, k), q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_cpu", [&] {
    dequantize_rows<scalar_t>(q.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(),
                              zero.has_value() ? zero->data_ptr<c10::Half>() : nullptr, out.data_ptr<scalar_t>(),
                              rows, k, effective_group(k, group_size));
  });
  return out;
}

}  // namespace bisup
