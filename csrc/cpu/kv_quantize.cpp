// CPU twin of kv_quantize / kv_dequantize: asymmetric per-token, per-head quantization of KV
// rows along head_dim into 3/4/8-bit codes (layout: csrc/kv_format.h).
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include "checks.h"
#include "kv_format.h"
#include "ops.h"

namespace bisup {

void check_kv_bits_and_group(int64_t d, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "bisup: kv bits must be 3, 4 or 8, got ", bits);
  // Groups are whole multiples of 8 values so one packing unit of 8 never straddles two groups.
  check_group_size(d, group_size, 8);
  TORCH_CHECK(bits != 3 || d % 32 == 0, "bisup: 3-bit KV needs head_dim to be a multiple of 32, got ", d);
}

void check_float_dtype(at::ScalarType dt, const char* what) {
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "bisup: ", what,
              " must be float16, bfloat16 or float32, got ", dt);
}

void check_kv_quantize_args(const at::Tensor& x, int64_t bits, int64_t group_size) {
  BISUP_CHECK_FLOAT(x);
  BISUP_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 1, "bisup: kv_quantize needs at least 1 dim (head_dim last)");
  check_kv_bits_and_group(x.size(-1), bits, group_size);
}

int64_t check_kv_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                                 int64_t bits, int64_t group_size) {
  BISUP_CHECK_DTYPE(q, at::kByte);
  BISUP_CHECK_DTYPE(scale, at::kHalf);
  BISUP_CHECK_DTYPE(zero, at::kHalf);
  BISUP_CHECK_CONTIGUOUS(q);
  BISUP_CHECK_CONTIGUOUS(scale);
  BISUP_CHECK_CONTIGUOUS(zero);
  BISUP_CHECK_SAME_DEVICE(q, scale);
  BISUP_CHECK_SAME_DEVICE(q, zero);
  TORCH_CHECK(q.dim() >= 1, "bisup: kv_dequantize needs at least 1 dim");
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "bisup: kv bits must be 3, 4 or 8, got ", bits);
  const int64_t nb = q.size(-1);
  TORCH_CHECK(bits != 3 || nb % 12 == 0, "bisup: 3-bit KV rows are whole 12-byte blocks, got ", nb, " bytes");
  const int64_t d = bits == 8 ? nb : bits == 4 ? nb * 2 : nb / 12 * 32;
  check_kv_bits_and_group(d, bits, group_size);
  auto expect = q.sizes().vec();
  expect.back() = num_groups(d, group_size);
  TORCH_CHECK(scale.sizes().vec() == expect, "bisup: scale must have shape ", at::IntArrayRef(expect),
              " for packed KV of shape ", q.sizes(), " (", bits, "-bit, group_size ", group_size, "), got ",
              scale.sizes());
  TORCH_CHECK(zero.sizes() == scale.sizes(), "bisup: zero must have the shape of scale ", scale.sizes(), ", got ",
              zero.sizes());
  return d;
}

namespace {

template <typename T>
void kv_quantize_rows(const T* x, uint8_t* q, c10::Half* scale, c10::Half* zero, int64_t rows, int64_t d,
                      int64_t group, int bits) {
  const int64_t groups = d / group, row_bytes = kv_row_bytes(d, bits);
  const int unit = kv_unit_values(bits), unit_bytes = unit * bits / 8;
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    std::vector<float> s(groups), z(groups);
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * d;
      for (int64_t g = 0; g < groups; ++g) {
        float lo = static_cast<float>(xr[g * group]), hi = lo;
        for (int64_t i = 1; i < group; ++i) {
          const float v = static_cast<float>(xr[g * group + i]);
          lo = fminf(lo, v);
          hi = fmaxf(hi, v);
        }
        kv_group_params(lo, hi, bits, &s[g], &z[g]);
        scale[r * groups + g] = c10::Half(s[g]);
        zero[r * groups + g] = c10::Half(z[g]);
      }
      uint8_t codes[32];
      for (int64_t u = 0; u < d / unit; ++u) {
        for (int i = 0; i < unit; ++i) {
          const int64_t k = u * unit + i;
          codes[i] = static_cast<uint8_t>(quantize_asym(static_cast<float>(xr[k]), s[k / group], z[k / group], bits));
        }
        kv_pack_unit(codes, q + r * row_bytes + u * unit_bytes, bits);
      }
    }
  });
}

template <typename T>
void kv_dequantize_rows(const uint8_t* q, const c10::Half* scale, const c10::Half* zero, T* out, int64_t rows,
                        int64_t d, int64_t group, int bits) {
  const int64_t groups = d / group, row_bytes = kv_row_bytes(d, bits);
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
  auto qshape = x.sizes().vec();
  qshape.back() = kv_row_bytes(d, static_cast<int>(bits));
  auto sshape = x.sizes().vec();
  sshape.back() = num_groups(d, group_size);
  auto q = at::empty(qshape, x.options().dtype(at::kByte));
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
  const int64_t d = check_kv_dequantize_args(q, scale, zero, bits, group_size);
  check_float_dtype(out_dtype, "kv_dequantize out_dtype");
  auto shape = q.sizes().vec();
  shape.back() = d;
  auto out = at::empty(shape, q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "kv_dequantize_cpu", [&] {
    kv_dequantize_rows<scalar_t>(q.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>(),
                                 out.data_ptr<scalar_t>(), out.numel() / d, d, effective_group(d, group_size),
                                 static_cast<int>(bits));
  });
  return out;
}

}  // namespace bisup
