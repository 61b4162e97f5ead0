// Operator schemas (torch.ops.bisup.*), their CPU/CUDA registrations, and the pybind11 module.
// Each op family keeps its lines together; semantics live in bisup/reference.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(bisup, m) {
  // packing
  m.def("pack_int4(Tensor q, bool is_signed=True) -> Tensor");
  m.def("unpack_int4(Tensor packed, bool is_signed=True) -> Tensor");
  m.def("pack_int3(Tensor q, bool is_signed=True) -> Tensor");
  m.def("unpack_int3(Tensor packed, bool is_signed=True) -> Tensor");
  // activation quantization
  m.def("quantize_pack(Tensor x, int bits, int group_size, bool sym=True, float clip_ratio=1.0) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize(Tensor q, Tensor scale, Tensor? zero, int group_size, ScalarType out_dtype) -> Tensor");
  // KV cache quantization and mixed-precision attention
  m.def("kv_quantize(Tensor x, int bits, int group_size=-1) -> (Tensor, Tensor, Tensor)");
  m.def("kv_dequantize(Tensor q, Tensor scale, Tensor zero, int bits, int group_size, ScalarType out_dtype) -> Tensor");
  m.def("attention(Tensor q, Tensor k_prompt, Tensor v_prompt, Tensor k_q, Tensor k_scale, Tensor k_zero, Tensor v_q, Tensor v_scale, Tensor v_zero, int kv_bits, int group_size=-1, float? softmax_scale=None, bool causal=True, Tensor? seq_lens=None, int window=0) -> Tensor");
  // hadamard transform
  m.def("hadamard(Tensor x, Tensor? base=None) -> Tensor");
  // W4A4 / W3A3 group-scaled GEMM
  m.def("gemm(Tensor a_q, Tensor a_scale, Tensor w_q, Tensor w_scale, int a_bits, int w_bits, int group_size, ScalarType out_dtype, Tensor? bias=None, Tensor? a_outlier=None, Tensor? a_outlier_scale=None, Tensor? w_outlier=None, Tensor? w_outlier_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bisup, CPU, m) {
  m.impl("pack_int4", &bisup::pack_int4_cpu);
  m.impl("unpack_int4", &bisup::unpack_int4_cpu);
  m.impl("pack_int3", &bisup::pack_int3_cpu);
  m.impl("unpack_int3", &bisup::unpack_int3_cpu);
  m.impl("quantize_pack", &bisup::quantize_pack_cpu);
  m.impl("dequantize", &bisup::dequantize_cpu);
  m.impl("kv_quantize", &bisup::kv_quantize_cpu);
  m.impl("kv_dequantize", &bisup::kv_dequantize_cpu);
  m.impl("attention", &bisup::attention_cpu);
  m.impl("hadamard", &bisup::hadamard_cpu);
  m.impl("gemm", &bisup::gemm_cpu);
}

// None of the ops is differentiable (training goes through bisup/reference.py's STE quantizers):
// falling through the Autograd key makes their outputs plain tensors that do not require grad,
// instead of PyTorch's fallback that marks them requires_grad and then yields no gradient.
TORCH_LIBRARY_IMPL(bisup, Autograd, m) {
  for (const char* op : {"pack_int4", "unpack_int4", "pack_int3", "unpack_int3", "quantize_pack", "dequantize",
                         "kv_quantize", "kv_dequantize", "attention", "hadamard", "gemm"}) {
    m.impl(op, torch::CppFunction::makeFallthrough());
  }
}

#ifdef BISUP_WITH_CUDA
TORCH_LIBRARY_IMPL(bisup, CUDA, m) {
  m.impl("pack_int4", &bisup::pack_int4_cuda);
  m.impl("unpack_int4", &bisup::unpack_int4_cuda);
  m.impl("pack_int3", &bisup::pack_int3_cuda);
  m.impl("unpack_int3", &bisup::unpack_int3_cuda);
  m.impl("quantize_pack", &bisup::quantize_pack_cuda);
  m.impl("dequantize", &bisup::dequantize_cuda);
  m.impl("kv_quantize", &bisup::kv_quantize_cuda);
  m.impl("kv_dequantize", &bisup::kv_dequantize_cuda);
  m.impl("attention", &bisup::attention_cuda);
  m.impl("hadamard", &bisup::hadamard_cuda);
  m.impl("gemm", &bisup::gemm_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bisup C++/CUDA kernels; the ops are registered as torch.ops.bisup.*";
  m.def("has_cuda_kernels", [] {
#ifdef BISUP_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA kernels");
  m.def("cpu_gemm_isas", &bisup::cpu_gemm_isas, "The CPU GEMM paths this CPU supports, best first");
  m.def("cpu_gemm_isa", &bisup::cpu_gemm_isa,
        "The CPU GEMM path a call takes now (BISUP_CPU_GEMM_ISA, else the best supported)");
}
