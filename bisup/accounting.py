"""Storage accounting: bytes of a quantized model's decoder weights, packed vs FP16."""
from __future__ import annotations

from typing import Dict

from torch import nn

from bisup.models.adapters import get_adapter
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.codes import pack_codes


def weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the decoder linears' weights as packed integers + fp16 scales vs as FP16.

    The codes are really packed with bisup.ops (INT4 nibbles / INT3 words / int8), as save_quantized
    stores them. Keys: linears, params, fp16_bytes, code_bytes, scale_bytes, packed_bytes.
    """
    from bisup.nn.real_linear import is_real, split_real, weight_codes

    adapter = get_adapter(model)
    out = dict(linears=0, params=0, fp16_bytes=0, code_bytes=0, scale_bytes=0)
    for _, module in adapter.named_linears():
        real = split_real(module)[0] if is_real(module) else None
        n, k = (real.out_features, real.in_features) if real is not None else module.weight.shape
        out["linears"] += 1
        out["params"] += n * k
        out["fp16_bytes"] += 2 * n * k
        if real is None and not (isinstance(module, FakeQuantLinear) and module.quantized):
            out["code_bytes"] += 2 * n * k  # kept in floating point
            continue
        wc = weight_codes(real) if real is not None else module.weight_codes()
        out["code_bytes"] += pack_codes(wc.codes, wc.packing, wc.sym).numel()
        if wc.outlier_codes is not None:
            out["code_bytes"] += wc.outlier_codes.numel()
        scales = (wc.scales, wc.zeros, wc.outlier_scales, wc.outlier_zeros)
        out["scale_bytes"] += sum(t.numel() * t.element_size() for t in scales if t is not None)
    out["packed_bytes"] = out["code_bytes"] + out["scale_bytes"]
    return out
