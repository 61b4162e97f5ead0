"""A real-mode model's KV path: bisup attention on a MixedPrecisionKVCache it makes itself.

`enable_real_kv(model, adapter)` switches a quantized model (whose attention modules carry a
KVQuantSpec, see attention.py) to bisup attention and makes it create its own cache:
`make_cache(model)` builds the cache for one run -- the first `prompt_len` tokens of every layer
at full precision, every later token at kv_bits, keys rotated by the layer's QuaRot rotation --
and `make_cache(model, prompt_kv=...)` starts it from a precomputed system prompt (BiSup's
horizontal suppression). A forward call or generate() that passes no cache gets a fresh one, so
a real-mode model never runs with an unquantized KV cache by accident:

- forward: a forward pre-hook on the model adds the cache argument;
- generate: transformers 5.x has no public way to make generate() start from a custom Cache
  class (GenerationConfig.cache_implementation only names transformers' own caches, and
  generate builds its DynamicCache before the first forward), so the model's `generate` is
  replaced by `generate_with_mixed_precision_cache`, which adds the cache and calls the class's
  generate.

Model-level state: `model.bisup_runtime` (RealKVRuntime), present once enable_real_kv ran.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Optional

from torch import nn

from bisup.nn.attention import ROTATION_BUFFER, enable_bisup_attention, get_kv_spec, kv_rotation
from bisup.nn.kv_cache import MixedPrecisionKVCache

RUNTIME_ATTR = "bisup_runtime"
_CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class RealKVRuntime:
    """Model-level state of a real-mode model (its attribute `bisup_runtime`).

    cache_argument: the name under which model.forward takes its cache.
    cache_position: that argument's position in forward's signature (a positional cache counts as given).
    """

    cache_argument: str
    cache_position: int


def _attention_modules(model: nn.Module) -> list:
    from bisup.models.adapters import get_adapter

    adapter = get_adapter(model)
    return [adapter.attention(layer) for layer in adapter.layers()]


def make_cache(model: nn.Module, config=None, prompt_kv=None) -> Optional[MixedPrecisionKVCache]:
    """A fresh KV cache for a real-mode model (None when the model has no real KV quantization).

    config: a QuantConfig (default: model.bisup_config). prompt_kv: precomputed K/V of a system
    prompt (a transformers Cache, or per-layer (key, value) [B, Hkv, P, D]) kept at full precision;
    without it the first config.prompt_len tokens the model appends stay at full precision.
    """
    config = config if config is not None else getattr(model, "bisup_config", None)
    if config is None or config.mode != "real" or not config.quantizes_kv:
        return None
    rotations = []
    for attn in _attention_modules(model):
        spec = get_kv_spec(attn)
        rotations.append(getattr(attn, ROTATION_BUFFER, None) if spec is not None and spec.rotate else None)
    if prompt_kv is None:
        return MixedPrecisionKVCache(config.prompt_len, config.kv_bits, config.kv_group_size, model.config, rotations)
    return MixedPrecisionKVCache.from_prompt_kv(prompt_kv, config.kv_bits, config.kv_group_size, model.config, rotations)


def cache_argument(model: nn.Module) -> str:
    """The name under which model.forward takes its cache ("cache" in transformers >= 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _without_cache(kwargs: dict) -> bool:
    return all(kwargs.get(k) is None for k in _CACHE_KWARGS)


def _with_fresh_cache(model: nn.Module, kwargs: dict) -> dict:
    for k in _CACHE_KWARGS:
        kwargs.pop(k, None)
    kwargs[model.bisup_runtime.cache_argument] = make_cache(model)
    return kwargs


def _add_cache_to_forward(model, args, kwargs):
    """Forward pre-hook: a forward without a cache gets a fresh real-mode cache."""
    if _without_cache(kwargs) and len(args) <= model.bisup_runtime.cache_position:
        kwargs = _with_fresh_cache(model, kwargs)
    return args, kwargs


def generate_with_mixed_precision_cache(self, *args, **kwargs):
    """A real-mode model's generate(): the class's generate, started from make_cache(self) unless a
    cache is given or use_cache=False (installed as the instance's `generate` by enable_real_kv)."""
    if _without_cache(kwargs) and kwargs.get("use_cache", True) is not False:
        kwargs = _with_fresh_cache(self, kwargs)
    return type(self).generate(self, *args, **kwargs)


def enable_real_kv(model: nn.Module, adapter, device=None) -> None:
    """Switches a model with KV specs to the real KV path (idempotent): rotation buffers, bisup
    attention, and a fresh MixedPrecisionKVCache for forward / generate calls without one."""
    device = device if device is not None else adapter.embeddings().weight.device
    for layer in adapter.layers():
        attn = adapter.attention(layer)
        spec = get_kv_spec(attn)
        if spec is not None and spec.rotate:
            kv_rotation(attn, adapter.head_dim, device)  # a no-op when set_kv_quant made it
    enable_bisup_attention(model)
    if getattr(model, RUNTIME_ATTR, None) is not None:
        return
    arg = cache_argument(model)
    position = list(inspect.signature(model.forward).parameters).index(arg)
    setattr(model, RUNTIME_ATTR, RealKVRuntime(arg, position))
    model.register_forward_pre_hook(_add_cache_to_forward, with_kwargs=True)
    model.generate = types.MethodType(generate_with_mixed_precision_cache, model)
