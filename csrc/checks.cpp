// The argument validation of every op (declared in checks.h), called by the CPU twins and the
// CUDA entry points alike. Semantics of the ops: bisup/reference.py; formats: docs/formats.md.
#include "checks.h"

#include <cmath>

#include "gemm_math.h"
#include "hadamard_plan.h"
#include "pack_format.h"

namespace bisup {

// ---- packing ----

int64_t check_pack_int4_args(const at::Tensor& q) {
  BISUP_CHECK_DTYPE(q, at::kChar);
  BISUP_CHECK_CONTIGUOUS(q);
  TORCH_CHECK(q.dim() >= 1, "bisup: pack_int4 needs at least 1 dim");
  TORCH_CHECK(q.size(-1) % 2 == 0, "bisup: pack_int4 needs an even last dim K, got ", q.size(-1));
  return packed_row_bytes(4, q.size(-1));
}

int64_t check_unpack_int4_args(const at::Tensor& packed) {
  BISUP_CHECK_DTYPE(packed, at::kByte);
  BISUP_CHECK_CONTIGUOUS(packed);
  TORCH_CHECK(packed.dim() >= 1, "bisup: unpack_int4 needs at least 1 dim");
  return packed_row_values(4, packed.size(-1));
}

int64_t check_pack_int3_args(const at::Tensor& q) {
  BISUP_CHECK_DTYPE(q, at::kChar);
  BISUP_CHECK_CONTIGUOUS(q);
  TORCH_CHECK(q.dim() >= 1, "bisup: pack_int3 needs at least 1 dim");
  TORCH_CHECK(q.size(-1) % kInt3BlockValues == 0, "bisup: pack_int3 needs the last dim K to be a multiple of ",
              kInt3BlockValues, ", got ", q.size(-1));
  return packed_row_bytes(3, q.size(-1));
}

int64_t check_unpack_int3_args(const at::Tensor& packed) {
  BISUP_CHECK_DTYPE(packed, at::kByte);
  BISUP_CHECK_CONTIGUOUS(packed);
  TORCH_CHECK(packed.dim() >= 1, "bisup: unpack_int3 needs at least 1 dim");
  TORCH_CHECK(packed.size(-1) % kInt3BlockBytes == 0, "bisup: unpack_int3 needs the last dim to be a multiple of ",
              kInt3BlockBytes, " bytes, got ", packed.size(-1));
  return packed_row_values(3, packed.size(-1));
}

// ---- activation quantization ----

void check_quantize_pack_args(const at::Tensor& x, int64_t bits, int64_t group_size, double clip_ratio) {
  BISUP_CHECK_FLOAT(x);
  BISUP_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 1, "bisup: quantize_pack needs at least 1 dim");
  TORCH_CHECK(bits >= 2 && bits <= 4, "bisup: quantize_pack packs into INT4 nibbles, so bits must be in [2, 4], got ",
              bits);
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, "bisup: clip_ratio must be in (0, 1], got ", clip_ratio);
  TORCH_CHECK(x.size(-1) % 2 == 0, "bisup: quantize_pack needs an even last dim K, got ", x.size(-1));
  check_group_size(x.size(-1), group_size, 2);
}

void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                           int64_t group_size) {
  BISUP_CHECK_DTYPE(q, at::kByte);
  BISUP_CHECK_DTYPE(scale, at::kHalf);
  BISUP_CHECK_CONTIGUOUS(q);
  BISUP_CHECK_CONTIGUOUS(scale);
  BISUP_CHECK_SAME_DEVICE(q, scale);
  const int64_t k = packed_row_values(4, q.size(-1));
  check_group_size(k, group_size, 2);
  const auto expect = with_last_dim(q, num_groups(k, group_size));
  TORCH_CHECK(scale.sizes().vec() == expect, "bisup: scale must have shape ", at::IntArrayRef(expect),
              " for packed q of shape ", q.sizes(), " and group_size ", group_size, ", got ", scale.sizes());
  if (zero.has_value()) {
    BISUP_CHECK_DTYPE((*zero), at::kHalf);
    BISUP_CHECK_CONTIGUOUS((*zero));
    BISUP_CHECK_SAME_DEVICE(q, (*zero));
    TORCH_CHECK(zero->sizes() == scale.sizes(), "bisup: zero must have the shape of scale ", scale.sizes(),
                ", got ", zero->sizes());
  }
}

// ---- hadamard transform ----

