// Argument checks shared by the CPU and CUDA entry points. Each op has one validation function,
// declared here and defined in checks.cpp, that both devices call: they accept and reject the
// same calls with the same messages. Every message says what was expected and what arrived, so
// a user can fix the call without reading the kernel. (CUDA-only limits: cuda/cuda_utils.cuh.)
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#define BISUP_CHECK_DTYPE(t, dt)                                                     \
  TORCH_CHECK((t).scalar_type() == (dt), "bisup: ", #t, " must have dtype ", (dt), \
              ", got ", (t).scalar_type())

#define BISUP_CHECK_CONTIGUOUS(t) \
  TORCH_CHECK((t).is_contiguous(), "bisup: ", #t, " must be contiguous (call .contiguous())")

#define BISUP_CHECK_DIM(t, d)                                                       \
  TORCH_CHECK((t).dim() == (d), "bisup: ", #t, " must have ", (d), " dims, got ", \
              (t).dim(), " (shape ", (t).sizes(), ")")

#define BISUP_CHECK_SAME_DEVICE(a, b)                                                   \
  TORCH_CHECK((a).device() == (b).device(), "bisup: ", #a, " is on ", (a).device(), \
              " but ", #b, " is on ", (b).device(), "; move them to one device")

#define BISUP_CHECK_FLOAT(t) ::bisup::check_float_dtype((t).scalar_type(), #t)

namespace bisup {

inline void check_float_dtype(at::ScalarType dt, const char* what) {
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "bisup: ", what,
              " must be float16, bfloat16 or float32, got ", dt);
}

// Number of groups along the last dim K for a group size (-1 = one group per row).
inline int64_t num_groups(int64_t k, int64_t group_size) {
  return group_size == -1 ? 1 : k / group_size;
}

// Values per group (-1 = the whole row of K values).
inline int64_t effective_group(int64_t k, int64_t group_size) {
  return group_size == -1 ? k : group_size;
}

inline void check_group_size(int64_t k, int64_t group_size, int64_t multiple_of) {
  TORCH_CHECK(group_size == -1 || group_size > 0, "bisup: group_size must be -1 or positive, got ",
              group_size);
  const int64_t g = effective_group(k, group_size);
  TORCH_CHECK(g > 0 && k % g == 0, "bisup: K=", k, " must be a multiple of group_size=", group_size);
  TORCH_CHECK(g % multiple_of == 0, "bisup: group size ", g, " must be a multiple of ", multiple_of,
              " for this format");
}

// t's shape with the last dim replaced: the output shape of a (un)packing or quantization op.
inline std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

// ---- one validation function per op (checks.cpp) ----

// Packing: return the packed / unpacked last-dim size.
int64_t check_pack_int4_args(const at::Tensor& q);
int64_t check_unpack_int4_args(const at::Tensor& packed);
int64_t check_pack_int3_args(const at::Tensor& q);
int64_t check_unpack_int3_args(const at::Tensor& packed);

void check_quantize_pack_args(const at::Tensor& x, int64_t bits, int64_t group_size, double clip_ratio);
void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                           int64_t group_size);

int64_t check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& base);  // returns m

void check_kv_quantize_args(const at::Tensor& x, int64_t bits, int64_t group_size);
int64_t check_kv_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                                 int64_t bits, int64_t group_size, at::ScalarType out_dtype);  // returns head_dim

struct AttentionDims {
  int64_t b, hq, hkv, tq, d, p, s, bits, group;
  int64_t window;  // 0: none; else a query at logical position i sees keys j > i - window
  double scale;
};
AttentionDims check_attention_args(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                                   const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                                   const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero,
                                   int64_t kv_bits, int64_t group_size, std::optional<double> softmax_scale,
                                   const std::optional<at::Tensor>& seq_lens, int64_t window);

struct GemmDims {
  int64_t m, n, k, group, groups, ko;  // ko = 0: no outlier segment
};
GemmDims check_gemm_args(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q,
                         const at::Tensor& w_scale, int64_t a_bits, int64_t w_bits, int64_t group_size,
                         at::ScalarType out_dtype, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& a_outlier, const std::optional<at::Tensor>& a_outlier_scale,
                         const std::optional<at::Tensor>& w_outlier, const std::optional<at::Tensor>& w_outlier_scale);

}  // namespace bisup
