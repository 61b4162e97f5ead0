// CUDA bisup.ops.attention: attention over concat(prompt K/V, dequant(quantized K/V)).
//
// A sliding window (window > 0: a query at logical position i sees keys j > i - window) masks
// both segments alike; the decode kernels split only the keys a row block may see.
// Tq <= kFusedMaxTq (decode, short speculative chunks): the fused flash-decoding kernels of
// attention_decode.cuh -- split over the KV length, online softmax across the FP16 prompt segment
// and the quantized segment, dequantization in shared memory only, then a combine kernel.
// Larger Tq (prefill): documented fallback -- dequantize the quantized segment into a temporary
// [B, Hkv, S, D] tensor of q's dtype, concatenate with the prompt and call torch's SDPA with an
// explicit mask. Its extra cost over SDPA on an FP16 cache is one dequantize pass, the
// concatenation, the GQA expansion and the masked (non flash) SDPA backend; bench/attention.py
// measures it.
#include "attention_decode.cuh"
#include "cuda_utils.cuh"
#include "ops.h"

namespace bisup {
namespace {

constexpr int64_t kFusedMaxTq = 16;
constexpr int kMaxSplits = 256;
constexpr int kSplitWaves = 4;  // splits: enough blocks for ~this many waves of resident blocks
// 99 KB: the smallest opt-in per-block shared memory limit among sm_80+ parts (sm_86 / sm_89).
constexpr int kMaxSmemOptIn = 99 * 1024;

template <typename T, int D, int BITS>
void launch_decode(kv::DecodeParams p, int splits, int row_tiles, void* out, cudaStream_t stream) {
  constexpr int smem = kv::decode_smem_bytes<D>();
  static_assert(smem <= kMaxSmemOptIn, "decode tile does not fit in shared memory");
  auto kernel = kv::decode_split_kernel<T, D, BITS>;
  if (smem > kSmemNoOptIn) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const dim3 grid(splits, p.b * p.hkv, row_tiles);
  kernel<<<grid, kv::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t rows = int64_t(p.b) * p.hq * p.tq;
  kv::combine_kernel<T, D><<<rows, D, 0, stream>>>(p.part_o, p.part_lse, static_cast<T*>(out), splits, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void dispatch_bits(int bits, const kv::DecodeParams& p, int splits, int row_tiles, void* out, cudaStream_t st) {
  switch (bits) {
    case 3: return launch_decode<T, D, 3>(p, splits, row_tiles, out, st);
    case 4: return launch_decode<T, D, 4>(p, splits, row_tiles, out, st);
    case 8: return launch_decode<T, D, 8>(p, splits, row_tiles, out, st);
    default: TORCH_CHECK(false, "bisup: kv_bits must be 3, 4 or 8, got ", bits);
  }
}

at::Tensor attention_decode(const AttentionDims& a, const at::Tensor& q, const at::Tensor& k_prompt,
                            const at::Tensor& v_prompt, const at::Tensor& k_q, const at::Tensor& k_scale,
                            const at::Tensor& k_zero, const at::Tensor& v_q, const at::Tensor& v_scale,
                            const at::Tensor& v_zero, bool causal, const std::optional<at::Tensor>& seq_lens) {
  TORCH_CHECK(a.d == 64 || a.d == 128 || a.d == 256, "bisup: the CUDA attention supports head_dim 64, 128 or 256, got ",
              a.d);
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_prompt, "k_prompt"}, {&v_prompt, "v_prompt"}, {&k_q, "k_q"},
                         {&v_q, "v_q"}}) {
    check_aligned(*t, 16, "attention", name, "vector loads");
  }
  auto out = at::empty_like(q);
  const at::Tensor lens = seq_lens.has_value() ? seq_lens->to(at::kLong).contiguous() : at::Tensor();

  // Splits: enough blocks for ~kSplitWaves waves of resident blocks, each a whole number of tiles.
  int device = q.get_device(), sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t total = a.p + a.s;
  // Keys one block may see: all of them, or with a window at most window + Tq - 1 (from its first).
  const int64_t span = a.window > 0 ? std::min(total, a.window + a.tq - 1) : total;
  const int64_t row_tiles = ceil_div((a.hq / a.hkv) * a.tq, kv::kMaxRows);
  const int64_t tiles = std::max<int64_t>(ceil_div(span, kv::kTile), 1);
  const int64_t base_blocks = a.b * a.hkv * row_tiles;
  const int64_t want =
      std::clamp<int64_t>(ceil_div(kSplitWaves * sms, base_blocks), 1, std::min<int64_t>(tiles, kMaxSplits));
  const int64_t split_len = ceil_div(tiles, want) * kv::kTile;
  const int64_t splits = std::max<int64_t>(ceil_div(span, split_len), 1);
  TORCH_CHECK(a.b * a.hkv <= kMaxGridYZ, "bisup: batch * kv_heads must be <= ", kMaxGridYZ,
              " for the CUDA attention (gridDim.y), got ", a.b * a.hkv);

  const int64_t rows = a.b * a.hq * a.tq;
  auto part_o = at::empty({splits, rows, a.d}, q.options().dtype(at::kFloat));
  auto part_lse = at::empty({splits, rows}, q.options().dtype(at::kFloat));