int64_t check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& base_opt) {
  BISUP_CHECK_FLOAT(x);
  BISUP_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 1, "bisup: hadamard needs at least 1 dim, got a scalar");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 1, "bisup: hadamard needs a non-empty last dim, got shape ", x.sizes());
  int64_t m = 1;
  if (base_opt.has_value()) {
    const at::Tensor& base = *base_opt;
    BISUP_CHECK_DTYPE(base, at::kFloat);
    BISUP_CHECK_DIM(base, 2);
    BISUP_CHECK_CONTIGUOUS(base);
    BISUP_CHECK_SAME_DEVICE(x, base);
    TORCH_CHECK(base.size(0) == base.size(1), "bisup: hadamard base must be square, got shape ", base.sizes());
    m = base.size(0);
    TORCH_CHECK(m >= 1 && n % m == 0, "bisup: hadamard last dim n=", n, " must be a multiple of the base order m=",
                m);
  }
  TORCH_CHECK(is_pow2(n / m), "bisup: hadamard needs n / m to be a power of two, got n=", n, " m=", m,
              " (n / m = ", n / m, "); use bisup.rotation.hadamard_base(n) for the base");
  return m;
}

// ---- KV-cache quantization ----

namespace {

void check_kv_bits_and_group(int64_t d, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "bisup: kv bits must be 3, 4 or 8, got ", bits);
  // Groups are whole multiples of 8 values so one packing unit of 8 never straddles two groups.
  check_group_size(d, group_size, 8);
  TORCH_CHECK(bits != 3 || d % kInt3BlockValues == 0, "bisup: 3-bit KV needs head_dim to be a multiple of ",
              kInt3BlockValues, ", got ", d);
}

}  // namespace

void check_kv_quantize_args(const at::Tensor& x, int64_t bits, int64_t group_size) {
  BISUP_CHECK_FLOAT(x);
  BISUP_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 1, "bisup: kv_quantize needs at least 1 dim (head_dim last)");
  check_kv_bits_and_group(x.size(-1), bits, group_size);
}

int64_t check_kv_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                                 int64_t bits, int64_t group_size, at::ScalarType out_dtype) {
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
  TORCH_CHECK(bits != 3 || nb % kInt3BlockBytes == 0, "bisup: 3-bit KV rows are whole ", kInt3BlockBytes,
              "-byte blocks, got ", nb, " bytes");
  const int64_t d = packed_row_values(static_cast<int>(bits), nb);
  check_kv_bits_and_group(d, bits, group_size);
  const auto expect = with_last_dim(q, num_groups(d, group_size));
  TORCH_CHECK(scale.sizes().vec() == expect, "bisup: scale must have shape ", at::IntArrayRef(expect),
              " for packed KV of shape ", q.sizes(), " (", bits, "-bit, group_size ", group_size, "), got ",
              scale.sizes());
  TORCH_CHECK(zero.sizes() == scale.sizes(), "bisup: zero must have the shape of scale ", scale.sizes(), ", got ",
              zero.sizes());
  check_float_dtype(out_dtype, "kv_dequantize out_dtype");
  return d;
}

// ---- mixed-precision attention ----

