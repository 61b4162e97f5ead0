"""What every method uses: the activation quantizer of a linear, the FakeQuantLinear of a linear,
fake KV quantization, and the `Method` record each method module registers itself with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from bisup.config import QuantConfig
from bisup.nn import KVQuantSpec, set_kv_quant
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear


def _no_transforms(model, adapter, config: QuantConfig, placement=None) -> Dict[str, Callable]:
    apply_kv_quant(model, adapter, config)
    return {}


@dataclass(frozen=True)
class BiSupBase:
    """What BiSup's layer loop (bisup/methods/bisup.py) takes from a base method, so that the base's
    per-layer quantizer construction is reused and its own `apply` stays untouched.

    prepare(model, adapter, config, placement): model-level steps run once before the layer loop (rotations, KV
    quantization); returns {linear name: input transform} of transforms every layer gets (QuaRot's
    online Hadamard before down_proj). outliers(adapter, stats, config): {linear name: outlier input
    channels} of one layer from its InputStats (stats lists the kinds it needs). gptq(config):
    whether the final weights are GPTQ-rounded (under the learned clipping and smoothing)."""

    prepare: Callable = _no_transforms
    outliers: Optional[Callable] = None
    stats: Tuple[str, ...] = ()
    gptq: Callable[[QuantConfig], bool] = lambda config: config.gptq


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
    bisup_base: Optional[BiSupBase] = None  # how BiSup wraps this method (QuantConfig.bisup); None: it cannot


def act_quantizer(config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None,
                  device=None) -> Optional[ActQuantizer]:
    """Per-token activation quantizer of config on `device` (None when activations stay in floating point)."""
    if not config.quantizes_activations:
        return None
    return ActQuantizer(config.a_bits, config.a_group_size, config.a_sym, config.a_clip,
                        outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits, device=device,
                        convention=config.a_convention)


def fake_quant_linear(linear, config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None,
                      input_transform: Optional[Callable] = None,
                      weight: Optional[torch.Tensor] = None) -> FakeQuantLinear:
    """A FakeQuantLinear for `linear` with config's weight and activation settings (RTN weights
    unless `weight`, an already quantized-dequantized weight, is given)."""
    return FakeQuantLinear(linear, config.w_bits, config.w_group_size, config.w_sym, config.w_clip,
                           act_quantizer=act_quantizer(config, outlier_idx, linear.weight.device),
                           input_transform=input_transform,
                           outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits, weight=weight,
                           w_clip_search=config.w_clip_search)


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
