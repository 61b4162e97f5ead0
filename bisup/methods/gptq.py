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
from bisup.methods.placement import Placement
from bisup.methods.common import BiSupBase, Method, apply_kv_quant, fake_quant_linear
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.gptq import GPTQPlan, gptq_plan, gptq_quantize


def gptq_linear(linear: nn.Linear, stats: Optional[InputStats], config: QuantConfig,
                outlier_idx: Optional[torch.Tensor] = None, plan: Optional[GPTQPlan] = None) -> FakeQuantLinear:
    """A FakeQuantLinear with GPTQ weights (outlier input channels at atom_outlier_bits, last).
    plan: layer_plan(stats, ...) when several linears read the same input (made once, shared)."""
    if not config.quantizes_weights:  # stats may be None here
        return fake_quant_linear(linear, config, outlier_idx)
    if plan is None:
        plan = layer_plan(stats, config, outlier_idx, linear.weight.device)
    res = gptq_quantize(linear.weight, None, config.w_bits, config.w_group_size, sym=config.w_sym,
                        clip=config.w_clip, damp=config.gptq_damp, act_order=config.gptq_act_order,
                        block_size=config.gptq_block_size, outlier_idx=outlier_idx,
                        outlier_bits=config.atom_outlier_bits, clip_search=config.w_clip_search, plan=plan)
    fq = fake_quant_linear(linear, config, outlier_idx, weight=res.weight)
    fq.set_weight(res.weight, scales=res.scales, zeros=None if config.w_sym else res.zeros,
                  outlier_scales=res.outlier_scales, outlier_zeros=None if config.w_sym else res.outlier_zeros)
    return fq


def layer_plan(stats: InputStats, config: QuantConfig, outlier_idx: Optional[torch.Tensor], device) -> GPTQPlan:
    """The GPTQ plan (order + inverse-Hessian factor) of one linear input under config (from the
    Hessian's sum itself: GPTQ is invariant to its scale, and a K x K copy less matters at 70B)."""
    hessian = stats.hessian_sum if stats.hessian_sum is not None else stats.hessian()  # (the latter raises)
    return gptq_plan(hessian, config.w_group_size, config.gptq_damp, config.gptq_act_order, outlier_idx,
                     device)


def quantize_layer_gptq(adapter, layer: nn.Module, stats: Dict[str, InputStats], config: QuantConfig,
                        outliers: Optional[Dict[str, torch.Tensor]] = None,
                        names: Optional[Sequence[str]] = None) -> None:
    """Replace the named linears of one layer (default: all) by GPTQ FakeQuantLinears. Linears reading
    one input (q/k/v, gate/up share their InputStats and outlier set) share one GPTQ plan."""
    outliers = outliers or {}
    plans: Dict[tuple, GPTQPlan] = {}
    for name in names or adapter.linear_names():
        linear = adapter.get_linear(layer, name)
        st, idx = stats.get(name), outliers.get(name)
        plan = None
        if config.quantizes_weights:
            key = (id(st), None if idx is None else tuple(idx.tolist()))
            if key not in plans:
                plans.clear()  # linears sharing an input come one after another: hold one plan at a time
                plans[key] = layer_plan(st, config, idx, linear.weight.device)
            plan = plans[key]
        adapter.set_linear(layer, name, gptq_linear(linear, st, config, idx, plan))


@torch.no_grad()
def apply(model: nn.Module, adapter, config: QuantConfig, calib_batches: torch.Tensor, progress: bool = True,
          sequential: bool = True, placement: Optional[Placement] = None) -> None:
    """Quantize `model` in place: GPTQ weights, per-token activations, KV per config.

    KV quantization is switched on first, so that (sequential) calibration sees it too.
    """
    apply_kv_quant(model, adapter, config)
    placement = placement or Placement.for_model(model)
    if not config.quantizes_weights:  # nothing to calibrate
        for layer in adapter.layers():
            with placement.layer(layer):
                quantize_layer_gptq(adapter, layer, {}, config)
        return
    for _, layer, inputs in iterate_layers(model, adapter, calib_batches, progress=progress, stats=("hessian",),
                                           sequential=sequential, desc="GPTQ", placement=placement):
        quantize_layer_gptq(adapter, layer, inputs.stats, config)


METHOD = Method("gptq", apply, calibrates=lambda config: config.quantizes_weights,
                options=("gptq_damp", "gptq_act_order", "gptq_block_size"),
                summary="GPTQ weights (Hessian-compensated rounding) calibrated block by block",
                bisup_base=BiSupBase(gptq=lambda config: True))
