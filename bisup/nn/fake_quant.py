"""Fake-quant (simulation) modules: ActQuantizer and FakeQuantLinear quantize-dequantize in floating
point with the kernels' math (group math: bisup/quant/groups.py; integer codes: bisup/quant/codes.py;
formulas: docs/formats.md).

A FakeQuantLinear keeps its dequantized weight together with the integer codes and fp16 scales
it stands for (WeightCodes), so save_quantized exports the codes exactly and the real kernels run
the very same weight. Outlier channels (Atom): input channels listed in `outlier_idx` are quantized
per row (weights) or per token (activations, without clipping) at `outlier_bits`; the remaining
channels, in their original order, are quantized in groups.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from bisup.quant.codes import WeightCodes, quantize_weight, recover_codes
from bisup.quant.formats import OFF_BITS
from bisup.quant.groups import as_index, fake_quant_channels


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
        idx = as_index(outlier_idx)
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


# weights
# ------------------------------------------------------------------------------------------------
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
        idx = as_index(outlier_idx, dev)
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
            self._codes.to(self.weight.device)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, "
                f"group={self.w_group_size}, sym={self.w_sym}, outliers={self.outlier_idx.numel()}@{self.outlier_bits}b, "
                f"bias={self.bias is not None}")
