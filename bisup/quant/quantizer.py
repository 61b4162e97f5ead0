"""Differentiable group quantizers (pure PyTorch).

One formula serves the fake-quant used in simulation and QA fine-tuning and the reference of the
`quantize_pack` op (bisup/reference.py), so they cannot drift apart:

    symmetric : s = (clip * max|x|) / (2^(b-1) - 1),            q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)
    asymmetric: s = (clip_hi * max x - clip_lo * min x) / (2^b - 1),
                z = round(-(clip_lo * min x) / s)  (not clamped: one-sided groups keep all codes),
                q = clamp(round(x / s) + z, 0, 2^b - 1)

With scale_dtype=float16 (what the kernels store) s and z are rounded to fp16 before use.
Scales that come out as 0 (an all-zero group, or fp16 underflow) become 1, never 0 or NaN.
Rounding is round-half-to-even everywhere (torch.round, std::nearbyint, rintf).

Gradients: rounding uses a straight-through estimator, so gradients reach `x` (zero where the
value was clipped) and the clip parameters through the scale (LSQ/OmniQuant-style), which is
what the learnable clipping of the QA fine-tuning needs.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from bisup.quant.formats import effective_group

ClipLike = Union[float, torch.Tensor]
FP16_MAX = 65504.0


def qrange(bits: int, sym: bool) -> Tuple[int, int]:
    """Integer range of a `bits`-bit code: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)


def to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., K] -> [..., K/g, g] (group_size=-1: one group per row)."""
    k = x.shape[-1]
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g != 0:
        raise ValueError(f"last dim K={k} must be a multiple of group_size={group_size}")
    return x.reshape(*x.shape[:-1], k // g, g)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round-half-to-even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _as_clip(clip: ClipLike, like: torch.Tensor) -> torch.Tensor:
    if isinstance(clip, torch.Tensor):
        return clip.to(torch.float32)
    return torch.tensor(float(clip), dtype=torch.float32, device=like.device)


def _finalize_scale(s: torch.Tensor, scale_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if scale_dtype is not None:
        s = s.clamp(max=FP16_MAX).to(scale_dtype).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def group_params(
    xg: torch.Tensor,
    bits: int,
    sym: bool,
    clip_ratio: ClipLike = 1.0,
    clip_lo: Optional[ClipLike] = None,
    scale_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [..., G, 1] (fp32) of grouped data xg [..., G, g].

    clip_ratio (and, for asymmetric, clip_lo for the lower end; defaults to clip_ratio) may be
    floats or tensors broadcastable to [..., G, 1]. scale_dtype=float16 rounds scales as the
    kernels store them.
    """
    xf = xg.to(torch.float32)
    clip_hi = _as_clip(clip_ratio, xf)
    qmin, qmax = qrange(bits, sym)
    if sym:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        s = _finalize_scale((clip_hi * amax) / qmax, scale_dtype)
        return s, torch.zeros_like(s)
    lo_clip = clip_hi if clip_lo is None else _as_clip(clip_lo, xf)
    hi = xf.amax(dim=-1, keepdim=True)
    lo = xf.amin(dim=-1, keepdim=True)
    lo_c = lo_clip * lo
    s = _finalize_scale((clip_hi * hi - lo_c) / qmax, scale_dtype)
    z = round_ste(-lo_c / s)
    if scale_dtype is not None:
        z = z.clamp(-FP16_MAX, FP16_MAX).to(scale_dtype).to(torch.float32)
    return s, z


_SEARCH_CHUNK = 1 << 16  # values of one chunk of rows in mse_clip (fits in L2 with its temporaries)


def clip_grid(clip: float, steps: int = 20, low: float = 0.5) -> Tuple[float, ...]:
    """Candidate clip ratios of the weight clip search: clip * (1 - i (1 - low) / steps), i = 0..steps."""
    return tuple(clip * (1.0 - i * (1.0 - low) / steps) for i in range(steps + 1))


