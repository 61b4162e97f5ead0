"""Group quantization along the last dim with an optional shorter last group, and outlier channels.

The formulas are quantize_groups' (bisup/quant/quantizer.py, the reference of the kernels), with
scales rounded to fp16 as the kernels store them. Group rule: groups of `group_size` consecutive
values; -1 (or a group at least as long as the row) is one group; when the row length is not a
multiple of the group size the last group is shorter.

Outlier channels (Atom): the columns listed in `outlier_idx` are quantized per row at their own
bit width without clipping; the remaining columns, in their original order, form the groups.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bisup.quant.formats import OFF_BITS, SCALE_DTYPE, effective_group
from bisup.quant.quantizer import FP16_MAX, clip_grid, mse_clip, qrange, quantize_groups, to_groups


def needs_grad(x: torch.Tensor, clip) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (isinstance(clip, torch.Tensor) and clip.requires_grad))


def _fast_sym_grouped(x, bits, group_size, clip):
    """Inference-only twin of quantize_groups (symmetric, K % group == 0): the same fp32 operations
    without the STE bookkeeping, so codes and scales are bit-identical (tests check it).
    Returns codes [..., G, g] and scales [..., G, 1], both fp32."""
    qmin, qmax = qrange(bits, True)
    xg = to_groups(x, group_size).to(torch.float32)
    s = (clip * xg.abs().amax(dim=-1, keepdim=True)) / qmax
    s = s.clamp_(max=FP16_MAX).to(SCALE_DTYPE).to(torch.float32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(xg / s).clamp_(qmin, qmax), s


def ragged_parts(k: int, group_size: int):
    """(lo, hi, group length) of the full groups and the shorter last group along k."""
    g = effective_group(k, group_size)
    full = (k // g) * g
    return [(0, full, g)] + ([(full, k, k - full)] if full < k else [])


def searched_clips(x, bits, group_size, sym, clip) -> torch.Tensor:
    """Each group's least-squared-error clip ratio of clip_grid(clip) (mse_clip): [..., G]."""
    return torch.cat([mse_clip(to_groups(x[..., lo:hi], size), bits, sym, clip_grid(clip), SCALE_DTYPE).squeeze(-1)
                      for lo, hi, size in ragged_parts(x.shape[-1], group_size)], -1)


def quantize_ragged(x, bits, group_size, sym, clip, clip_search: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [..., K] (fp32-valued), scales and zeros [..., G] (fp16-valued fp32) along the last dim.

    clip_search: each group's clip ratio is the best of clip_grid(clip) (mse_clip) instead of clip."""
    k = x.shape[-1]
    g = effective_group(k, group_size)
    if sym and k % g == 0 and not clip_search and not needs_grad(x, clip):
        q, s = _fast_sym_grouped(x, bits, g, clip)
        s = s.squeeze(-1)
        return q.reshape(x.shape), s, torch.zeros_like(s)
    clips = searched_clips(x, bits, group_size, sym, clip) if clip_search else None
    qs, ss, zs = [], [], []
    col = 0
    for lo, hi, size in ragged_parts(k, group_size):
        n_g = (hi - lo) // size
        c = clip if clips is None else clips[..., col:col + n_g, None]
        col += n_g
        q, s, z = quantize_groups(x[..., lo:hi], bits, size, sym, c, scale_dtype=SCALE_DTYPE)
        qs.append(q.reshape(*x.shape[:-1], hi - lo))
        ss.append(s.squeeze(-1))
        zs.append(z.squeeze(-1))
    return torch.cat(qs, -1), torch.cat(ss, -1), torch.cat(zs, -1)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group values [..., G] -> per-element [..., K] (the groups of quantize_ragged)."""
    g = effective_group(k, group_size)
    sizes = [g] * (k // g) + ([k % g] if k % g else [])
    return torch.repeat_interleave(t, torch.tensor(sizes, device=t.device), dim=-1, output_size=k)  # no device sync


def dequantize_ragged(codes, scales, zeros, group_size) -> torch.Tensor:
    """(q - z) * s in fp32: the one formula used by construction, save and load."""
    k = codes.shape[-1]
    g = effective_group(k, group_size)
    if k % g == 0:  # equal groups: broadcast instead of expanding (same elementwise arithmetic)
        q = codes.to(torch.float32).reshape(*codes.shape[:-1], k // g, g)
        if zeros is not None:
            q = q - zeros.to(torch.float32)[..., None]
        return (q * scales.to(torch.float32)[..., None]).reshape(codes.shape)
    s = expand_groups(scales.to(torch.float32), k, group_size)
    q = codes.to(torch.float32)
    if zeros is not None:
        q = q - expand_groups(zeros.to(torch.float32), k, group_size)
    return q * s


def complement(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted channel indices in [0, k) that are not in idx."""
    keep = torch.ones(k, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return torch.nonzero(keep).flatten()


def as_index(idx, device=None) -> Optional[torch.Tensor]:
    """A 1-D LongTensor copy of idx on `device` (default: idx's own, for a tensor); duplicates are an error."""
    if idx is None:
        return None
    if device is None and isinstance(idx, torch.Tensor):  # not the ambient default device
        device = idx.device
    t = torch.as_tensor(idx, dtype=torch.long, device=device).flatten().clone()  # own copy (no shared storage)
    if t.unique().numel() != t.numel():
        raise ValueError("outlier_idx must not contain duplicates")
    return t


def fake_quant_channels(x, bits, group_size, sym=True, clip=1.0, outlier_idx=None, outlier_bits=8):
    """Fake-quantize the last dim: outlier channels per row at outlier_bits, the rest in groups.

    `clip` applies to the low-bit groups only: the outlier channels keep their full range (Atom's
    INT8 channels exist to hold the large values; QuantLinear's INT8 segment is not clipped either)."""
    if outlier_idx is None or outlier_idx.numel() == 0:
        if bits >= OFF_BITS:
            return x
        k = x.shape[-1]
        if sym and k % effective_group(k, group_size) == 0 and not needs_grad(x, clip):
            q, s = _fast_sym_grouped(x, bits, effective_group(k, group_size), clip)
            return (q * s).reshape(x.shape).to(x.dtype)
        q, s, z = quantize_ragged(x, bits, group_size, sym, clip)
        return dequantize_ragged(q, s, None if sym else z, group_size).to(x.dtype)
    main_idx = complement(outlier_idx, x.shape[-1])
    out = torch.empty_like(x)
    out[..., main_idx] = fake_quant_channels(x[..., main_idx], bits, group_size, sym, clip)
    out[..., outlier_idx] = fake_quant_channels(x[..., outlier_idx], outlier_bits, -1, sym, 1.0)
    return out
