"""Pure-PyTorch reference of every bisup op: THE semantics.

The CPU twins (csrc/cpu) and CUDA kernels (csrc/cuda) must match these functions (exactly for
integer and packing ops). They are also the differentiable path used in fake-quant simulation
and QA fine-tuning. Data formats: docs/formats.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bisup.quant.formats import INT3_BLOCK_BYTES, INT3_BLOCK_VALUES as INT3_BLOCK, KV_BITS, packed_row_bytes
from bisup.quant.quantizer import qrange, quantize_groups


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def _check_range(q: torch.Tensor, bits: int, is_signed: bool, op: str) -> None:
    if q.dtype != torch.int8:
        raise TypeError(f"{op}: q must be int8, got {q.dtype}")
    lo, hi = qrange(bits, is_signed)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{op}: values must be in [{lo}, {hi}]")


def pack_int4(q: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """int8 [..., K] -> uint8 [..., K/2]; element 2i in the low nibble of byte i."""
    _check_range(q, 4, is_signed, "pack_int4")
    if q.shape[-1] % 2:
        raise ValueError("pack_int4: K must be even")
    u = (q.to(torch.int32) & 0xF)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K]."""
    p = packed.to(torch.int32)
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if is_signed:
        nib = torch.where(nib >= 8, nib - 16, nib)
    return nib.to(torch.int8)


