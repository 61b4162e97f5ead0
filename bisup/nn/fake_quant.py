"""Fake-quant (simulation) modules: ActQuantizer and FakeQuantLinear quantize-dequantize in floating
point with the kernels' math (group math: bisup/quant/groups.py; integer codes: bisup/quant/codes.py;
formulas: docs/formats.md).

A FakeQuantLinear keeps its dequantized weight together with the integer codes and fp16 scales
it stands for (WeightCodes), so save_quantized exports the codes exactly and the real kernels run
the very same weight.

Inference (no gradient) with symmetric weights and activations in the same groups runs the integer
GEMM's arithmetic: on the CPU the QuantLinear twin itself (the C++ GEMM) where it takes the layout,
else in PyTorch (`integer_linear`, the semantics of bisup.ops.gemm in docs/formats.md):
exact integer dots per group, each scaled by sa*sw and added in fp32 in group order, then the INT8
outlier segment, then the bias. So fake mode computes what the kernels compute, bit for bit, and
not a float matmul of dequantized operands (a different rounding that a later quantizer can turn
into a different code). Training (gradients through the STE) keeps the float path. Outlier channels (Atom): input channels listed in `outlier_idx` are quantized
per row (weights) or per token (activations, without clipping) at `outlier_bits`; the remaining
channels, in their original order, are quantized in groups.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from bisup.quant.codes import WeightCodes, quantize_weight, recover_codes
from bisup.quant.formats import ACT_CONVENTIONS, BISUP_ACTS, OFF_BITS, effective_group
from bisup.quant.groups import _fast_sym_grouped as fast_sym_grouped
from bisup.quant.groups import as_index, complement, fake_quant_channels, needs_grad
from bisup.quant.quantizer import engine_fake_quantize

_EXACT_FP32_INT = 2 ** 24  # integers up to this are exact in fp32 (integer dots below it need no float64)
_SCALED_DOT_BOUND = 1 << 13  # |integer dot| <= 2^13: dot * (fp16 scale) is exact in fp32 (13 + 11 bits)
_MAX_CHUNK_ELEMS = 1 << 24  # [groups, rows, out] partial products per chunk of rows (64 MiB of fp32)


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Per-token fake quantization of the last dim (groups of group_size; -1 = whole token).

    convention (formats.ACT_CONVENTIONS): "bisup" quantizes as bisup's kernels do; "compressed-tensors"
    as a compressed-tensors engine does at run time (quantizer.engine_fake_quantize: symmetric,
    unclipped, no outlier channels)."""

    def __init__(self, bits: int, group_size: int = -1, sym: bool = True, clip: Union[float, torch.Tensor] = 1.0,
                 outlier_idx: Optional[Sequence[int]] = None, outlier_bits: int = 8, device=None,
                 convention: str = BISUP_ACTS):
        super().__init__()
        if convention not in ACT_CONVENTIONS:
            raise ValueError(f"ActQuantizer: convention={convention!r}, expected one of {list(ACT_CONVENTIONS)}")
        if convention != BISUP_ACTS and (not sym or outlier_idx is not None and len(outlier_idx)
                                      or not isinstance(clip, (int, float)) or float(clip) != 1.0):
            raise ValueError(f"ActQuantizer: the {convention!r} convention is symmetric, unclipped and has no "
                             f"outlier channels (got sym={sym}, clip={clip}, outliers={outlier_idx is not None})")
        self.bits, self.group_size, self.sym, self.clip = bits, group_size, sym, clip
        self.outlier_bits = outlier_bits
        self.convention = convention
        idx = as_index(outlier_idx, device)
        self.register_buffer("outlier_idx", idx if idx is not None else torch.empty(0, dtype=torch.long, device=device))

    @property
    def enabled(self) -> bool:
        return self.bits < OFF_BITS or (self.outlier_idx.numel() > 0 and self.outlier_bits < OFF_BITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.convention != BISUP_ACTS:
            return engine_fake_quantize(x, self.bits, self.group_size)
        return fake_quant_channels(x, self.bits, self.group_size, self.sym, self.clip,
                                   self.outlier_idx if self.outlier_idx.numel() else None, self.outlier_bits)

    def to_config(self) -> dict:
        clip = float(self.clip) if not isinstance(self.clip, torch.Tensor) or self.clip.numel() == 1 else None
        if clip is None:
            raise NotImplementedError("ActQuantizer.to_config: tensor-valued clip ratios are not serializable yet")
        return dict(bits=self.bits, group_size=self.group_size, sym=self.sym, clip=clip,
                    outlier_bits=self.outlier_bits, convention=self.convention)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}, clip={self.clip}, "
                f"outliers={self.outlier_idx.numel()}@{self.outlier_bits}b, convention={self.convention}")


