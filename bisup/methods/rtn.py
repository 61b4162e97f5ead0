"""RTN: round-to-nearest group quantization of every decoder linear (weights and input activations)."""
from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm

from bisup.config import QuantConfig
from bisup.methods.placement import Placement
from bisup.methods.common import BiSupBase, Method, apply_kv_quant, fake_quant_linear


def apply(model, adapter, config: QuantConfig, calib_batches=None, progress: bool = True,
          placement: Optional[Placement] = None) -> None:
    """Replace every decoder linear by its RTN FakeQuantLinear (in place); calib_batches is unused."""
    placement = placement or Placement.for_model(model)
    for layer in tqdm(adapter.layers(), desc="rtn", disable=not progress, leave=False):
        with placement.layer(layer):
            for name in adapter.linear_names():
                adapter.set_linear(layer, name, fake_quant_linear(adapter.get_linear(layer, name), config))
    apply_kv_quant(model, adapter, config)


METHOD = Method("rtn", apply, calibrates=lambda config: False,
                summary="round-to-nearest weights, per-token activations, asymmetric KV",
                bisup_base=BiSupBase(gptq=lambda config: False))
