"""Quantized modules: fake-quant simulation (fake_quant, fake_attention) and real-kernel modules."""
from bisup.nn.fake_attention import KVQuantSpec, set_kv_quant  # noqa: F401
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear, WeightCodes, quantize_weight  # noqa: F401
from bisup.nn.quant_linear import QuantLinear  # noqa: F401
from bisup.nn.attention import enable_bisup_attention, register_bisup_attention  # noqa: F401
from bisup.nn.kv_cache import MixedPrecisionKVCache, MixedPrecisionKVLayer  # noqa: F401
