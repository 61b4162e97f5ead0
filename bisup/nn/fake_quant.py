"""Fake-quant (simulation) modules: quantize-dequantize in floating point, same math as the kernels.

Scales are rounded to fp16 as the kernels store them, and a fake-quantized weight is kept together
with its fp16 scales so that its integer codes can be exported exactly (save_quantized) and
dequantized back bit-identically (load_quantized). Formulas: docs/formats.md.

Outlier channels (Atom): input channels listed in `outlier_idx` are quantized per row (weights) or
per token (activations, without clipping) at `outlier_bits`; the remaining channels, in their original order, are
quantized in groups of `group_size` (a last, shorter group when the remaining count is not a
multiple of the group size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from bisup.quant.quantizer import FP16_MAX, qrange, quantize_groups, to_groups

OFF_BITS = 16
SCALE_DTYPE = torch.float16


# ------------------------------------------------------------------------------------------------
# grouped quantization with an optional shorter last group
# ------------------------------------------------------------------------------------------------
def _quantize_ragged(x, bits, group_size, sym, clip) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [..., K] (fp32-valued), scales and zeros [..., G] along the last dim.

    group_size=-1: one group; K % group_size != 0: the last group is shorter.
    """
    k = x.shape[-1]
    g = k if group_size == -1 or group_size >= k else group_size
    if sym and k % g == 0 and not _needs_grad(x, clip):
        return _fast_sym_codes(x, bits, g, clip)
    full = (k // g) * g
    parts = [(0, full, g)] + ([(full, k, k - full)] if full < k else [])
    qs, ss, zs = [], [], []
    for lo, hi, size in parts:
        q, s, z = quantize_groups(x[..., lo:hi], bits, size, sym, clip, scale_dtype=SCALE_DTYPE)
        qs.append(q.reshape(*x.shape[:-1], hi - lo))
        ss.append(s.squeeze(-1))
        zs.append(z.squeeze(-1))
    return torch.cat(qs, -1), torch.cat(ss, -1), torch.cat(zs, -1)


def _expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group values [..., G] -> per-element [..., K] (matching _quantize_ragged's groups)."""
    g = k if group_size == -1 or group_size >= k else group_size
    sizes = [g] * (k // g) + ([k % g] if k % g else [])
    return torch.repeat_interleave(t, torch.tensor(sizes, device=t.device), dim=-1)


def _dequant(codes, scales, zeros, group_size) -> torch.Tensor:
    """(q - z) * s in fp32, the one formula used by construction, save and load."""
    k = codes.shape[-1]
    g = k if group_size == -1 or group_size >= k else group_size
    if k % g == 0:  # equal groups: broadcast instead of expanding (same elementwise arithmetic)
        q = codes.to(torch.float32).reshape(*codes.shape[:-1], k // g, g)
        if zeros is not None:
            q = q - zeros.to(torch.float32)[..., None]
        return (q * scales.to(torch.float32)[..., None]).reshape(codes.shape)
    s = _expand_groups(scales.to(torch.float32), k, group_size)
    q = codes.to(torch.float32)
    if zeros is not None:
        q = q - _expand_groups(zeros.to(torch.float32), k, group_size)
    return q * s


def _needs_grad(x, clip) -> bool:
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


def _fast_sym_fake_quant(x, bits, group_size, clip):
    q, s = _fast_sym_grouped(x, bits, group_size, clip)
    return (q * s).reshape(x.shape).to(x.dtype)


def _fast_sym_codes(x, bits, group_size, clip):
    q, s = _fast_sym_grouped(x, bits, group_size, clip)
    s = s.squeeze(-1)
    return q.reshape(x.shape), s, torch.zeros_like(s)


def fake_quant_channels(x, bits, group_size, sym=True, clip=1.0, outlier_idx=None, outlier_bits=8):
    """Fake-quantize the last dim: outlier channels per row at outlier_bits, the rest in groups.

    `clip` applies to the low-bit groups only: the outlier channels keep their full range (Atom's
    INT8 channels exist to hold the large values; QuantLinear's INT8 segment is not clipped either)."""
    if outlier_idx is None or outlier_idx.numel() == 0:
        if bits >= OFF_BITS:
            return x
        k = x.shape[-1]
        if sym and (group_size == -1 or k % group_size == 0) and not _needs_grad(x, clip):
            return _fast_sym_fake_quant(x, bits, group_size, clip)
        q, s, z = _quantize_ragged(x, bits, group_size, sym, clip)
        return _dequant(q, s, None if sym else z, group_size).to(x.dtype)
    main_idx = complement(outlier_idx, x.shape[-1])
    out = torch.empty_like(x)
    out[..., main_idx] = fake_quant_channels(x[..., main_idx], bits, group_size, sym, clip)
    out[..., outlier_idx] = fake_quant_channels(x[..., outlier_idx], outlier_bits, -1, sym, 1.0)
    return out


def complement(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted channel indices in [0, k) that are not in idx."""
    keep = torch.ones(k, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return torch.nonzero(keep).flatten()


def _as_index(idx, device=None) -> Optional[torch.Tensor]:
    if idx is None:
        return None
    t = torch.as_tensor(idx, dtype=torch.long, device=device).flatten().clone()  # own copy (no shared storage)
    if t.unique().numel() != t.numel():
        raise ValueError("outlier_idx must not contain duplicates")
    return t


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Per-token fake quantization of the last dim (groups of group_size; -1 = whole token)."""

    def __init__(self, bits: int, group_size: int = -1, sym: bool = True, clip: Union[float, torch.Tensor] = 1.0,
                 outlier_idx: Optional[Sequence[int]] = None, outlier_bits: int = 8):
        super().__init__()
        self.bits, self.group_size, self.sym, self.clip = bits, group_size, sym, clip
        self.outlier_bits = outlier_bits
        idx = _as_index(outlier_idx)
        self.register_buffer("outlier_idx", idx if idx is not None else torch.empty(0, dtype=torch.long))

    @property
    def enabled(self) -> bool:
        return self.bits < OFF_BITS or (self.outlier_idx.numel() > 0 and self.outlier_bits < OFF_BITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quant_channels(x, self.bits, self.group_size, self.sym, self.clip,
                                   self.outlier_idx if self.outlier_idx.numel() else None, self.outlier_bits)

    def to_config(self) -> dict:
        clip = float(self.clip) if not isinstance(self.clip, torch.Tensor) or self.clip.numel() == 1 else None
        if clip is None:
            raise NotImplementedError("ActQuantizer.to_config: tensor-valued clip ratios are not serializable yet")
        return dict(bits=self.bits, group_size=self.group_size, sym=self.sym, clip=clip,
                    outlier_bits=self.outlier_bits)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}, clip={self.clip}, "
                f"outliers={self.outlier_idx.numel()}@{self.outlier_bits}b")


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
@dataclass
class WeightCodes:
    """Integer form of a fake-quantized weight [N, K] (what save_quantized packs).

    codes: int8 [N, Km] of the non-outlier channels (in order), scales/zeros fp16 [N, G];
    outlier_codes int8 [N, n_out] with outlier_scales/zeros fp16 [N, 1] for channels outlier_idx.
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

    def dequantize(self, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        main = _dequant(self.codes, self.scales, self.zeros, self.group_size)
        if self.outlier_idx is None or self.outlier_idx.numel() == 0:
            return main.to(dtype)
        w = torch.empty(main.shape[0], in_features, dtype=torch.float32, device=main.device)
        w[:, complement(self.outlier_idx, in_features)] = main
        w[:, self.outlier_idx] = _dequant(self.outlier_codes, self.outlier_scales, self.outlier_zeros, -1)
        return w.to(dtype)


def _codes_of(w, bits, group_size, sym, clip):
    q, s, z = _quantize_ragged(w, bits, group_size, sym, clip)
    return q.to(torch.int8), s.to(SCALE_DTYPE), (None if sym else z.to(SCALE_DTYPE))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True, clip: float = 1.0,
                    outlier_idx: Optional[torch.Tensor] = None, outlier_bits: int = 8) -> WeightCodes:
    """RTN codes of a weight [N, K] (groups along K, outlier input channels per row)."""
    w = weight.detach()
    has_out = outlier_idx is not None and outlier_idx.numel() > 0
    main = w[:, complement(outlier_idx, w.shape[1])] if has_out else w
    q, s, z = _codes_of(main, bits, group_size, sym, clip)
    wc = WeightCodes(bits, group_size, sym, q, s, z)
    if has_out:
        oq, os_, oz = _codes_of(w[:, outlier_idx], outlier_bits, -1, sym, 1.0)
        wc.outlier_idx, wc.outlier_bits = outlier_idx, outlier_bits
        wc.outlier_codes, wc.outlier_scales, wc.outlier_zeros = oq, os_, oz
    return wc


def _codes_on_grid(w, scales, zeros, bits, group_size, sym, dtype) -> torch.Tensor:
    """Codes of an already dequantized w given its scales (and zeros); ValueError if w is off that grid."""
    k = w.shape[-1]
    s = _expand_groups(scales.to(torch.float32), k, group_size)
    q = torch.round(w.to(torch.float32) / s)
    if zeros is not None:
        q = q + _expand_groups(zeros.to(torch.float32), k, group_size)
    lo, hi = qrange(bits, sym)
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise ValueError(f"weight is not on the given {bits}-bit grid: codes outside [{lo}, {hi}]")
    codes = q.to(torch.int8)
    if not torch.equal(_dequant(codes, scales, zeros, group_size).to(dtype), w.to(dtype)):
        raise ValueError("weight is not on the grid of the given scales (dequantized codes differ)")
    return codes


def _infer_sym_codes(w, bits, group_size, dtype):
    """Codes and fp16 scales of a symmetric dequantized weight whose scales were not given.

    In each group, s = max|w| / m for the largest code magnitude m that occurred; try every m and
    keep, per group, the first one that reproduces the group exactly.
    """
    k = w.shape[-1]
    g = k if group_size == -1 or group_size >= k else group_size
    lo, hi = qrange(bits, True)
    wf = w.to(torch.float32)
    amax = torch.stack([blk.abs().amax(-1) for blk in torch.split(wf, g, dim=-1)], -1)  # [N, G]
    best_s = torch.ones_like(amax)
    found = amax == 0
    for m in range(-lo, 0, -1):
        s = (amax / m).to(SCALE_DTYPE).to(torch.float32)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(wf / _expand_groups(s, k, group_size)).clamp(lo, hi)
        ok_elem = (q * _expand_groups(s, k, group_size)).to(dtype) == w.to(dtype)
        ok = torch.stack([blk.all(-1) for blk in torch.split(ok_elem, g, dim=-1)], -1)
        take = ok & ~found
        best_s = torch.where(take, s, best_s)
        found |= ok
    if not bool(found.all()):
        raise ValueError(
            "cannot recover integer codes of this weight: it is not on a symmetric "
            f"{bits}-bit group grid. Pass its scales: set_weight(w, scales=..., zeros=...)")
    scales = best_s.to(SCALE_DTYPE)
    return _codes_on_grid(w, scales, None, bits, group_size, True, dtype), scales


class FakeQuantLinear(nn.Module):
    """A linear layer with a fake-quantized weight and optional activation quantization.

    forward(x) = F.linear(act_quantizer(input_transform(x)), weight, bias), each step optional.
    """

    def __init__(self, linear: nn.Linear, w_bits: int, w_group_size: int, w_sym: bool = True, w_clip: float = 1.0,
                 act_quantizer: Optional[ActQuantizer] = None, input_transform: Optional[Callable] = None,
                 outlier_idx: Optional[Sequence[int]] = None, outlier_bits: int = 8,
                 weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_bits, self.w_group_size, self.w_sym, self.w_clip = w_bits, w_group_size, w_sym, w_clip
        self.outlier_bits = outlier_bits
        self.act_quantizer = act_quantizer
        self.input_transform = input_transform
        dev, dtype = linear.weight.device, linear.weight.dtype
        if linear.weight.is_meta and weight is not None:  # a shell (load_quantized): the weight decides
            dev, dtype = weight.device, weight.dtype
        idx = _as_index(outlier_idx, dev)
        self.register_buffer("outlier_idx", idx if idx is not None else torch.empty(0, dtype=torch.long, device=dev))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._codes: Optional[WeightCodes] = None
        if weight is not None:
            self.weight = nn.Parameter(weight.detach().to(device=dev, dtype=dtype).clone(), requires_grad=False)
        elif not self.quantized:
            self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        else:
            wc = quantize_weight(linear.weight, w_bits, w_group_size, w_sym, w_clip, self._out_idx, outlier_bits)
            self._codes = wc
            self.weight = nn.Parameter(wc.dequantize(self.in_features, dtype), requires_grad=False)
        self._check_shape(self.weight)

    @property
    def _out_idx(self) -> Optional[torch.Tensor]:
        return self.outlier_idx if self.outlier_idx.numel() else None

    @property
    def quantized(self) -> bool:
        """Whether the weight is quantized at all (w_bits < 16 or outlier channels below 16 bits)."""
        return self.w_bits < OFF_BITS

    def _check_shape(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape {(self.out_features, self.in_features)}, got {tuple(w.shape)}")

    def set_weight(self, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
                   zeros: Optional[torch.Tensor] = None, outlier_scales: Optional[torch.Tensor] = None,
                   outlier_zeros: Optional[torch.Tensor] = None) -> None:
        """Replace the weight by an already quantized-dequantized one (e.g. from GPTQ).

        Scales [N, G] (and zeros for asymmetric) let save_quantized export exact codes; without them
        symmetric codes are recovered from the weight itself, or codes are checked when exported.
        """
        self._check_shape(weight)
        with torch.no_grad():
            self.weight.data = weight.detach().to(self.weight.dtype).clone()
        self._codes = None
        if scales is not None and self.quantized:
            self._codes = self._codes_from_scales(scales, zeros, outlier_scales, outlier_zeros)

    def _codes_from_scales(self, scales, zeros, outlier_scales, outlier_zeros) -> WeightCodes:
        w, dt, idx = self.weight.data, self.weight.dtype, self._out_idx
        main = w[:, complement(idx, self.in_features)] if idx is not None else w
        scales = scales.to(SCALE_DTYPE)
        zeros = None if zeros is None else zeros.to(SCALE_DTYPE)
        codes = _codes_on_grid(main, scales, zeros, self.w_bits, self.w_group_size, self.w_sym, dt)
        wc = WeightCodes(self.w_bits, self.w_group_size, self.w_sym, codes, scales, zeros)
        if idx is not None:
            if outlier_scales is None:
                oc, os_ = _infer_sym_codes(w[:, idx], self.outlier_bits, -1, dt)
                oz = None
            else:
                os_ = outlier_scales.to(SCALE_DTYPE).reshape(-1, 1)
                oz = None if outlier_zeros is None else outlier_zeros.to(SCALE_DTYPE).reshape(-1, 1)
                oc = _codes_on_grid(w[:, idx], os_, oz, self.outlier_bits, -1, self.w_sym, dt)
            wc.outlier_idx, wc.outlier_bits = idx, self.outlier_bits
            wc.outlier_codes, wc.outlier_scales, wc.outlier_zeros = oc, os_, oz
        return wc

    def weight_codes(self) -> WeightCodes:
        """The integer codes + scales of the current weight (exactly reproducing it)."""
        if not self.quantized:
            raise ValueError("this FakeQuantLinear keeps its weight in floating point (w_bits >= 16)")
        if self._codes is None:
            if not self.w_sym:
                raise ValueError("asymmetric weights set without scales: call set_weight(w, scales=..., zeros=...)")
            w, dt, idx = self.weight.data, self.weight.dtype, self._out_idx
            main = w[:, complement(idx, self.in_features)] if idx is not None else w
            codes, scales = _infer_sym_codes(main, self.w_bits, self.w_group_size, dt)
            wc = WeightCodes(self.w_bits, self.w_group_size, True, codes, scales)
            if idx is not None:
                oc, os_ = _infer_sym_codes(w[:, idx], self.outlier_bits, -1, dt)
                wc.outlier_idx, wc.outlier_bits, wc.outlier_codes, wc.outlier_scales = idx, self.outlier_bits, oc, os_
            self._codes = wc
        return self._codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, *args, **kwargs):
        # keep cached integer codes on the same device as the weight
        out = super()._apply(fn, *args, **kwargs)
        if self._codes is not None:
            dev = self.weight.device
            for name in ("codes", "scales", "zeros", "outlier_idx", "outlier_codes", "outlier_scales", "outlier_zeros"):
                t = getattr(self._codes, name)
                if t is not None:
                    setattr(self._codes, name, t.to(dev))
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, "
                f"group={self.w_group_size}, sym={self.w_sym}, outliers={self.outlier_idx.numel()}@{self.outlier_bits}b, "
                f"bias={self.bias is not None}")
