"""Pure-PyTorch reference of every bisup op: THE semantics.

The CPU twins (csrc/cpu) and CUDA kernels (csrc/cuda) must match these functions (exactly for
integer and packing ops). They are also the differentiable path used in fake-quant simulation
and QA fine-tuning. Data formats: docs/formats.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bisup.quant.quantizer import qrange, quantize_groups

INT3_BLOCK = 32  # values per INT3 block (3 uint32 words = 12 bytes)


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
    return bytes_.reshape(*q.shape[:-1], k // INT3_BLOCK * 12).to(torch.uint8)


def unpack_int3(packed: torch.Tensor, is_signed: bool = True) -> torch.Tensor:
    """uint8 [..., 3K/8] -> int8 [..., K]."""
    n = packed.shape[-1]
    if n % 12:
        raise ValueError("unpack_int3: last dim must be a multiple of 12 bytes")
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], n // 12, 3, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # [..., blocks, 3]
    word, lo_off, hi_off = _int3_positions(packed.device)
    lo = (words[..., word] >> lo_off) & 3
    hi = (words[..., 2:3] >> hi_off) & 1
    v = lo | (hi << 2)
    if is_signed:
        v = torch.where(v >= 4, v - 8, v)
    return v.reshape(*packed.shape[:-1], n // 12 * INT3_BLOCK).to(torch.int8)


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
