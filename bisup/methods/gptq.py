"""GPTQ weights for every decoder linear, calibrated block by block; activations/KV per config.

For each decoder layer (bisup.methods.calibration.iterate_layers): collect X^T X of every linear's
input over the calibration set, GPTQ-quantize each weight (bisup.quant.gptq.gptq_quantize), and
replace the linear by a FakeQuantLinear holding the dequantized weight (plus its exact codes and
scales) and the per-token activation quantizer. Embeddings and lm_head stay in floating point.

With sequential=True (default, as in GPTQ) layer i+1 is calibrated on the outputs of the already
quantized layers 0..i (weights AND activations quantized, i.e. what it will see at inference);
sequential=False calibrates every layer on full-precision inputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from bisup.config import QuantConfig
from bisup.methods.calibration import InputStats, iterate_layers
from bisup.nn.fake_attention import KVQuantSpec, set_kv_quant
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear
from bisup.quant.gptq import gptq_quantize


def act_quantizer(config: QuantConfig, outlier_idx: Optional[torch.Tensor] = None) -> Optional[ActQuantizer]:
    """The per-token input quantizer of a decoder linear (None when activations stay FP, outliers too)."""
    if not config.quantizes_activations:
        return None
    return ActQuantizer(config.a_bits, config.a_group_size, config.a_sym, config.a_clip,
                        outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits)


def gptq_linear(linear: nn.Linear, stats: Optional[InputStats], config: QuantConfig,
                outlier_idx: Optional[torch.Tensor] = None) -> FakeQuantLinear:
    """A FakeQuantLinear with GPTQ weights (outlier input channels at atom_outlier_bits, last)."""
    aq = act_quantizer(config, outlier_idx)
    if not config.quantizes_weights:  # stats may be None here
        return FakeQuantLinear(linear, config.w_bits, config.w_group_size, config.w_sym, config.w_clip,
                               act_quantizer=aq, outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits)
    res = gptq_quantize(linear.weight, stats.hessian(), config.w_bits, config.w_group_size, sym=config.w_sym,
                        clip=config.w_clip, damp=config.gptq_damp, act_order=config.gptq_act_order,
                        block_size=config.gptq_block_size, keep_idx=outlier_idx, keep_bits=config.atom_outlier_bits)
    fq = FakeQuantLinear(linear, config.w_bits, config.w_group_size, config.w_sym, config.w_clip, act_quantizer=aq,
                         outlier_idx=outlier_idx, outlier_bits=config.atom_outlier_bits, weight=res.weight)
    fq.set_weight(res.weight, scales=res.scales, zeros=None if config.w_sym else res.zeros,
                  outlier_scales=res.keep_scales, outlier_zeros=None if config.w_sym else res.keep_zeros)
    return fq


def quantize_layer_gptq(adapter, layer: nn.Module, stats: Dict[str, InputStats], config: QuantConfig,
                        outliers: Optional[Dict[str, torch.Tensor]] = None,
                        names: Optional[Sequence[str]] = None) -> None:
    """Replace the named linears of one layer (default: all) by GPTQ FakeQuantLinears."""
    outliers = outliers or {}
    for name in names or adapter.linear_names():
        linear = adapter.get_linear(layer, name)
        adapter.set_linear(layer, name, gptq_linear(linear, stats.get(name), config, outliers.get(name)))


def kv_spec(config: QuantConfig, rotate: bool = False) -> Optional[KVQuantSpec]:
    if not config.quantizes_kv:
        return None
    return KVQuantSpec(bits=config.kv_bits, group_size=config.kv_group_size, sym=config.kv_sym,
                       clip=config.kv_clip, prompt_len=config.prompt_len, rotate=rotate)


def apply_kv_quant(model: nn.Module, adapter, config: QuantConfig, rotate: bool = False) -> None:
    """Fake KV quantization per config (no-op when kv_bits is 16)."""
    spec = kv_spec(config, rotate)
    if spec is not None:
        set_kv_quant(model, [adapter.attention(layer) for layer in adapter.layers()], spec)


@torch.no_grad()
def apply(model: nn.Module, adapter, config: QuantConfig, calib_batches: torch.Tensor, progress: bool = True,
          sequential: bool = True) -> None:
    """Quantize `model` in place: GPTQ weights, per-token activations, KV per config.

    KV quantization is switched on first, so that (sequential) calibration sees it too.
    """
    apply_kv_quant(model, adapter, config)
    if not config.quantizes_weights:  # nothing to calibrate
        for layer in adapter.layers():
            quantize_layer_gptq(adapter, layer, {}, config)
        return
    for _, layer, inputs in iterate_layers(model, adapter, calib_batches, progress=progress, stats=("hessian",),
                                           sequential=sequential, desc="GPTQ"):
        quantize_layer_gptq(adapter, layer, inputs.stats, config)