# the integer GEMM in PyTorch
# ------------------------------------------------------------------------------------------------
class GemmWeight:
    """A weight's codes laid out for integer_linear: main codes fp32 [G, g, N] (zero-padded to whole
    groups), scales fp32 [G, N] (1 for padding), outlier codes fp32 [Ko, N] and scales fp32 [N]."""

    def __init__(self, wc: WeightCodes, in_features: int, device):
        n, km = wc.codes.shape
        g = effective_group(km, wc.group_size)
        groups = -(-km // g)
        codes = F.pad(wc.codes.to(device, torch.float32), (0, groups * g - km))
        self.group, self.groups, self.bits = g, groups, wc.bits
        self.codes = codes.reshape(n, groups, g).permute(1, 2, 0).contiguous()
        scales = torch.ones(n, groups, dtype=torch.float32, device=device)
        scales[:, : wc.scales.shape[1]] = wc.scales.to(device, torch.float32)
        self.scales = scales.T.contiguous()
        # qw * sw is exact in fp32 (a code of <= 8 bits times an fp16 value), and so is every partial sum
        # of sum_k qa*qw*sw = sw * (an integer of at most 13 bits), whatever the summation order; the
        # one product that rounds is then (dot * sw) * sa, as in the kernel (sa * sw is exact).
        self.scaled_codes = None
        self.a_bound = _SCALED_DOT_BOUND // ((1 << (wc.bits - 1)) * g)  # largest |qa| the scaled form takes
        if self.a_bound >= 1:
            self.scaled_codes = self.codes * self.scales[:, None, :]
        self.outlier_idx = self.outlier_codes = self.outlier_scales = None
        self.main_idx = None
        if wc.has_outliers:
            self.outlier_idx = wc.outlier_idx.to(device)
            self.main_idx = complement(self.outlier_idx, in_features)
            self.outlier_bits = wc.outlier_bits
            self.outlier_codes = wc.outlier_codes.to(device, torch.float32).T.contiguous()
            self.outlier_scales = wc.outlier_scales.to(device, torch.float32).reshape(-1)


def _int_dot(a: torch.Tensor, b: torch.Tensor, bound: int) -> torch.Tensor:
    """a @ b of integer-valued fp32 operands, exact: in fp32 when every |dot| <= bound fits, else in float64."""
    if bound < _EXACT_FP32_INT:
        return torch.matmul(a, b)
    return torch.matmul(a.double(), b.double()).float()


def integer_linear(x: torch.Tensor, gw: GemmWeight, a_bits: int, a_clip: float,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T (+ b) computed as bisup.ops.gemm computes it on per-token quantized x (docs/formats.md):

        acc = sum over groups, in order, of fp32(dot_g(qa, qw)) * (sa * sw)   (each * and + rounded once)
        y   = acc + fp32(dot(qa_outlier, qw_outlier)) * (sao * swo) + bias

    x is quantized as QuantLinear quantizes it (symmetric a_bits codes per group of the main channels,
    clip a_clip; INT8 per token, unclipped, for the outlier channels). Returns x's dtype."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    xm = x2 if gw.main_idx is None else x2[:, gw.main_idx]
    g, groups = gw.group, gw.groups
    if xm.shape[-1] != groups * g:  # zero padding keeps every group's scale and codes (zeros do not move max|x|)
        xm = F.pad(xm, (0, groups * g - xm.shape[-1]))
    qa, sa = fast_sym_grouped(xm, a_bits, g, a_clip)  # [M, G, g], [M, G, 1]
    qa = qa.transpose(0, 1)  # [G, M, g]
    sa = sa.squeeze(-1).T  # [G, M]
    m, n = x2.shape[0], gw.codes.shape[-1]
    bound = (1 << (a_bits - 1)) * (1 << (gw.bits - 1)) * g
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    rows = max(1, _MAX_CHUNK_ELEMS // max(1, groups * n))
    scaled = gw.scaled_codes is not None and (1 << (a_bits - 1)) <= gw.a_bound
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        if scaled:  # exact dot * sw, then one rounding by sa (GemmWeight)
            dots = torch.matmul(qa[:, r0:r1], gw.scaled_codes).mul_(sa[:, r0:r1, None])
        else:
            dots = _int_dot(qa[:, r0:r1], gw.codes, bound)  # [G, rows, N], exact integers
            dots.mul_(sa[:, r0:r1, None] * gw.scales[:, None, :])  # sa * sw is exact in fp32 (two fp16 values)
        acc = y[r0:r1]
        acc.copy_(dots[0])
        for i in range(1, groups):
            acc.add_(dots[i])
    if gw.outlier_idx is not None:
        ko = gw.outlier_idx.numel()
        qo, so = fast_sym_grouped(x2[:, gw.outlier_idx], gw.outlier_bits, ko, 1.0)
        bound_o = (1 << (gw.outlier_bits - 1)) ** 2 * ko
        dot = _int_dot(qo.reshape(m, ko), gw.outlier_codes, bound_o)
        y.add_(dot.mul_(so.reshape(m, 1) * gw.outlier_scales[None]))
    if bias is not None:
        y.add_(bias.to(torch.float32))
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return y.to(out_dtype).to(x.dtype).reshape(*lead, n)


# weights
# ------------------------------------------------------------------------------------------------
class FakeQuantLinear(nn.Module):
    """A linear layer with a fake-quantized weight and optional activation quantization.

    forward(x) = F.linear(act_quantizer(input_transform(x)), weight, bias), each step optional.
    """

    def __init__(self, linear: nn.Linear, w_bits: int, w_group_size: int, w_sym: bool = True, w_clip: float = 1.0,
                 act_quantizer: Optional[ActQuantizer] = None, input_transform: Optional[Callable] = None,
                 outlier_idx: Optional[Sequence[int]] = None, outlier_bits: int = 8,
                 weight: Optional[torch.Tensor] = None, w_clip_search: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_bits, self.w_group_size, self.w_sym, self.w_clip = w_bits, w_group_size, w_sym, w_clip
        self.outlier_bits = outlier_bits
        self.act_quantizer = act_quantizer
        self.input_transform = input_transform
        dev, dtype = linear.weight.device, linear.weight.dtype
        if linear.weight.is_meta and weight is not None:  # a shell (load_quantized): the weight decides
            dev, dtype = weight.device, weight.dtype
        idx = as_index(outlier_idx, dev)
        self.register_buffer("outlier_idx", idx if idx is not None else torch.empty(0, dtype=torch.long, device=dev))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._codes: Optional[WeightCodes] = None
        if weight is not None:
            self.weight = nn.Parameter(weight.detach().to(device=dev, dtype=dtype).clone(), requires_grad=False)
        elif not self.quantized:
            self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        else:
            wc = quantize_weight(linear.weight, w_bits, w_group_size, w_sym, w_clip, self._out_idx, outlier_bits,
                                 clip_search=w_clip_search)
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

    @classmethod
    def from_codes(cls, codes: WeightCodes, in_features: int, bias: Optional[torch.Tensor] = None,
                   act_quantizer: Optional[ActQuantizer] = None, input_transform: Optional[Callable] = None,
                   w_clip: float = 1.0, dtype: torch.dtype = torch.float32) -> "FakeQuantLinear":
        """The FakeQuantLinear whose weight is exactly `codes` dequantized (in dtype); w_clip only
        records the clip ratio the codes were made with."""
        n = codes.codes.shape[0]
        shell = nn.Linear(in_features, n, bias=bias is not None, device="meta")
        idx = codes.outlier_idx if codes.has_outliers else None
        fq = cls(shell, codes.bits, codes.group_size, codes.sym, w_clip, act_quantizer, input_transform,
                 idx, codes.outlier_bits, weight=codes.dequantize(in_features, dtype))
        fq._codes = codes
        if bias is not None:
            fq.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return fq

    def set_weight(self, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
                   zeros: Optional[torch.Tensor] = None, outlier_scales: Optional[torch.Tensor] = None,
                   outlier_zeros: Optional[torch.Tensor] = None) -> None:
        """Replace the weight by an already quantized-dequantized one (e.g. from GPTQ).

        Scales [N, G] (and zeros for asymmetric) let save_quantized export exact codes; without them
        symmetric codes are recovered from the weight itself when they are first asked for.
        """
        self._check_shape(weight)
        with torch.no_grad():
            self.weight.data = weight.detach().to(self.weight.dtype).clone()
        self._codes = None
        if scales is not None and self.quantized:
            self._codes = recover_codes(self.weight.data, self.w_bits, self.w_group_size, self.w_sym, self._out_idx,
                                        self.outlier_bits, scales, zeros, outlier_scales, outlier_zeros)

    def weight_codes(self) -> WeightCodes:
        """The integer codes + scales of the current weight (exactly reproducing it)."""
        if not self.quantized:
            raise ValueError("this FakeQuantLinear keeps its weight in floating point (w_bits >= 16)")
        if self._codes is None:
            self._codes = recover_codes(self.weight.data, self.w_bits, self.w_group_size, self.w_sym, self._out_idx,
                                        self.outlier_bits)
        return self._codes

    def _gemm_codes(self, x: torch.Tensor) -> Optional[WeightCodes]:
        """The weight's codes for the integer GEMM's arithmetic, or None where forward takes the float
        path: while gradients flow, without symmetric activation quantization in the weight's groups, or
        when the codes cannot be had. Codes that no longer reproduce the weight are recovered again.
        Nothing derived from them is cached: integer_linear's GemmWeight holds 4-8 bytes per weight
        (for a 7B model 27+ GB beside the model)."""
        aq = self.act_quantizer
        if aq is None or not self.quantized or not (self.w_sym and aq.sym) or aq.bits >= OFF_BITS:
            return None
        if aq.convention != BISUP_ACTS:  # an engine's quantizer: a float matmul, as the engine computes
            return None
        if needs_grad(x, aq.clip) or self.weight.requires_grad:
            return None
        if isinstance(aq.clip, torch.Tensor) and aq.clip.numel() != 1:
            return None
        km = self.in_features - self.outlier_idx.numel()
        if effective_group(km, aq.group_size) != effective_group(km, self.w_group_size):
            return None
        if not torch.equal(aq.outlier_idx.to(self.outlier_idx.device), self.outlier_idx):
            return None
        if self.outlier_idx.numel() and (aq.outlier_bits != self.outlier_bits or self.outlier_bits > 8):
            return None
        try:
            wc = self.weight_codes()
            if not torch.equal(wc.dequantize(self.in_features, self.weight.dtype), self.weight.data):
                self._codes = None  # the weight was edited in place: recover its codes again
                wc = self.weight_codes()
            return wc if wc.bits <= 8 else None
        except ValueError:  # not on a symmetric grid (e.g. edited off it): the float path
            return None

    def _cpu_kernel_twin(self, x: torch.Tensor) -> Optional[nn.Module]:
        """On the CPU, the QuantLinear with these codes (bisup/nn/real_linear.py) when the CPU GEMM takes
        them: the same arithmetic as integer_linear (bit for bit: tests/python/test_fake_real.py), ~6x
        faster on a 7B layer (calibration runs every quantized layer once more). Built per call."""
        from bisup.nn.quant_linear import _has_kernel
        from bisup.nn.real_linear import fake_to_real, split_real

        aq = self.act_quantizer
        if x.device.type != "cpu" or not _has_kernel(x.device) or aq.bits not in (3, 4) or self.w_bits not in (3, 4):
            return None
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None
        if self.outlier_idx.numel() and self.outlier_bits != 8:  # the kernel's outlier segment is INT8
            return None
        try:
            return split_real(fake_to_real(self, aq.bits, float(aq.clip)))[0]  # forward applied the transform
        except ValueError:  # a layout the kernel does not take (group size, outlier count): integer_linear
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        wc = self._gemm_codes(x)
        if wc is not None:  # inference: the integer GEMM's arithmetic (module docstring)
            twin = self._cpu_kernel_twin(x)
            if twin is not None:
                return twin(x)
            gw = GemmWeight(wc, self.in_features, x.device)
            return integer_linear(x, gw, self.act_quantizer.bits, float(self.act_quantizer.clip), self.bias)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, *args, **kwargs):
        # keep cached integer codes on the same device as the weight
        out = super()._apply(fn, *args, **kwargs)
        if self._codes is not None:
            self._codes.to(self.weight.device)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, "
                f"group={self.w_group_size}, sym={self.w_sym}, outliers={self.outlier_idx.numel()}@{self.outlier_bits}b, "
                f"bias={self.bias is not None}")