def _int3_positions(device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For value i of a 32-value block: (word of its low 2 bits, their bit offset, bit offset of bit 2)."""
    i = torch.arange(INT3_BLOCK, device=device)
    j = i % 16
    return i // 16, 8 * (j % 4) + 2 * (j // 4), 8 * (i % 4) + i // 4


def pack_int3(q: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """int8 [..., K] (K % 32 == 0) -> uint8 [..., 3K/8]; layout in docs/formats.md."""
    _check_range(q, 3, is_signed, "pack_int3")
    k = q.shape[-1]
    if k % INT3_BLOCK:
        raise ValueError("pack_int3: K must be a multiple of 32")
    u = (q.to(torch.int64) & 7).reshape(*q.shape[:-1], k // INT3_BLOCK, INT3_BLOCK)
    word, lo_off, hi_off = _int3_positions(q.device)
    lo_bits = (u & 3) << lo_off
    hi_bits = (u >> 2) << hi_off
    w0 = lo_bits[..., :16].sum(-1)  # fields are disjoint, so a sum is an OR
    w1 = lo_bits[..., 16:].sum(-1)
    w2 = hi_bits.sum(-1)
    words = torch.stack([w0, w1, w2], dim=-1)  # [..., blocks, 3]
    bytes_ = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1)
    return bytes_.reshape(*q.shape[:-1], k // INT3_BLOCK * INT3_BLOCK_BYTES).to(torch.uint8)


def unpack_int3(packed: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """uint8 [..., 3K/8] -> int8 [..., K]."""
    n = packed.shape[-1]
    if n % 12:
        raise ValueError("unpack_int3: last dim must be a multiple of 12 bytes")
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], n // INT3_BLOCK_BYTES, 3, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # [..., blocks, 3]
    word, lo_off, hi_off = _int3_positions(packed.device)
    lo = (words[..., word] >> lo_off) & 3
    hi = (words[..., 2:3] >> hi_off) & 1
    v = lo | (hi << 2)
    if is_signed:
        v = torch.where(v >= 4, v - 8, v)
    return v.reshape(*packed.shape[:-1], n // INT3_BLOCK_BYTES * INT3_BLOCK).to(torch.int8)


# --------------------------------------------------------------------------------------------
# activation quantization
# --------------------------------------------------------------------------------------------
def quantize_pack(
    x: torch.Tensor, bits: int, group_size: int, sym: bool = True, clip_ratio: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group quantization into INT4 nibbles.

    Returns (packed uint8 [..., K/2], scale fp16 [..., G], zero fp16 [..., G] (empty if sym)).
    """
    if not 2 <= bits <= 4:
        raise ValueError(f"quantize_pack: bits must be in [2, 4], got {bits}")
    q, s, z = quantize_groups(x, bits, group_size, sym, clip_ratio, scale_dtype=torch.float16)
    q = q.reshape(x.shape).to(torch.int8)
    scale = s.squeeze(-1).to(torch.float16)
    zero = z.squeeze(-1).to(torch.float16) if not sym else torch.empty(0, dtype=torch.float16, device=x.device)
    return pack_int4(q, is_signed=sym), scale, zero


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """(q - z) * s in fp32, cast to out_dtype; signed nibbles when zero is None."""
    vals = unpack_int4(q, is_signed=zero is None).to(torch.float32)
    k = vals.shape[-1]
    g = k if group_size == -1 else group_size
    vg = vals.reshape(*vals.shape[:-1], k // g, g)
    z = 0.0 if zero is None else zero.to(torch.float32).unsqueeze(-1)
    out = (vg - z) * scale.to(torch.float32).unsqueeze(-1)
    return out.reshape(vals.shape).to(out_dtype)


# --------------------------------------------------------------------------------------------
# KV cache quantization and mixed-precision attention (docs/formats.md, "KV cache")
# --------------------------------------------------------------------------------------------
def kv_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one packed KV row (one token of one head)."""
    return packed_row_bytes(bits, head_dim)


def kv_quantize(
    x: torch.Tensor, bits: int, group_size: int = -1
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token, per-head quantization along head_dim: x [..., D] ->
    (codes uint8 [..., kv_row_bytes(D, bits)], scale fp16 [..., G], zero fp16 [..., G]).

    bits 4 is exactly quantize_pack(x, 4, group_size, sym=False); bits 8 stores one code per
    byte; bits 3 uses the INT3 block layout.
    """
    if bits not in KV_BITS:
        raise ValueError(f"kv_quantize: bits must be one of {KV_BITS}, got {bits}")
    if bits == 4:
        return quantize_pack(x, 4, group_size, sym=False)
    q, s, z = quantize_groups(x, bits, group_size, sym=False, scale_dtype=torch.float16)
    codes = q.reshape(x.shape).to(torch.int8 if bits == 3 else torch.uint8)
    packed = pack_int3(codes, is_signed=False) if bits == 3 else codes
    return packed, s.squeeze(-1).to(torch.float16), z.squeeze(-1).to(torch.float16)


def kv_dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int = -1,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(code - zero) * scale in fp32 for packed KV rows; returns [..., D] in out_dtype."""
    if bits not in KV_BITS:
        raise ValueError(f"kv_dequantize: bits must be one of {KV_BITS}, got {bits}")
    if bits == 4:
        codes = unpack_int4(q, is_signed=False)
    elif bits == 3:
        codes = unpack_int3(q, is_signed=False)
    else:
        codes = q
    vals = codes.to(torch.float32)
    d = vals.shape[-1]
    g = d if group_size == -1 else group_size
    vg = vals.reshape(*vals.shape[:-1], d // g, g)
    out = (vg - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return out.reshape(vals.shape).to(out_dtype)


def attention_mask(
    batch: int, tq: int, prompt_len: int, quant_len: int, causal: bool,
    seq_lens: Optional[torch.Tensor] = None, device=None, window: int = 0,
) -> torch.Tensor:
    """Bool [B, Tq, L] (True = attend) of bisup.ops.attention: key j of batch b is valid when
    j < P + seq_lens[b]; query i sits at logical position a_i = P + seq_lens[b] - Tq + i (queries
    aligned to the END of the logical sequence); with causal it sees j <= a_i; with window > 0
    (sliding-window attention, e.g. Gemma3's local layers) only j > a_i - window, the FP prompt
    segment included: a query `window` or more positions past the prompt's last token no longer sees
    the prompt (as in the unquantized model; the cache keeps it, masked)."""
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0: no sliding window), got {window}")
    total = prompt_len + quant_len
    lens = torch.full((batch,), quant_len, dtype=torch.int64, device=device) if seq_lens is None else seq_lens.to(device, torch.int64)
    lens = (lens + prompt_len).view(batch, 1, 1)
    j = torch.arange(total, device=device).view(1, 1, total)
    allowed = (j < lens).expand(batch, tq, total)
    at_pos = lens - tq + torch.arange(tq, device=device).view(1, tq, 1)
    if causal:
        allowed = allowed & (j <= at_pos)
    if window > 0:
        allowed = allowed & (j > at_pos - window)
    return allowed


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
    """softmax(q K^T * scale) V over K/V = concat(prompt segment, dequant(quantized segment)).

    q [B, Hq, Tq, D]; k/v_prompt [B, Hkv, P, D] (q's dtype); k/v_q packed [B, Hkv, S, row bytes]
    with scale/zero [B, Hkv, S, G]. GQA: query head h uses KV head h // (Hq / Hkv). Masking:
    attention_mask(). A query row that sees no key returns zeros. Computed in float64.
    """
    b, hq, tq, d = q.shape
    hkv, p = k_prompt.shape[1], k_prompt.shape[2]
    s = k_q.shape[2]
    k = torch.cat([k_prompt.double(), kv_dequantize(k_q, k_scale, k_zero, kv_bits, group_size).double()], dim=2)
    v = torch.cat([v_prompt.double(), kv_dequantize(v_q, v_scale, v_zero, kv_bits, group_size).double()], dim=2)
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.matmul(q.double(), k.transpose(-1, -2)) * scale  # [B, Hq, Tq, L]
    allowed = attention_mask(b, tq, p, s, causal, seq_lens, q.device, window).unsqueeze(1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return torch.matmul(probs, v).to(q.dtype)


# --------------------------------------------------------------------------------------------
# hadamard transform
# --------------------------------------------------------------------------------------------
def hadamard(x: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ (S_p / sqrt(p) (x) B)^T along the last dim n = p * m (p a power of two).

    S_p is the Sylvester (Walsh-Hadamard) matrix of order p, B an orthonormal m x m base
    (fp32; None means m = 1), so y is an orthonormal transform of x: with
    B = bisup.rotation.hadamard_base(n) it is x @ hadamard_matrix(n)^T. Computed in float64,
    returned in x's dtype.
    """
    n = x.shape[-1]
    m = 1 if base is None else base.shape[0]
    if base is not None and (base.dim() != 2 or base.shape[1] != m):
        raise ValueError(f"hadamard: base must be square, got {tuple(base.shape)}")
    p = n // m if n % m == 0 else 0
    if p < 1 or p & (p - 1):
        raise ValueError(f"hadamard: n / m must be a power of two, got n={n}, m={m}")
    y = x.to(torch.float64).reshape(-1, p, m)
    if base is not None:
        y = y @ base.to(torch.float64).T
    h = 1
    while h < p:  # butterflies over the chunk index: pairs (a, a + h) with bit h of a clear
        y = y.reshape(-1, p // (2 * h), 2, h, m)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return (y.reshape(x.shape) / p**0.5).to(x.dtype)


# --------------------------------------------------------------------------------------------
# GEMM (W4A4 / W3A3 with group scales, optional INT8 outlier segment)
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
    """y[m, n] = sum_g a_scale[m, g] * w_scale[n, g] * dot_g(qa[m], qw[n])
                 (+ a_outlier_scale[m] * w_outlier_scale[n] * dot(a_outlier[m], w_outlier[n])) (+ bias[n]).

    a_q: INT4 nibbles uint8 [M, K/2] (values of a_bits in {3, 4}); w_q: pack_int4 (w_bits=4,
    [N, K/2]) or pack_int3 (w_bits=3, [N, 3K/8]); scales fp16 [rows, K/group_size]. Exact: the
    integer dots and the scaling are done in float64 (integers < 2^53), cast to out_dtype at the end.
    """
    if a_bits not in (3, 4) or w_bits not in (3, 4):
        raise ValueError(f"gemm: a_bits and w_bits must be 3 or 4, got a_bits={a_bits}, w_bits={w_bits}")
    qa = unpack_int4(a_q).to(torch.float64)
    qw = (unpack_int4(w_q) if w_bits == 4 else unpack_int3(w_q)).to(torch.float64)
    m, k = qa.shape
    n = qw.shape[0]
    if qw.shape[1] != k:
        raise ValueError(f"gemm: a_q holds K={k} but w_q holds K={qw.shape[1]}")
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"gemm: K={k} must be a multiple of group_size={group_size}")
    sa = a_scale.to(torch.float64)
    sw = w_scale.to(torch.float64)
    if sa.shape != (m, k // g) or sw.shape != (n, k // g):
        raise ValueError(f"gemm: scales must be [{m}, {k // g}] and [{n}, {k // g}], got {tuple(sa.shape)}, {tuple(sw.shape)}")
    y = torch.zeros(m, n, dtype=torch.float64, device=qa.device)
    for i in range(k // g):  # one float64 matmul per group keeps memory at M*N
        sl = slice(i * g, (i + 1) * g)
        y += (qa[:, sl] @ qw[:, sl].T) * sa[:, i : i + 1] * sw[:, i]
    outliers = (a_outlier, a_outlier_scale, w_outlier, w_outlier_scale)
    if any(t is not None for t in outliers):
        if any(t is None for t in outliers):
            raise ValueError("gemm: give all four outlier tensors or none")
        dot = a_outlier.to(torch.float64) @ w_outlier.to(torch.float64).T
        y += dot * a_outlier_scale.to(torch.float64)[:, None] * w_outlier_scale.to(torch.float64)
    if bias is not None:
        y += bias.to(torch.float64)
    return y.to(out_dtype)