AttentionDims check_attention_args(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                                   const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                                   const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero,
                                   int64_t kv_bits, int64_t group_size, std::optional<double> softmax_scale,
                                   const std::optional<at::Tensor>& seq_lens, int64_t window) {
  BISUP_CHECK_FLOAT(q);
  BISUP_CHECK_DIM(q, 4);
  BISUP_CHECK_DIM(k_prompt, 4);
  BISUP_CHECK_DIM(v_prompt, 4);
  BISUP_CHECK_DIM(k_q, 4);
  BISUP_CHECK_DIM(v_q, 4);
  BISUP_CHECK_CONTIGUOUS(q);
  BISUP_CHECK_CONTIGUOUS(k_prompt);
  BISUP_CHECK_CONTIGUOUS(v_prompt);
  for (const at::Tensor* t : {&k_prompt, &v_prompt, &k_q, &k_scale, &k_zero, &v_q, &v_scale, &v_zero}) {
    TORCH_CHECK(t->device() == q.device(), "bisup: attention needs every tensor on q's device ", q.device(),
                ", got one on ", t->device());
  }
  TORCH_CHECK(k_prompt.scalar_type() == q.scalar_type() && v_prompt.scalar_type() == q.scalar_type(),
              "bisup: k_prompt / v_prompt must have q's dtype ", q.scalar_type(), ", got ", k_prompt.scalar_type(),
              " / ", v_prompt.scalar_type());
  AttentionDims a;
  a.b = q.size(0);
  a.hq = q.size(1);
  a.tq = q.size(2);
  a.d = q.size(3);
  a.hkv = k_prompt.size(1);
  a.p = k_prompt.size(2);
  a.s = k_q.size(2);
  a.bits = kv_bits;
  TORCH_CHECK(window >= 0, "bisup: attention window must be >= 0 (0: no sliding window), got ", window);
  a.window = window;
  TORCH_CHECK(k_prompt.size(0) == a.b && k_prompt.size(3) == a.d, "bisup: k_prompt must be [B=", a.b,
              ", Hkv, P, D=", a.d, "], got ", k_prompt.sizes());
  TORCH_CHECK(v_prompt.sizes() == k_prompt.sizes(), "bisup: v_prompt must have k_prompt's shape ",
              k_prompt.sizes(), ", got ", v_prompt.sizes());
  TORCH_CHECK(a.hkv > 0 && a.hq % a.hkv == 0, "bisup: the number of query heads (", a.hq,
              ") must be a multiple of the number of KV heads (", a.hkv, ")");
  const int64_t dk = check_kv_dequantize_args(k_q, k_scale, k_zero, kv_bits, group_size, q.scalar_type());
  check_kv_dequantize_args(v_q, v_scale, v_zero, kv_bits, group_size, q.scalar_type());
  TORCH_CHECK(dk == a.d, "bisup: k_q rows of ", k_q.size(3), " bytes hold ", dk, " values at ", kv_bits,
              " bits, but head_dim is ", a.d);
  TORCH_CHECK(k_q.size(0) == a.b && k_q.size(1) == a.hkv, "bisup: k_q must be [B=", a.b, ", Hkv=", a.hkv,
              ", S, bytes], got ", k_q.sizes());
  TORCH_CHECK(v_q.sizes() == k_q.sizes(), "bisup: v_q must have k_q's shape ", k_q.sizes(), ", got ", v_q.sizes());
  a.group = effective_group(a.d, group_size);
  a.scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(a.d));
  TORCH_CHECK(std::isfinite(a.scale), "bisup: softmax_scale must be finite, got ", a.scale);
  if (seq_lens.has_value()) {
    const at::Tensor& sl = *seq_lens;
    TORCH_CHECK(sl.scalar_type() == at::kInt || sl.scalar_type() == at::kLong,
                "bisup: seq_lens must be int32 or int64, got ", sl.scalar_type());
    TORCH_CHECK(sl.dim() == 1 && sl.size(0) == a.b, "bisup: seq_lens must have shape [B=", a.b, "], got ",
                sl.sizes());
    TORCH_CHECK(sl.device() == q.device(), "bisup: seq_lens is on ", sl.device(), " but q is on ", q.device());
    if (a.b > 0) {
      const auto [lo, hi] = at::aminmax(sl);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      TORCH_CHECK(lo_v >= 0 && hi_v <= a.s, "bisup: seq_lens (valid lengths of the quantized segment) must be in [0, S=",
                  a.s, "], got values in [", lo_v, ", ", hi_v, "]");
    }
  }
  return a;
}

// ---- W4A4 / W3A3 group-scaled GEMM ----

namespace {

void check_optional_float_vector(const std::optional<at::Tensor>& t, int64_t len, const char* what,
                                 const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "bisup: gemm ", what, " must have shape [", len, "], got ",
              t->sizes());
  BISUP_CHECK_SAME_DEVICE(like, (*t));
}

}  // namespace