def mse_clip(xg: torch.Tensor, bits: int, sym: bool, clips: Tuple[float, ...],
             scale_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per group of xg [..., G, g], the ratio in `clips` whose quantize-dequantize has the least
    squared error (the first one on ties): a clip tensor [..., G, 1] for group_params.

    A smaller clip trades clipping error at the group's extremes for a finer step everywhere else.
    At 4 bits symmetric, clip 1 never uses code -8 (s = max|x| / 7); clip 7/7.5 maps -max|x| onto
    -8 (the s = max|x| / 7.5 convention of other libraries); the search goes further where it pays.
    """
    xf = xg.detach().to(torch.float32)
    qmin, qmax = qrange(bits, sym)
    flat = xf.reshape(-1, *xf.shape[-2:])  # [rows, G, g]
    out = torch.empty(*flat.shape[:-1], 1, dtype=torch.float32, device=xf.device)
    rows = max(1, _SEARCH_CHUNK // max(1, flat[0].numel()))
    for r0 in range(0, flat.shape[0], rows):  # a cache-sized chunk through every candidate, in place
        x = flat[r0:r0 + rows]
        best_err = best = None
        for c in clips:
            s, z = group_params(x, bits, sym, c, scale_dtype=scale_dtype)
            q = torch.div(x, s).round_()
            if not sym:  # (symmetric zeros are 0: adding and subtracting them changes nothing)
                q.add_(z).clamp_(qmin, qmax).sub_(z)
            else:
                q.clamp_(qmin, qmax)
            err = q.mul_(s).sub_(x).square_().sum(-1, keepdim=True)
            if best is None:
                best_err, best = err, torch.full_like(err, c)
            else:
                take = err < best_err
                best_err, best = torch.where(take, err, best_err), torch.where(take, torch.full_like(err, c), best)
        out[r0:r0 + rows] = best
    return out.reshape(*xf.shape[:-1], 1)


def quantize_groups(
    x: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    clip_ratio: ClipLike = 1.0,
    clip_lo: Optional[ClipLike] = None,
    scale_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (fp32-valued, differentiable by STE) [..., G, g], scale and zero [..., G, 1]."""
    xg = to_groups(x, group_size)
    s, z = group_params(xg, bits, sym, clip_ratio, clip_lo, scale_dtype)
    qmin, qmax = qrange(bits, sym)
    q = torch.clamp(round_ste(xg.to(torch.float32) / s) + z, qmin, qmax)
    return q, s, z


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    clip_ratio: ClipLike = 1.0,
    clip_lo: Optional[ClipLike] = None,
    scale_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Quantize-dequantize along the last dim in groups; returns x's shape and dtype.

    Per-token activations: group_size=-1 on [tokens, K]. Per-channel weights: group_size=-1 on
    [out, in]. bits >= 16 returns x unchanged.
    """
    if bits >= 16:
        return x
    q, s, z = quantize_groups(x, bits, group_size, sym, clip_ratio, clip_lo, scale_dtype)
    return ((q - z) * s).reshape(x.shape).to(x.dtype)


def engine_fake_quantize(x: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """compressed-tensors' reference activation quantizer (formats.ENGINE_ACTS): dynamic, symmetric,
    per group of the last dim (-1, or a group at least as long as the row: per token), in x's dtype:

        s = max|x| / ((2^b - 1) / 2)   (0 -> the dtype's eps),   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)

    returns q * s in x's shape and dtype. The last dim must be a multiple of the group (the engines
    refuse a shorter last group). Differentiable: STE through the rounding, the scale through max|x|.
    """
    if bits >= 16:
        return x
    xg = to_groups(x, effective_group(x.shape[-1], group_size))
    qmin, qmax = qrange(bits, True)
    s = xg.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).eps), s)
    q = torch.clamp(round_ste(xg / s), qmin, qmax)
    return (q * s).reshape(x.shape)


def fake_quantize_per_tensor(x: torch.Tensor, bits: int, sym: bool = True, clip_ratio: ClipLike = 1.0) -> torch.Tensor:
    """One scale for the whole tensor."""
    if bits >= 16:
        return x
    return fake_quantize(x.reshape(1, -1), bits, -1, sym, clip_ratio).reshape(x.shape)
