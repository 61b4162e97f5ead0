// Declarations shared by bindings.cpp, the CPU twins (csrc/cpu) and the CUDA kernels (csrc/cuda).
// Semantics of every op: bisup/reference.py. Data formats: docs/formats.md.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace bisup {

// ---- packing (pack.cpp / pack.cu) ----
// Argument checks shared by both devices; return the packed/unpacked last-dim size.
int64_t check_pack_int4_args(const at::Tensor& q);
int64_t check_unpack_int4_args(const at::Tensor& packed);
int64_t check_pack_int3_args(const at::Tensor& q);
int64_t check_unpack_int3_args(const at::Tensor& packed);

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
void check_quantize_pack_args(const at::Tensor& x, int64_t bits, int64_t group_size,
                              double clip_ratio);
void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero, int64_t group_size);

// ---- hadamard transform (hadamard.cpp / hadamard.cu) ----
// y = x @ (S_p / sqrt(p) (x) base)^T along the last dim n = p * m; base: fp32 [m, m] or none (m = 1).
int64_t check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& base);  // returns m
at::Tensor hadamard_cpu(const at::Tensor& x, const std::optional<at::Tensor>& base);

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

}  // namespace bisup