GemmDims check_gemm_args(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q,
                         const at::Tensor& w_scale, int64_t a_bits, int64_t w_bits, int64_t group_size,
                         at::ScalarType out_dtype, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& a_outlier, const std::optional<at::Tensor>& a_outlier_scale,
                         const std::optional<at::Tensor>& w_outlier,
                         const std::optional<at::Tensor>& w_outlier_scale) {
  TORCH_CHECK(a_bits == 3 || a_bits == 4, "bisup: gemm supports a_bits 3 or 4, got ", a_bits);
  TORCH_CHECK(w_bits == 3 || w_bits == 4, "bisup: gemm supports w_bits 3 or 4, got ", w_bits);
  check_float_dtype(out_dtype, "gemm out_dtype");
  BISUP_CHECK_DTYPE(a_q, at::kByte);
  BISUP_CHECK_DTYPE(w_q, at::kByte);
  BISUP_CHECK_DIM(a_q, 2);
  BISUP_CHECK_DIM(w_q, 2);
  BISUP_CHECK_CONTIGUOUS(a_q);
  BISUP_CHECK_CONTIGUOUS(w_q);
  BISUP_CHECK_SAME_DEVICE(a_q, w_q);
  GemmDims d{};
  d.m = a_q.size(0);
  d.n = w_q.size(0);
  d.k = packed_row_values(4, a_q.size(1));  // A is always INT4 nibbles (a_bits <= 4)
  TORCH_CHECK(d.k > 0 && d.k % kGemmKMultiple == 0, "bisup: gemm needs K (= 2 * a_q.size(1)) to be a positive multiple of ",
              kGemmKMultiple, ", got K=", d.k);
  const int64_t w_cols = packed_row_bytes(static_cast<int>(w_bits), d.k);
  TORCH_CHECK(w_q.size(1) == w_cols, "bisup: gemm with w_bits=", w_bits, " and K=", d.k, " expects w_q of shape [N, ",
              w_cols, "] (", w_bits == 4 ? "pack_int4" : "pack_int3", "), got ", w_q.sizes());
  check_group_size(d.k, group_size, kGemmKMultiple);
  d.group = effective_group(d.k, group_size);
  d.groups = num_groups(d.k, group_size);
  TORCH_CHECK(d.group <= kGemmMaxGroup, "bisup: gemm accumulates each group in int32, so the group size must be <= ",
              kGemmMaxGroup, ", got ", d.group, " (use a smaller group_size)");
  BISUP_CHECK_DTYPE(a_scale, at::kHalf);
  BISUP_CHECK_DTYPE(w_scale, at::kHalf);
  BISUP_CHECK_CONTIGUOUS(a_scale);
  BISUP_CHECK_CONTIGUOUS(w_scale);
  BISUP_CHECK_SAME_DEVICE(a_q, a_scale);
  BISUP_CHECK_SAME_DEVICE(a_q, w_scale);
  TORCH_CHECK(a_scale.dim() == 2 && a_scale.size(0) == d.m && a_scale.size(1) == d.groups,
              "bisup: gemm a_scale must have shape [", d.m, ", ", d.groups, "] (M, K/group_size), got ", a_scale.sizes());
  TORCH_CHECK(w_scale.dim() == 2 && w_scale.size(0) == d.n && w_scale.size(1) == d.groups,
              "bisup: gemm w_scale must have shape [", d.n, ", ", d.groups, "] (N, K/group_size), got ", w_scale.sizes());
  if (bias.has_value()) BISUP_CHECK_FLOAT((*bias));
  check_optional_float_vector(bias, d.n, "bias", a_q);

  const int given = int(a_outlier.has_value()) + int(a_outlier_scale.has_value()) + int(w_outlier.has_value()) +
                    int(w_outlier_scale.has_value());
  TORCH_CHECK(given == 0 || given == 4,
              "bisup: gemm needs all four outlier tensors (a_outlier, a_outlier_scale, w_outlier, w_outlier_scale) "
              "or none, got ", given);
  d.ko = 0;
  if (given == 4) {
    BISUP_CHECK_DTYPE((*a_outlier), at::kChar);
    BISUP_CHECK_DTYPE((*w_outlier), at::kChar);
    BISUP_CHECK_DTYPE((*a_outlier_scale), at::kHalf);
    BISUP_CHECK_DTYPE((*w_outlier_scale), at::kHalf);
    BISUP_CHECK_CONTIGUOUS((*a_outlier));
    BISUP_CHECK_CONTIGUOUS((*w_outlier));
    BISUP_CHECK_CONTIGUOUS((*a_outlier_scale));
    BISUP_CHECK_CONTIGUOUS((*w_outlier_scale));
    TORCH_CHECK(a_outlier->dim() == 2 && a_outlier->size(0) == d.m, "bisup: gemm a_outlier must have shape [", d.m,
                ", Ko], got ", a_outlier->sizes());
    d.ko = a_outlier->size(1);
    TORCH_CHECK(w_outlier->dim() == 2 && w_outlier->size(0) == d.n && w_outlier->size(1) == d.ko,
                "bisup: gemm w_outlier must have shape [", d.n, ", ", d.ko, "] (N, Ko), got ", w_outlier->sizes());
    TORCH_CHECK(d.ko % kGemmOutlierMultiple == 0, "bisup: gemm needs the outlier count Ko to be a multiple of ",
                kGemmOutlierMultiple, ", got ", d.ko);
    BISUP_CHECK_SAME_DEVICE(a_q, (*a_outlier));
    BISUP_CHECK_SAME_DEVICE(a_q, (*w_outlier));
    check_optional_float_vector(a_outlier_scale, d.m, "a_outlier_scale", a_q);
    check_optional_float_vector(w_outlier_scale, d.n, "w_outlier_scale", a_q);
  }
  return d;
}

}  // namespace bisup
