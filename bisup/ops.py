"""Typed wrappers over torch.ops.bisup.* (CPU twins and CUDA kernels).

Each op has a fake (meta) implementation so it traces under torch.compile. Semantics:
bisup/reference.py. Formats: docs/formats.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bisup._ext import has_cuda_kernels  # noqa: F401  (also loads the extension)

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
    return q.new_empty(_with_last(q, q.shape[-1] // 32 * 12), dtype=torch.uint8)


@torch.library.register_fake("bisup::unpack_int3")
def _(packed, is_signed=True):
    return packed.new_empty(_with_last(packed, packed.shape[-1] // 12 * 32), dtype=torch.int8)


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
