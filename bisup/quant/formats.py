"""The storage formats' constants and size rules, defined once for the whole Python side.

The C++ side defines the same numbers in csrc/pack_format.h; docs/formats.md describes both.
"""
from __future__ import annotations

import torch

OFF_BITS = 16  # a bit width of 16 means "not quantized"
SCALE_DTYPE = torch.float16  # every stored scale and zero point

INT3_BLOCK_VALUES = 32  # INT3 packs 32 values ...
INT3_BLOCK_BYTES = 12  # ... into three 32-bit words

KV_BITS = (3, 4, 8)  # what the KV cache kernels store (plus OFF_BITS: the cache keeps full precision)
GEMM_BITS = (3, 4)  # weight / activation widths of the integer GEMM

# How activations are quantized at run time (QuantConfig.a_convention):
#   "bisup": s = fp16(clip * max|x| / (2^(b-1) - 1)), what bisup's kernels compute (docs/formats.md);
#   "compressed-tensors": s = max|x| / ((2^b - 1) / 2) in the activation's dtype, no clip: the
#   format's reference quantizer (compressed-tensors' own function, run by transformers; vLLM's INT4
#   kernels compute their own variant: README "Serve with vLLM").
BISUP_ACTS, ENGINE_ACTS = "bisup", "compressed-tensors"
ACT_CONVENTIONS = (BISUP_ACTS, ENGINE_ACTS)


def is_off(bits: int) -> bool:
    return bits >= OFF_BITS


def effective_group(k: int, group_size: int) -> int:
    """The group length used along a dim of length k: -1 (or a group at least as long as k) is one group."""
    return k if group_size == -1 or group_size >= k else group_size


def num_groups(k: int, group_size: int) -> int:
    """Groups along a dim of length k, counting a shorter last group."""
    g = effective_group(k, group_size)
    return -(-k // g) if k else 0


def packing_of(bits: int, k: int) -> str:
    """How codes of `bits` along a row of k values are stored: "int3", "int4" or "int8"."""
    if bits == 3 and k % INT3_BLOCK_VALUES == 0:
        return "int3"
    if bits <= 4 and k % 2 == 0:
        return "int4"
    return "int8"


def _packing_name(packing_or_bits) -> str:
    """ "int3"/"int4"/"int8", or the bit width 3/4/8 stored that way."""
    if isinstance(packing_or_bits, str):
        return packing_or_bits
    return {3: "int3", 4: "int4", 8: "int8"}.get(packing_or_bits, repr(packing_or_bits))


def packed_row_bytes(packing_or_bits, k: int) -> int:
    """Bytes of one packed row of k values; packing is "int3"/"int4"/"int8" or a bit width 3/4/8."""
    kind = _packing_name(packing_or_bits)
    if kind == "int4":
        if k % 2:
            raise ValueError(f"INT4 rows need an even length, got {k}")
        return k // 2
    if kind == "int3":
        if k % INT3_BLOCK_VALUES:
            raise ValueError(f"INT3 rows need a multiple of {INT3_BLOCK_VALUES} values, got {k}")
        return k // INT3_BLOCK_VALUES * INT3_BLOCK_BYTES
    if kind == "int8":
        return k
    raise ValueError(f"no packed format for {packing_or_bits!r}; expected 'int3', 'int4', 'int8' or 3, 4, 8 bits")


def unpacked_row_values(packing_or_bits, row_bytes: int) -> int:
    """Values in one packed row of row_bytes bytes (inverse of packed_row_bytes)."""
    kind = _packing_name(packing_or_bits)
    if kind == "int4":
        return row_bytes * 2
    if kind == "int3":
        return row_bytes // INT3_BLOCK_BYTES * INT3_BLOCK_VALUES
    if kind == "int8":
        return row_bytes
    raise ValueError(f"no packed format for {packing_or_bits!r}; expected 'int3', 'int4', 'int8' or 3, 4, 8 bits")


def check_kv_bits(bits: int, where: str) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"{where}: kv bits must be one of {KV_BITS}, got {bits}")
