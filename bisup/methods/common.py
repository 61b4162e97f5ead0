"""What every method uses: the activation quantizer of a linear, the FakeQuantLinear of a linear,
fake KV quantization, and the `Method` record each method module registers itself with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from bisup.config import QuantConfig
from bisup.nn import KVQuantSpec, set_kv_quant
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear


@dataclass(frozen=True)
class Method:
    """A quantization method: `apply(model, adapter, config, calib_batches, progress)` quantizes in place.

    calibrates(config) says whether it needs calibration batches for that config; options names the
    QuantConfig fields only this method reads (documentation and the CLI's help)."""

    name: str
    apply: Callable
    calibrates: Callable[[QuantConfig], bool]
    options: Tuple[str, ...] = ()
    summary: str = ""


def act_quantizer(config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None) -> Optional[ActQuantizer]:
    """Per-token activation quantizer of config (None when activations stay in floating point)."""
    if not config.quantizes_activations:
        return None
    return ActQuantizer(config.a_bits, config.a_group_size, config.a_sym, config.a_clip,
                        outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits)


def fake_quant_linear(linear, config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None,
                      input_transform: Optional[Callable] = None,
                      weight: Optional[torch.Tensor] = None) -> FakeQuantLinear:
    """A FakeQuantLinear for `linear` with config's weight and activation settings (RTN weights
    unless `weight`, an already quantized-dequantized weight, is given)."""
    return FakeQuantLinear(linear, config.w_bits, config.w_group_size, config.w_sym, config.w_clip,
                           act_quantizer=act_quantizer(config, outlier_idx), input_transform=input_transform,
                           outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits, weight=weight)


def kv_spec(config: QuantConfig, rotate: bool = False) -> Optional[KVQuantSpec]:
    if not config.quantizes_kv:
        return None
    return KVQuantSpec(bits=config.kv_bits, group_size=config.kv_group_size, sym=config.kv_sym,
                       clip=config.kv_clip, prompt_len=config.prompt_len, rotate=rotate)


def apply_kv_quant(model, adapter, config: QuantConfig, rotate: bool = False) -> None:
    """Fake-quantize K/V of every attention layer as config says (nothing when KV stays unquantized)."""
    spec = kv_spec(config, rotate)
    if spec is not None:
        set_kv_quant(model, [adapter.attention(layer) for layer in adapter.layers()], spec)
