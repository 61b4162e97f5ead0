// CUDA entry point of the W4A4 / W3A3 group-scaled GEMM: argument checks (shared with the CPU
// twin), choice of MMA path and tile configuration, launch. The kernel: gemm_kernel.cuh.
//
// Path (run-time, by compute capability):
//   sm_80 .. sm_89, W4, group % 64 == 0  -> mma.m16n8k64 s4 (native INT4 tensor cores)
//   otherwise (Hopper sm_90, W3, group 32) -> INT4/INT3 unpacked to INT8 in registers, m16n8k32 s8
// BISUP_GEMM_MMA=s4|s8 overrides the choice (s4 only where legal): tests use it to cover both
// paths on one GPU.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda_utils.cuh"
#include "gemm_kernel.cuh"
#include "ops.h"

namespace bisup {
namespace {

using gemm::MmaPath;
using gemm::Params;
using gemm::TileConfig;

// decode / tiny batches: 16 rows, narrow N tiles and a deep pipeline to keep weight bytes in flight
using SmallTile = TileConfig<16, 32, 1, 2, 10>;
// mid-sized M: 64 x 64 tiles so that enough CTAs exist (4 warps of 32 x 32)
using MediumTile = TileConfig<64, 64, 2, 2, 4>;
// large M: 128 x 128 tiles, 8 warps of 64 x 32
using LargeTile = TileConfig<128, 128, 2, 4, 4>;

template <class Cfg, MmaPath kPath, int kWBits>
void launch(const Params& p, cudaStream_t stream) {
  auto kernel = gemm::gemm_kernel<Cfg, kPath, kWBits>;
  if (Cfg::kSmemBytes > kSmemNoOptIn)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  // gridDim.y (M tiles) is limited to kMaxGridYZ: taller A runs as several launches over row slices
  // (one launch, with p unchanged, below kMaxGridYZ * BM rows). Slice offsets keep 16-byte
  // alignment: A and outlier rows are multiples of 16 bytes.
  constexpr int64_t kRowsPerLaunch = kMaxGridYZ * Cfg::BM;
  const int64_t out_elem_bytes = p.out_kind == gemm::kOutFloat ? 4 : 2;
  for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerLaunch) {
    Params q = p;
    q.m = static_cast<int>(std::min<int64_t>(p.m - r0, kRowsPerLaunch));
    q.a = p.a + r0 * packed_row_bytes(4, p.k);
    q.sa = p.sa + r0 * p.groups;
    if (p.ko > 0) {
      q.ao = p.ao + r0 * p.ko;
      q.sao = p.sao + r0;
    }
    q.out = static_cast<char*>(p.out) + r0 * p.n * out_elem_bytes;
    const dim3 grid(static_cast<unsigned>(ceil_div(q.n, Cfg::BN)), static_cast<unsigned>(ceil_div(q.m, Cfg::BM)));
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(q);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <class Cfg>
void launch_path(const Params& p, bool use_s4, int w_bits, cudaStream_t stream) {
  if (use_s4)
    launch<Cfg, MmaPath::kS4, 4>(p, stream);
  else if (w_bits == 4)
    launch<Cfg, MmaPath::kS8, 4>(p, stream);
  else
    launch<Cfg, MmaPath::kS8, 3>(p, stream);
}

bool choose_s4(const at::Tensor& a_q, int64_t w_bits, int64_t group) {
  const bool legal = w_bits == 4 && group % 64 == 0;
  if (const char* force = std::getenv("BISUP_GEMM_MMA")) {
    TORCH_CHECK(std::strcmp(force, "s4") == 0 || std::strcmp(force, "s8") == 0,
                "bisup: BISUP_GEMM_MMA must be s4 or s8, got ", force);
    return legal && std::strcmp(force, "s4") == 0;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a_q.device().index()));
  return legal && major == 8;  // Hopper has no INT4 tensor cores (s4 mma is emulated there)
}

}  // namespace

at::Tensor gemm_cuda(const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                     int64_t a_bits, int64_t w_bits, int64_t group_size, at::ScalarType out_dtype,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& a_outlier,
                     const std::optional<at::Tensor>& a_outlier_scale, const std::optional<at::Tensor>& w_outlier,
                     const std::optional<at::Tensor>& w_outlier_scale) {
  BISUP_CHECK_CUDA(a_q);
  const GemmDims d = check_gemm_args(a_q, a_scale, w_q, w_scale, a_bits, w_bits, group_size, out_dtype, bias,
                                     a_outlier, a_outlier_scale, w_outlier, w_outlier_scale);
  TORCH_CHECK(w_bits == 4 || d.k % gemm::kTileK == 0, "bisup: gemm on CUDA with w_bits=3 needs K to be a multiple of ",
              gemm::kTileK, " (16-byte aligned INT3 rows), got K=", d.k);
  TORCH_CHECK(d.m <= INT32_MAX && d.n <= INT32_MAX && d.k <= INT32_MAX, "bisup: gemm dims must fit in int32");
  check_aligned(a_q, 16, "gemm", "a_q", "cp.async");
  check_aligned(w_q, 16, "gemm", "w_q", "cp.async");
  if (d.ko > 0) {
    check_aligned(*a_outlier, 16, "gemm", "a_outlier", "cp.async");
    check_aligned(*w_outlier, 16, "gemm", "w_outlier", "cp.async");
  }
  const c10::cuda::CUDAGuard guard(a_q.device());
  auto out = at::empty({d.m, d.n}, a_q.options().dtype(out_dtype));
  if (d.m == 0 || d.n == 0) return out;
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  Params p{};
  p.a = a_q.data_ptr<uint8_t>();
  p.w = w_q.data_ptr<uint8_t>();
  p.sa = reinterpret_cast<const __half*>(a_scale.data_ptr<at::Half>());
  p.sw = reinterpret_cast<const __half*>(w_scale.data_ptr<at::Half>());
  if (d.ko > 0) {
    p.ao = a_outlier->data_ptr<int8_t>();
    p.wo = w_outlier->data_ptr<int8_t>();
    p.sao = reinterpret_cast<const __half*>(a_outlier_scale->data_ptr<at::Half>());
    p.swo = reinterpret_cast<const __half*>(w_outlier_scale->data_ptr<at::Half>());
  }
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_kind = out_dtype == at::kHalf ? gemm::kOutHalf : out_dtype == at::kBFloat16 ? gemm::kOutBFloat16 : gemm::kOutFloat;
  p.m = static_cast<int>(d.m);
  p.n = static_cast<int>(d.n);
  p.k = static_cast<int>(d.k);
  p.group = static_cast<int>(d.group);
  p.groups = static_cast<int>(d.groups);
  p.ko = static_cast<int>(d.ko);

  const bool use_s4 = choose_s4(a_q, w_bits, d.group);
  const cudaStream_t stream = current_stream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a_q.device().index()));
  if (d.m <= SmallTile::BM)
    launch_path<SmallTile>(p, use_s4, static_cast<int>(w_bits), stream);
  else if (ceil_div(d.m, LargeTile::BM) * ceil_div(d.n, LargeTile::BN) >= sms)
    launch_path<LargeTile>(p, use_s4, static_cast<int>(w_bits), stream);
  else
    launch_path<MediumTile>(p, use_s4, static_cast<int>(w_bits), stream);
  return out;
}

}  // namespace bisup
