"""Quantizers (fake-quant with STE), packing formats and weight quantization methods."""
from bisup.quant.quantizer import (  # noqa: F401
    fake_quantize,
    fake_quantize_per_tensor,
    group_params,
    qrange,
    quantize_groups,
    round_ste,
    to_groups,
)
