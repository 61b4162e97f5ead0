"""Atom (Zhao et al., 2023): low-bit groups plus a few INT8 outlier channels, and quantized KV.

Per decoder layer, from calibration statistics of every linear's input:
- outliers: the k input channels with the largest mean square activation (Atom's reorder
  metric) are kept at INT8 (config.atom_outlier_bits): activations per token, weights per output
  row; k = config.outlier_count(hidden) (config.atom_outliers, or hidden/32 rounded to a
  multiple of 8: 128 at 4096). Linears fed by the same tensor share one set: q/k/v (the
  attention-norm output) and gate/up (the MLP-norm output); o_proj and down_proj get their own.
- reorder: a kernel consumes the input as [normal channels | outlier channels]; in fake-quant
  mode the set is stored as each FakeQuantLinear's `outlier_idx` (by descending statistic) and
  `reorder_index(module)` gives that permutation. The normal channels, in original order, are
  group-quantized (config.w/a_group_size; a shorter last group when K - k is not a multiple).
- weights: RTN, or GPTQ with the outlier channels quantized last at INT8 (config.gptq).
- KV cache: asymmetric per head (config.kv_*), through the fake attention function.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from bisup.config import QuantConfig
from bisup.methods.calibration import InputStats, iterate_layers
from bisup.methods.gptq import quantize_layer_gptq
from bisup.methods.placement import Placement
from bisup.methods.common import BiSupBase, Method, apply_kv_quant, fake_quant_linear
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.groups import complement

# linears that read the same tensor share one outlier set
SHARED_INPUTS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def input_groups(adapter) -> List[Sequence[str]]:
    """SHARED_INPUTS restricted to the adapter's linears (every linear in exactly one group)."""
    names = adapter.linear_names()
    groups = [tuple(n for n in g if n in names) for g in SHARED_INPUTS]
    groups = [g for g in groups if g]
    rest = [n for n in names if not any(n in g for g in groups)]
    return groups + [(n,) for n in rest]


def select_outliers(stats: InputStats, k: int) -> Optional[torch.Tensor]:
    """The k channels with the largest mean square input, by descending value (None if k == 0)."""
    k = min(k, stats.in_features)
    if k <= 0:
        return None
    return torch.argsort(stats.mean_square(), descending=True, stable=True)[:k].cpu()


def choose_outliers(adapter, stats: Dict[str, InputStats], k: int) -> Dict[str, torch.Tensor]:
    """linear name -> outlier channel indices, one shared set per input group."""
    out: Dict[str, torch.Tensor] = {}
    for group in input_groups(adapter):
        idx = select_outliers(stats[group[0]], k)
        if idx is not None:
            out.update({name: idx for name in group})
    return out


def reorder_index(module: FakeQuantLinear) -> torch.Tensor:
    """Input-channel permutation [normal channels (original order) | outlier channels] of a linear."""
    idx = module.outlier_idx
    return torch.cat([complement(idx, module.in_features), idx])


@torch.no_grad()
def apply(model: nn.Module, adapter, config: QuantConfig, calib_batches: torch.Tensor, progress: bool = True,
          sequential: bool = True, placement: Optional[Placement] = None) -> None:
    """Quantize `model` in place with Atom (see the module docstring)."""
    apply_kv_quant(model, adapter, config)
    k = config.outlier_count(adapter.hidden_size)
    use_gptq = config.gptq and config.quantizes_weights
    kinds = ("channel", "hessian") if use_gptq else ("channel",)
    for _, layer, inputs in iterate_layers(model, adapter, calib_batches, progress=progress, stats=kinds,
                                           sequential=sequential, desc="Atom", placement=placement):
        outliers = choose_outliers(adapter, inputs.stats, k)
        if use_gptq:
            quantize_layer_gptq(adapter, layer, inputs.stats, config, outliers)
            continue
        for name in adapter.linear_names():
            linear = adapter.get_linear(layer, name)
            adapter.set_linear(layer, name, fake_quant_linear(linear, config, outliers.get(name)))


def _bisup_outliers(adapter, stats: Dict[str, InputStats], config: QuantConfig) -> Dict[str, torch.Tensor]:
    """Atom's outlier sets of one layer, for BiSup (from the quantized stream's statistics)."""
    return choose_outliers(adapter, stats, config.outlier_count(adapter.hidden_size))


METHOD = Method("atom", apply, calibrates=lambda config: True,
                options=("atom_outliers", "atom_outlier_bits", "gptq"),
                summary="INT8 outlier channels (reordered) + low-bit groups; RTN or GPTQ weights",
                bisup_base=BiSupBase(outliers=_bisup_outliers, stats=("channel",)))
