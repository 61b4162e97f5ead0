"""Conversions between the fake-quant FakeQuantLinear and the real-kernel QuantLinear.

Both hold the same integer codes: FakeQuantLinear as WeightCodes next to its dequantized weight,
QuantLinear packed and zero-padded for the GEMM. `fake_to_real` builds the QuantLinear that runs
the codes of a FakeQuantLinear; `real_to_fake` goes back (save_quantized writes one format for both
modes); `dequantized_weight` is the floating-point weight a QuantLinear computes with.
"""
from __future__ import annotations

import torch
from torch import nn

from bisup import reference
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear
from bisup.quant.codes import WeightCodes
from bisup.quant.formats import num_groups
from bisup.nn.quant_linear import QuantLinear


class TransformedLinear(nn.Module):
    """input_transform (e.g. QuaRot's online Hadamard) followed by a real QuantLinear."""

    def __init__(self, transform: nn.Module, linear: nn.Module):
        super().__init__()
        self.input_transform, self.linear = transform, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.input_transform(x))


def is_real(module: nn.Module) -> bool:
    return isinstance(module, (QuantLinear, TransformedLinear))


def split_real(module: nn.Module):
    """(QuantLinear, input transform or None) of a real linear."""
    if isinstance(module, TransformedLinear):
        return module.linear, module.input_transform
    return module, None


def fake_to_real(fq: FakeQuantLinear, a_bits: int, a_clip: float) -> nn.Module:
    """The QuantLinear (wrapped in TransformedLinear when fq has an input transform) running fq's codes."""
    wc = fq.weight_codes()
    real = QuantLinear.from_float(fq, wc.bits, a_bits, wc.group_size, w_clip=fq.w_clip, a_clip=a_clip,
                                  outlier_idx=wc.outlier_idx, weight_q=wc.codes, weight_scale=wc.scales,
                                  w_outlier_q=wc.outlier_codes, w_outlier_scale=wc.outlier_scales)
    return real if fq.input_transform is None else TransformedLinear(fq.input_transform, real)


def weight_codes(q: QuantLinear) -> WeightCodes:
    """The codes of a QuantLinear without the GEMM's zero padding (symmetric, fp16 scales)."""
    unpack = reference.unpack_int4 if q.w_bits == 4 else reference.unpack_int3
    codes = unpack(q.w_q, True)[:, : q.k_main].to(torch.int8)
    groups = num_groups(q.k_main, q.group_size)
    wc = WeightCodes(q.w_bits, q.group_size, True, codes.contiguous(), q.w_scale[:, :groups].contiguous())
    if q.outlier_idx.numel():
        wc.with_outliers(q.outlier_idx.clone(), 8, q.w_outlier.clone(), q.w_outlier_scale.reshape(-1, 1).clone())
    return wc


def dequantized_weight(q: QuantLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] that q's codes and scales stand for."""
    return weight_codes(q).dequantize(q.in_features, dtype)


def real_to_fake(module: nn.Module, dtype: torch.dtype, w_clip: float = 1.0) -> FakeQuantLinear:
    """The FakeQuantLinear (weight in `dtype`) with the same codes, activation quantizer and input
    transform; w_clip only records the clip ratio the codes were made with."""
    q, transform = split_real(module)
    wc = weight_codes(q)
    aq = ActQuantizer(q.a_bits, q.group_size, True, q.a_clip, outlier_idx=wc.outlier_idx, outlier_bits=8,
                      device=q.w_q.device)
    return FakeQuantLinear.from_codes(wc, q.in_features, q.bias, aq, transform, w_clip, dtype)
