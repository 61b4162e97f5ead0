"""RTN: round-to-nearest group quantization of every decoder linear (weights and input activations).

Also home of the small helpers every method uses to build the activation quantizer of a linear,
swap a linear for a FakeQuantLinear, and switch on fake KV quantization.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from bisup.config import QuantConfig
from bisup.nn.fake_attention import KVQuantSpec, set_kv_quant
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear


def act_quantizer(config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None) -> Optional[ActQuantizer]:
    """Per-token activation quantizer of config (None when activations stay in floating point)."""
    if not config.quantizes_activations:
        return None
    return ActQuantizer(config.a_bits, config.a_group_size, config.a_sym, config.a_clip,
                        outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits)


def fake_quant_linear(linear, config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None,
                      input_transform: Optional[Callable] = None,
                      weight: Optional[torch.Tensor] = None) -> FakeQuantLinear:
    """A FakeQuantLinear for `linear` with config's weight and activation settings."""
    return FakeQuantLinear(linear, config.w_bits, config.w_group_size, config.w_sym, config.w_clip,
                           act_quantizer=act_quantizer(config, outlier_idx), input_transform=input_transform,
                           outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits, weight=weight)


def kv_spec(config: QuantConfig, rotate: bool = False) -> Optional[KVQuantSpec]:
    if not config.quantizes_kv:
        return None
    return KVQuantSpec(bits=config.kv_bits, group_size=config.kv_group_size, sym=config.kv_sym,
                       clip=config.kv_clip, prompt_len=config.prompt_len, rotate=rotate)


def apply_kv_quant(model, adapter, config: QuantConfig, rotate: bool = False) -> None:
    """Fake-quantize K/V of every attention layer as config says (nothing when kv_bits == 16)."""
    spec = kv_spec(config, rotate)
    if spec is not None:
        set_kv_quant(model, [adapter.attention(layer) for layer in adapter.layers()], spec)


def apply(model, adapter, config: QuantConfig, calib_batches=None, progress: bool = True) -> None:
    """Replace every decoder linear by its RTN FakeQuantLinear (in place); calib_batches is unused."""
    layers = adapter.layers()
    for layer in tqdm(layers, desc="rtn", disable=not progress, leave=False):
        for name in adapter.linear_names():
            adapter.set_linear(layer, name, fake_quant_linear(adapter.get_linear(layer, name), config))
    apply_kv_quant(model, adapter, config)