  kv::DecodeParams p;
  p.q = q.data_ptr();
  p.kp = k_prompt.data_ptr();
  p.vp = v_prompt.data_ptr();
  p.kq = k_q.data_ptr<uint8_t>();
  p.vq = v_q.data_ptr<uint8_t>();
  p.ks = reinterpret_cast<const __half*>(k_scale.data_ptr<at::Half>());
  p.kz = reinterpret_cast<const __half*>(k_zero.data_ptr<at::Half>());
  p.vs = reinterpret_cast<const __half*>(v_scale.data_ptr<at::Half>());
  p.vz = reinterpret_cast<const __half*>(v_zero.data_ptr<at::Half>());
  p.lens = seq_lens.has_value() ? lens.data_ptr<int64_t>() : nullptr;
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.b = int(a.b);
  p.hq = int(a.hq);
  p.hkv = int(a.hkv);
  p.tq = int(a.tq);
  p.p = int(a.p);
  p.s = int(a.s);
  p.groups = int(a.d / a.group);
  p.group = int(a.group);
  p.split_len = int(split_len);
  p.window = a.window >= total ? 0 : int(a.window);  // a window over every key is no window
  p.scale = static_cast<float>(a.scale);
  p.causal = causal;

  const cudaStream_t st = current_stream();
  const int bits = int(a.bits);
  const auto launch = [&](auto tag) {
    using scalar_t = decltype(tag);
    switch (a.d) {
      case 64: dispatch_bits<scalar_t, 64>(bits, p, int(splits), int(row_tiles), out.data_ptr(), st); break;
      case 128: dispatch_bits<scalar_t, 128>(bits, p, int(splits), int(row_tiles), out.data_ptr(), st); break;
      default: dispatch_bits<scalar_t, 256>(bits, p, int(splits), int(row_tiles), out.data_ptr(), st); break;
    }
  };
  switch (q.scalar_type()) {  // the dtypes check_attention_args admits
    case at::kHalf: launch(at::Half()); break;
    case at::kBFloat16: launch(at::BFloat16()); break;
    default: launch(float()); break;
  }
  return out;
}

// Prefill fallback: dequantize + concatenate + torch SDPA with the op's mask.
at::Tensor attention_prefill(const AttentionDims& a, const at::Tensor& q, const at::Tensor& k_prompt,
                             const at::Tensor& v_prompt, const at::Tensor& k_q, const at::Tensor& k_scale,
                             const at::Tensor& k_zero, const at::Tensor& v_q, const at::Tensor& v_scale,
                             const at::Tensor& v_zero, bool causal, const std::optional<at::Tensor>& seq_lens) {
  const int64_t group = a.group == a.d ? -1 : a.group;
  auto k = at::cat({k_prompt, kv_dequantize_cuda(k_q, k_scale, k_zero, a.bits, group, q.scalar_type())}, 2);
  auto v = at::cat({v_prompt, kv_dequantize_cuda(v_q, v_scale, v_zero, a.bits, group, q.scalar_type())}, 2);
  if (a.hq != a.hkv) {
    k = k.repeat_interleave(a.hq / a.hkv, 1);
    v = v.repeat_interleave(a.hq / a.hkv, 1);
  }
  const auto opts = q.options().dtype(at::kLong);
  const at::Tensor lens = (seq_lens.has_value() ? seq_lens->to(at::kLong) : at::full({a.b}, a.s, opts)).view({a.b, 1, 1, 1}) + a.p;
  const at::Tensor j = at::arange(a.p + a.s, opts).view({1, 1, 1, -1});
  at::Tensor allowed = j < lens;  // [B, 1, 1, L]
  const at::Tensor at_pos = lens - a.tq + at::arange(a.tq, opts).view({1, 1, -1, 1});  // queries' positions
  if (causal) allowed = allowed & (j <= at_pos);
  if (a.window > 0) allowed = allowed & (j > at_pos - a.window);
  allowed = allowed.expand({a.b, 1, a.tq, a.p + a.s});
  auto out = at::scaled_dot_product_attention(q, k, v, allowed, 0.0, false, a.scale);
  // Rows that see no key: SDPA gives NaN there, the op's contract is zeros.
  return out.masked_fill(allowed.logical_not().all(-1, true), 0).contiguous();
}

}  // namespace

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k_prompt, const at::Tensor& v_prompt,
                          const at::Tensor& k_q, const at::Tensor& k_scale, const at::Tensor& k_zero,
                          const at::Tensor& v_q, const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t kv_bits,
                          int64_t group_size, std::optional<double> softmax_scale, bool causal,
                          const std::optional<at::Tensor>& seq_lens, int64_t window) {
  BISUP_CHECK_CUDA(q);
  const AttentionDims a = check_attention_args(q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero,
                                               kv_bits, group_size, softmax_scale, seq_lens, window);
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || a.p + a.s == 0) return at::zeros_like(q);  // no keys: zero rows
  if (a.tq <= kFusedMaxTq) {
    return attention_decode(a, q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero, causal, seq_lens);
  }
  return attention_prefill(a, q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero, causal, seq_lens);
}

}  // namespace bisup
