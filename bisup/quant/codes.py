"""Integer weight codes: WeightCodes (codes + fp16 scales of a quantized weight), RTN codes,
recovery of the codes of an already dequantized weight, and packing for storage.

A fake-quantized weight is kept together with its codes so that save_quantized exports them
exactly and load_quantized / the real kernels reproduce the same weight bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from bisup.quant.formats import SCALE_DTYPE, effective_group, packing_of
from bisup.quant.groups import complement, dequantize_ragged, expand_groups, quantize_ragged
from bisup.quant.quantizer import qrange


@dataclass
class WeightCodes:
    """Integer form of a quantized weight [N, K] (what save_quantized packs).

    codes: int8 [N, Km] of the non-outlier channels (in order), scales/zeros fp16 [N, G];
    outlier_codes int8 [N, n_out] with outlier_scales/zeros fp16 [N, 1] for channels outlier_idx.
    (Asymmetric 8-bit codes, in [0, 255], are int16 in memory: code_dtype; stored as uint8 bytes.)
    """

    bits: int
    group_size: int
    sym: bool
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None
    outlier_idx: Optional[torch.Tensor] = None
    outlier_bits: int = 8
    outlier_codes: Optional[torch.Tensor] = None
    outlier_scales: Optional[torch.Tensor] = None
    outlier_zeros: Optional[torch.Tensor] = None

    TENSORS = ("codes", "scales", "zeros", "outlier_idx", "outlier_codes", "outlier_scales", "outlier_zeros")

    @property
    def has_outliers(self) -> bool:
        return self.outlier_idx is not None and self.outlier_idx.numel() > 0

    @property
    def packing(self) -> str:
        """How the main codes are stored: "int3", "int4" or "int8" (bisup.quant.formats)."""
        return packing_of(self.bits, self.codes.shape[1])

    def dequantize(self, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        main = dequantize_ragged(self.codes, self.scales, self.zeros, self.group_size)
        if not self.has_outliers:
            return main.to(dtype)
        w = torch.empty(main.shape[0], in_features, dtype=torch.float32, device=main.device)
        w[:, complement(self.outlier_idx, in_features)] = main
        w[:, self.outlier_idx] = dequantize_ragged(self.outlier_codes, self.outlier_scales, self.outlier_zeros, -1)
        return w.to(dtype)

    def to(self, device) -> "WeightCodes":
        """Moves every tensor to device (in place); returns self."""
        for name in self.TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def with_outliers(self, idx, bits, codes, scales, zeros=None) -> "WeightCodes":
        self.outlier_idx, self.outlier_bits = idx, bits
        self.outlier_codes, self.outlier_scales, self.outlier_zeros = codes, scales, zeros
        return self


def code_dtype(bits: int, sym: bool) -> torch.dtype:
    """The integer dtype holding codes of this format: int8, except unsigned 8-bit codes (int16)."""
    return torch.int16 if bits == 8 and not sym else torch.int8


def _rtn_codes(w, bits, group_size, sym, clip, clip_search=False):
    q, s, z = quantize_ragged(w, bits, group_size, sym, clip, clip_search)
    return q.to(code_dtype(bits, sym)), s.to(SCALE_DTYPE), (None if sym else z.to(SCALE_DTYPE))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True, clip: float = 1.0,
                    outlier_idx: Optional[torch.Tensor] = None, outlier_bits: int = 8,
                    clip_search: bool = False) -> WeightCodes:
    """RTN codes of a weight [N, K] (groups along K, outlier input channels per row); clip_search:
    each group's clip ratio is the least-squared-error one of clip_grid(clip) (outliers: clip 1)."""
    w = weight.detach()
    has_out = outlier_idx is not None and outlier_idx.numel() > 0
    main = w[:, complement(outlier_idx, w.shape[1])] if has_out else w
    wc = WeightCodes(bits, group_size, sym, *_rtn_codes(main, bits, group_size, sym, clip, clip_search))
    if has_out:
        wc.with_outliers(outlier_idx, outlier_bits, *_rtn_codes(w[:, outlier_idx], outlier_bits, -1, sym, 1.0))
    return wc


def codes_on_grid(w, scales, zeros, bits, group_size, sym, dtype) -> torch.Tensor:
    """Codes of an already dequantized w given its scales (and zeros); ValueError if w is off that grid."""
    k = w.shape[-1]
    s = expand_groups(scales.to(torch.float32), k, group_size)
    q = torch.round(w.to(torch.float32) / s)
    if zeros is not None:
        q = q + expand_groups(zeros.to(torch.float32), k, group_size)
    lo, hi = qrange(bits, sym)
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise ValueError(f"weight is not on the given {bits}-bit grid: codes outside [{lo}, {hi}]")
    codes = q.to(code_dtype(bits, sym))
    if not torch.equal(dequantize_ragged(codes, scales, zeros, group_size).to(dtype), w.to(dtype)):
        raise ValueError("weight is not on the grid of the given scales (dequantized codes differ)")
    return codes


