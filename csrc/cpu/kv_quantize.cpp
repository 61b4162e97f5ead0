// CPU twin of kv_quantize / kv_dequantize: asymmetric per-token, per-head quantization of KV
// rows along head_dim into 3/4/8-bit codes (layout: csrc/kv_format.h).
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <vector>

#include "checks.h"
#include "kv_format.h"
#include "ops.h"

namespace bisup {

namespace {

template <typename T>
void kv_quantize_rows(const T* x, uint8_t* q, c10::Half* scale, c10::Half* zero, int64_t rows, int64_t d,
                      int64_t group, int bits) {
  const int64_t groups = d / group, row_bytes = packed_row_bytes(bits, d);
  const int unit = kv_unit_values(bits);
  const int64_t unit_bytes = packed_row_bytes(bits, unit);
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    std::vector<GroupParams> params(groups);
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * d;
      for (int64_t g = 0; g < groups; ++g) {
        float lo = static_cast<float>(xr[g * group]), hi = lo;
        for (int64_t i = 1; i < group; ++i) {
          const float v = static_cast<float>(xr[g * group + i]);
          lo = fminf(lo, v);
          hi = fmaxf(hi, v);
        }
        params[g] = kv_group_params(lo, hi, bits);
        scale[r * groups + g] = c10::Half(params[g].scale);
        zero[r * groups + g] = c10::Half(params[g].zero);
      }
      uint8_t codes[kInt3BlockValues];  // the largest unit
      for (int64_t u = 0; u < d / unit; ++u) {
        for (int i = 0; i < unit; ++i) {
          const int64_t k = u * unit + i;
          const GroupParams& gp = params[k / group];
          codes[i] = static_cast<uint8_t>(quantize_asym(static_cast<float>(xr[k]), gp.scale, gp.zero, bits));
        }
        kv_pack_unit(codes, q + r * row_bytes + u * unit_bytes, bits);
      }
    }
  });
}

template <typename T>
void kv_dequantize_rows(const uint8_t* q, const c10::Half* scale, const c10::Half* zero, T* out, int64_t rows,
                        int64_t d, int64_t group, int bits) {
  const int64_t groups = d / group, row_bytes = packed_row_bytes(bits, d);
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t k = 0; k < d; ++k) {
        const int64_t g = r * groups + k / group;
        const float v = (float(kv_code(q + r * row_bytes, int(k), bits)) - static_cast<float>(zero[g])) *
                        static_cast<float>(scale[g]);
        out[r * d + k] = static_cast<T>(v);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cpu(const at::Tensor& x, int64_t bits,
                                                               int64_t group_size) {
  check_kv_quantize_args(x, bits, group_size);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const auto sshape = with_last_dim(x, num_groups(d, group_size));
  auto q = at::empty(with_last_dim(x, packed_row_bytes(static_cast<int>(bits), d)), x.options().dtype(at::kByte));
  auto scale = at::empty(sshape, x.options().dtype(at::kHalf));
  auto zero = at::empty(sshape, x.options().dtype(at::kHalf));
  if (x.numel() == 0) return {q, scale, zero};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kv_quantize_cpu", [&] {
    kv_quantize_rows<scalar_t>(x.data_ptr<scalar_t>(), q.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(),
                               zero.data_ptr<c10::Half>(), rows, d, effective_group(d, group_size),
                               static_cast<int>(bits));
  });
  return {q, scale, zero};
}

at::Tensor kv_dequantize_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                             int64_t group_size, at::ScalarType out_dtype) {
  const int64_t d = check_kv_dequantize_args(q, scale, zero, bits, group_size, out_dtype);
  auto out = at::empty(with_last_dim(q, d), q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "kv_dequantize_cpu", [&] {
    kv_dequantize_rows<scalar_t>(q.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>(),
                                 out.data_ptr<scalar_t>(), out.numel() / d, d, effective_group(d, group_size),
                                 static_cast<int>(bits));
  });
  return out;
}

}  // namespace bisup
