"""Quantized modules: fake-quant simulation (fake_quant, attention) and real-kernel modules."""
from bisup.nn.attention import (  # noqa: F401
    AttentionQuantState, KVQuantSpec, enable_bisup_attention, get_kv_spec, set_kv_quant, set_kv_rotation,
)
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear  # noqa: F401
from bisup.nn.quant_linear import QuantLinear  # noqa: F401
from bisup.nn.kv_cache import MixedPrecisionKVCache, MixedPrecisionKVLayer  # noqa: F401
from bisup.nn.real_kv import cache_argument, enable_real_kv, make_cache  # noqa: F401