def infer_sym_codes(w, bits, group_size, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes and fp16 scales of a symmetric dequantized weight whose scales were not given.

    In each group, s = max|w| / m for the largest code magnitude m that occurred; try every m and
    keep, per group, the first one that reproduces the group exactly.
    """
    k = w.shape[-1]
    g = effective_group(k, group_size)
    lo, hi = qrange(bits, True)
    wf = w.to(torch.float32)
    amax = torch.stack([blk.abs().amax(-1) for blk in torch.split(wf, g, dim=-1)], -1)  # [N, G]
    best_s = torch.ones_like(amax)
    found = amax == 0
    for m in range(-lo, 0, -1):
        s = (amax / m).to(SCALE_DTYPE).to(torch.float32)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(wf / expand_groups(s, k, group_size)).clamp(lo, hi)
        ok_elem = (q * expand_groups(s, k, group_size)).to(dtype) == w.to(dtype)
        ok = torch.stack([blk.all(-1) for blk in torch.split(ok_elem, g, dim=-1)], -1)
        take = ok & ~found
        best_s = torch.where(take, s, best_s)
        found |= ok
    if not bool(found.all()):
        raise ValueError(
            "cannot recover integer codes of this weight: it is not on a symmetric "
            f"{bits}-bit group grid. Pass its scales: set_weight(w, scales=..., zeros=...)")
    scales = best_s.to(SCALE_DTYPE)
    return codes_on_grid(w, scales, None, bits, group_size, True, dtype), scales


def recover_codes(w: torch.Tensor, bits: int, group_size: int, sym: bool, outlier_idx: Optional[torch.Tensor],
                  outlier_bits: int, scales=None, zeros=None, outlier_scales=None, outlier_zeros=None) -> WeightCodes:
    """The WeightCodes of an already quantized-dequantized weight w [N, K] (e.g. from GPTQ).

    With scales (and zeros) the codes are checked to reproduce w exactly; without them symmetric
    codes and scales are inferred from w itself (asymmetric weights need their scales)."""
    dt = w.dtype
    main = w[:, complement(outlier_idx, w.shape[1])] if outlier_idx is not None else w
    if scales is not None:
        scales = scales.to(SCALE_DTYPE)
        zeros = None if zeros is None else zeros.to(SCALE_DTYPE)
        wc = WeightCodes(bits, group_size, sym, codes_on_grid(main, scales, zeros, bits, group_size, sym, dt),
                         scales, zeros)
    elif sym:
        codes, scales = infer_sym_codes(main, bits, group_size, dt)
        wc = WeightCodes(bits, group_size, True, codes, scales)
    else:
        raise ValueError("asymmetric weights set without scales: call set_weight(w, scales=..., zeros=...)")
    if outlier_idx is not None:
        if outlier_scales is None:
            oc, os_ = infer_sym_codes(w[:, outlier_idx], outlier_bits, -1, dt)
            oz = None
        else:
            os_ = outlier_scales.to(SCALE_DTYPE).reshape(-1, 1)
            oz = None if outlier_zeros is None else outlier_zeros.to(SCALE_DTYPE).reshape(-1, 1)
            oc = codes_on_grid(w[:, outlier_idx], os_, oz, outlier_bits, -1, sym, dt)
        wc.with_outliers(outlier_idx, outlier_bits, oc, os_, oz)
    return wc


def pack_codes(codes: torch.Tensor, packing: str, signed: bool) -> torch.Tensor:
    """Codes [N, K] -> their stored form on CPU: INT4 nibbles / INT3 words as uint8; 8-bit codes as
    int8 bytes (unsigned ones, [0, 255], are their uint8 bytes viewed as int8)."""
    from bisup import ops

    codes = codes.contiguous().cpu()
    if packing == "int4":
        return ops.pack_int4(codes.to(torch.int8), signed)
    if packing == "int3":
        return ops.pack_int3(codes.to(torch.int8), signed)
    return codes.to(torch.int8) if signed else codes.to(torch.uint8).view(torch.int8)


def unpack_codes(packed: torch.Tensor, packing: str, signed: bool) -> torch.Tensor:
    """Inverse of pack_codes."""
    from bisup import ops

    if packing == "int4":
        return ops.unpack_int4(packed.contiguous(), signed)
    if packing == "int3":
        return ops.unpack_int3(packed.contiguous(), signed)
    return packed if signed else packed.view(torch.uint8).to(torch.int16)
