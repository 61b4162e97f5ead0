// Declarations shared by bindings.cpp, the CPU twins (csrc/cpu) and the CUDA kernels (csrc/cuda).
// Semantics of every op: bisup/reference.py. Data formats: docs/formats.md. The argument checks
// both devices share: checks.h.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace bisup {

// ---- packing (pack.cpp / pack.cu) ----
at::Tensor pack_int4_cpu(const at::Tensor& q, bool is_signed);
at::Tensor unpack_int4_cpu(const at::Tensor& packed, bool is_signed);
at::Tensor pack_int3_cpu(const at::Tensor& q, bool is_signed);
at::Tensor unpack_int3_cpu(const at::Tensor& packed, bool is_signed);

// ---- activation quantization (quantize.cpp / quantize.cu) ----
// Returns (packed int4 nibbles [..., K/2], fp16 scale [..., G], fp16 zero [..., G] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cpu(const at::Tensor& x, int64_t bits,
                                                                 int64_t group_size, bool sym,
                                                                 double clip_ratio);
at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero, int64_t group_size,
                          at::ScalarType out_dtype);

// ---- hadamard transform (hadamard.cpp / hadamard.cu) ----
// y = x @ (S_p / sqrt(p) (x) base)^T along the last dim n = p * m; base: fp32 [m, m] or none (m = 1).
at::Tensor hadamard_cpu(const at::Tensor& x, const std::optional<at::Tensor>& base);

// ---- KV-cache quantization (kv_quantize.cpp / kv_quantize.cu) ----
// Asymmetric per-row (token, head) quantization along head_dim into 3/4/8-bit codes
// (csrc/kv_format.h). Returns (codes uint8 [..., row bytes], scale fp16 [..., G], zero fp16 [..., G]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cpu(const at::Tensor& x, int64_t bits,
                                                               int64_t group_size);
at::Tensor kv_dequantize_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                             int64_t bits, int64_t group_size, at::ScalarType out_dtype);

// ---- mixed-precision attention (attention.cpp / attention.cu) ----
// Attention over concat(prompt K/V in q's dtype, dequant(quantized K/V)); bisup/reference.py.
// window > 0: sliding-window attention, a query at logical position i sees keys j > i - window.
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                         const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                         const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t kv_bits,
                         int64_t group_size, std::optional<double> softmax_scale, bool causal,
                         const std::optional<at::Tensor>& seq_lens, int64_t window);
#ifdef BISUP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size);
at::Tensor kv_dequantize_cuda(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                              int64_t bits, int64_t group_size, at::ScalarType out_dtype);
at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                          const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                          const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t kv_bits,
                          int64_t group_size, std::optional<double> softmax_scale, bool causal,
                          const std::optional<at::Tensor>& seq_lens, int64_t window);
#endif

#ifdef BISUP_WITH_CUDA
at::Tensor hadamard_cuda(const at::Tensor& x, const std::optional<at::Tensor>& base);
at::Tensor pack_int4_cuda(const at::Tensor& q, bool is_signed);
at::Tensor unpack_int4_cuda(const at::Tensor& packed, bool is_signed);
at::Tensor pack_int3_cuda(const at::Tensor& q, bool is_signed);
at::Tensor unpack_int3_cuda(const at::Tensor& packed, bool is_signed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cuda(const at::Tensor& x,
                                                                  int64_t bits,
                                                                  int64_t group_size, bool sym,
                                                                  double clip_ratio);
at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero, int64_t group_size,
                           at::ScalarType out_dtype);
#endif

// ---- W4A4 / W3A3 group-scaled GEMM (gemm.cpp / gemm.cu) ----
// y[M, N] = sum_g sa*sw*dot_g (+ INT8 outlier segment) (+ bias); bisup/reference.py::gemm.
at::Tensor gemm_cpu(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
    int64_t a_bits, int64_t w_bits, int64_t group_size, at::ScalarType out_dtype,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& a_outlier,
    const std::optional<at::Tensor>& a_outlier_scale, const std::optional<at::Tensor>& w_outlier,
    const std::optional<at::Tensor>& w_outlier_scale);
// The CPU GEMM's SIMD paths: those this CPU supports (best first), and the one a call takes now
// (BISUP_CPU_GEMM_ISA=avx512vnni|avxvnni|avx2|scalar forces one; an unsupported one is an error).
std::vector<std::string> cpu_gemm_isas();
std::string cpu_gemm_isa();
#ifdef BISUP_WITH_CUDA
at::Tensor gemm_cuda(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
    int64_t a_bits, int64_t w_bits, int64_t group_size, at::ScalarType out_dtype,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& a_outlier,
    const std::optional<at::Tensor>& a_outlier_scale, const std::optional<at::Tensor>& w_outlier,
    const std::optional<at::Tensor>& w_outlier_scale);
#endif

}  // namespace bisup
