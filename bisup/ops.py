"""Typed wrappers over torch.ops.bisup.* (CPU twins and CUDA kernels).

Each op has a fake (meta) implementation so it traces under torch.compile. Semantics:
bisup/reference.py. Formats: docs/formats.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bisup._ext import _C, has_cuda_kernels  # noqa: F401  (also loads the extension)
from bisup.quant.formats import check_kv_bits, num_groups, packed_row_bytes, unpacked_row_values

_ops = torch.ops.bisup


def _with_last(t: torch.Tensor, last: int) -> list:
    return [*t.shape[:-1], last]


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """int8 [..., K] -> uint8 [..., K/2] (element 2i in the low nibble)."""
    return _ops.pack_int4(q, is_signed)


def unpack_int4(packed: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K]."""
    return _ops.unpack_int4(packed, is_signed)


def pack_int3(q: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """int8 [..., K] (K % 32 == 0) -> uint8 [..., 3K/8]."""
    return _ops.pack_int3(q, is_signed)


def unpack_int3(packed: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """uint8 [..., 3K/8] -> int8 [..., K]."""
    return _ops.unpack_int3(packed, is_signed)


@torch.library.register_fake("bisup::pack_int4")
def _(q, is_signed=True):
    return q.new_empty(_with_last(q, q.shape[-1] // 2), dtype=torch.uint8)


@torch.library.register_fake("bisup::unpack_int4")
def _(packed, is_signed=True):
    return packed.new_empty(_with_last(packed, packed.shape[-1] * 2), dtype=torch.int8)


@torch.library.register_fake("bisup::pack_int3")
def _(q, is_signed=True):
    return q.new_empty(_with_last(q, packed_row_bytes("int3", q.shape[-1])), dtype=torch.uint8)


@torch.library.register_fake("bisup::unpack_int3")
def _(packed, is_signed=True):
    return packed.new_empty(_with_last(packed, unpacked_row_values("int3", packed.shape[-1])), dtype=torch.int8)


# --------------------------------------------------------------------------------------------
# activation quantization
# --------------------------------------------------------------------------------------------
def quantize_pack(
    x: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True, clip_ratio: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-row group quantization of fp16/bf16/fp32 x [..., K] into INT4 nibbles.

    Returns (packed uint8 [..., K/2], scale fp16 [..., G], zero fp16 [..., G] or None if sym).
    """
    q, scale, zero = _ops.quantize_pack(x, bits, group_size, sym, clip_ratio)
    return q, scale, (None if sym else zero)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor] = None,
    group_size: int = -1,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Inverse of quantize_pack: (q - zero) * scale, signed nibbles when zero is None."""
    return _ops.dequantize(q, scale, zero, group_size, out_dtype)


@torch.library.register_fake("bisup::quantize_pack")
def _(x, bits, group_size, sym=True, clip_ratio=1.0):
    k = x.shape[-1]
    groups = 1 if group_size == -1 else k // group_size
    q = x.new_empty(_with_last(x, k // 2), dtype=torch.uint8)
    scale = x.new_empty(_with_last(x, groups), dtype=torch.float16)
    zero = x.new_empty([0] if sym else _with_last(x, groups), dtype=torch.float16)
    return q, scale, zero


@torch.library.register_fake("bisup::dequantize")
def _(q, scale, zero, group_size, out_dtype):
    return q.new_empty(_with_last(q, q.shape[-1] * 2), dtype=out_dtype)


# --------------------------------------------------------------------------------------------
# W4A4 / W3A3 group-scaled GEMM
# --------------------------------------------------------------------------------------------
def gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    a_bits: int,
    w_bits: int,
    group_size: int,
    out_dtype: torch.dtype = torch.float16,
    bias: Optional[torch.Tensor] = None,
    a_outlier: Optional[torch.Tensor] = None,
    a_outlier_scale: Optional[torch.Tensor] = None,
    w_outlier: Optional[torch.Tensor] = None,
    w_outlier_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y[M, N] = sum_g a_scale*w_scale*dot_g (+ INT8 outlier segment) (+ bias), in out_dtype.

    a_q: quantize_pack output uint8 [M, K/2] (values of a_bits in {3, 4}), a_scale fp16 [M, G];
    w_q: pack_int4 (w_bits=4) or pack_int3 (w_bits=3) of [N, K], w_scale fp16 [N, G];
    outliers (all or none): a_outlier int8 [M, Ko], a_outlier_scale fp16 [M], w_outlier int8
    [N, Ko], w_outlier_scale fp16 [N]. K % 32 == 0, Ko % 16 == 0. Semantics: reference.gemm.
    """
    return _ops.gemm(
        a_q, a_scale, w_q, w_scale, a_bits, w_bits, group_size, out_dtype,
        bias, a_outlier, a_outlier_scale, w_outlier, w_outlier_scale,
    )


def cpu_gemm_isas() -> list:
    """The CPU GEMM paths this CPU supports, best first (of avx512vnni, avxvnni, avx2, scalar)."""
    return list(_C.cpu_gemm_isas())


def cpu_gemm_isa() -> str:
    """The path a CPU ops.gemm call takes now: $BISUP_CPU_GEMM_ISA when set (RuntimeError if this
    CPU lacks it), else the first of cpu_gemm_isas()."""
    return _C.cpu_gemm_isa()


@torch.library.register_fake("bisup::gemm")
def _(a_q, a_scale, w_q, w_scale, a_bits, w_bits, group_size, out_dtype, bias=None,
      a_outlier=None, a_outlier_scale=None, w_outlier=None, w_outlier_scale=None):
    return a_q.new_empty([a_q.shape[0], w_q.shape[0]], dtype=out_dtype)


# --------------------------------------------------------------------------------------------
# hadamard transform
# --------------------------------------------------------------------------------------------
def hadamard(x: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fast orthonormal transform y = x @ (S_p / sqrt(p) (x) base)^T along the last dim n = p * m.

    x: contiguous fp16/bf16/fp32 [..., n]; base: contiguous fp32 [m, m] on x's device (None: m = 1,
    a plain normalized Walsh-Hadamard transform). bisup.rotation.hadamard_base(n) gives the base
    for which this equals x @ bisup.rotation.hadamard_matrix(n)^T. CUDA: n <= 32768.
    """
    return _ops.hadamard(x, base)


@torch.library.register_fake("bisup::hadamard")
def _(x, base=None):
    return torch.empty_like(x)


# --------------------------------------------------------------------------------------------
# KV cache quantization and mixed-precision attention
# --------------------------------------------------------------------------------------------
def kv_quantize(x: torch.Tensor, bits: int, group_size: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token, per-head quantization of KV x [..., D] along head_dim.

    Returns (codes uint8 [..., D*bits/8], scale fp16 [..., G], zero fp16 [..., G]); bits in {3, 4, 8}
    (4 bits: the same bytes as quantize_pack(x, 4, group_size, sym=False)).
    """
    return _ops.kv_quantize(x, bits, group_size)


def kv_dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int = -1,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of kv_quantize: (code - zero) * scale in fp32, returned as out_dtype [..., D]."""
    return _ops.kv_dequantize(q, scale, zero, bits, group_size, out_dtype)


def attention(
    q: torch.Tensor,
    k_prompt: torch.Tensor,
    v_prompt: torch.Tensor,
    k_q: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_q: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    *,
    kv_bits: int,
    group_size: int = -1,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    seq_lens: Optional[torch.Tensor] = None,
    window: int = 0,
) -> torch.Tensor:
    """Attention over concat(prompt K/V [B, Hkv, P, D] in q's dtype, dequant(packed K/V [B, Hkv, S, ...])).

    q [B, Hq, Tq, D] -> [B, Hq, Tq, D]. GQA (Hq multiple of Hkv); causal masking aligned to the end
    of the logical sequence (query i sits at position P + len - Tq + i and sees keys j <= that);
    seq_lens [B]: valid length of the quantized segment per batch entry; window > 0: sliding-window
    attention, query at position i sees keys j > i - window only (both segments). Rows that see no
    key are zero. See bisup/reference.py.
    """
    return _ops.attention(q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero,
                          kv_bits, group_size, softmax_scale, causal, seq_lens, window)


@torch.library.register_fake("bisup::kv_quantize")
def _(x, bits, group_size=-1):
    check_kv_bits(bits, "bisup::kv_quantize")
    d = x.shape[-1]
    q = x.new_empty(_with_last(x, packed_row_bytes(bits, d)), dtype=torch.uint8)
    groups = num_groups(d, group_size)
    scale = x.new_empty(_with_last(x, groups), dtype=torch.float16)
    return q, scale, torch.empty_like(scale)


@torch.library.register_fake("bisup::kv_dequantize")
def _(q, scale, zero, bits, group_size, out_dtype):
    check_kv_bits(bits, "bisup::kv_dequantize")
    d = unpacked_row_values(bits, q.shape[-1])
    return q.new_empty(_with_last(q, d), dtype=out_dtype)


@torch.library.register_fake("bisup::attention")
def _(q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero, kv_bits, group_size=-1,
      softmax_scale=None, causal=True, seq_lens=None, window=0):
    if window < 0:
        raise ValueError(f"bisup::attention: window must be >= 0 (0: no sliding window), got {window}")
    return torch.empty_like(q)
