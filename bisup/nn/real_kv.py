"""The real KV path of a mode="real" model: MixedPrecisionKVCache + bisup.ops.attention.

`enable_real_kv(model, adapter)` switches a quantized model (whose attention modules carry a
KVQuantSpec, see fake_attention.py) to the attention implementation "bisup_real", which reads the
cache through bisup.ops.attention (bisup/nn/attention.py). `make_cache(model)` builds the cache
for one run: the first `prompt_len` tokens of every layer at full precision, every later token at
kv_bits; `make_cache(model, prompt_kv=...)` starts it from a precomputed system prompt (BiSup's
horizontal suppression). Forward calls and generate() that pass no cache get a fresh one, so a
real-mode model never runs with an unquantized KV cache by accident.

QuaRot's Q/K rotation (spec.rotate): keys must be rotated after RoPE and before they are
quantized into the cache, queries by the same orthogonal matrix. RoPE sits between k_proj and the
cache, so the rotation cannot be folded into weights: the cache layers (RotatingKVLayer) rotate
keys on append, and "bisup_real" rotates the queries (and the keys of any other cache).
"""
from __future__ import annotations

import inspect
import types
from typing import Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bisup.nn.attention import _CACHE_ATTR, bisup_attention_forward, enable_bisup_attention
from bisup.nn.fake_attention import kv_rotation
from bisup.nn.kv_cache import MixedPrecisionKVCache, MixedPrecisionKVLayer

ATTN_NAME = "bisup_real"
REAL_KV_BITS = (3, 4, 8)


class RotatingKVLayer(MixedPrecisionKVLayer):
    """A MixedPrecisionKVLayer that multiplies keys by `rotation` [D, D] (None: no rotation) before storing them."""

    def __init__(self, prompt_len: int = 0, kv_bits: int = 4, group_size: int = -1,
                 rotation: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(prompt_len, kv_bits, group_size, **kwargs)
        self.rotation = rotation

    def _rotate(self, keys: torch.Tensor) -> torch.Tensor:
        return keys if self.rotation is None else keys @ self.rotation.to(keys.device, keys.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(self._rotate(key_states), value_states, *args, **kwargs)

    def set_prompt(self, key_states, value_states) -> None:
        super().set_prompt(self._rotate(key_states), value_states)


class BisupKVCache(MixedPrecisionKVCache):
    """MixedPrecisionKVCache whose layer i rotates keys by rotations[i] (QuaRot's rotate_kv)."""

    def __init__(self, prompt_len: int = 0, kv_bits: int = 4, group_size: int = -1, config=None, rotations=None):
        self.rotations = None if rotations is None else list(rotations)
        self._layers_made = 0
        super().__init__(prompt_len, kv_bits, group_size, config)

    def _new_layer(self) -> RotatingKVLayer:
        i, self._layers_made = self._layers_made, self._layers_made + 1
        rot = self.rotations[i] if self.rotations is not None and i < len(self.rotations) else None
        layer = RotatingKVLayer(self.prompt_len, self.kv_bits, self.group_size, rot)
        layer.fused = self.fused
        return layer


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
def _cache_layer(module: nn.Module):
    cache, idx = getattr(module, _CACHE_ATTR, None), getattr(module, "layer_idx", None)
    if isinstance(cache, Cache) and idx is not None and idx < len(cache.layers):
        return cache.layers[idx]
    return None


def real_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """bisup attention, with q (and k, unless the cache layer already rotated it) rotated per spec.rotate."""
    spec = getattr(module, "bisup_kv", None)
    rot = getattr(module, "bisup_kv_rotation", None) if spec is not None and spec.rotate else None
    if rot is not None:
        r = rot.to(query.device, query.dtype)
        query = query @ r
        layer = _cache_layer(module)
        if not (isinstance(layer, RotatingKVLayer) and layer.rotation is not None):
            key = key @ r  # keys from another cache (or none) are not rotated yet
    return bisup_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    AttentionInterface.register(ATTN_NAME, real_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# ------------------------------------------------------------------------------------------------
# caches
# ------------------------------------------------------------------------------------------------
def _attention_modules(model: nn.Module):
    from bisup.models.adapters import get_adapter

    adapter = get_adapter(model)
    return [adapter.attention(layer) for layer in adapter.layers()]


def uses_real_kv(model: nn.Module) -> bool:
    return bool(getattr(model, "_bisup_real_kv", False))


def make_cache(model: nn.Module, config=None, prompt_kv=None) -> Optional[MixedPrecisionKVCache]:
    """A fresh KV cache for a real-mode model (None when the model has no real KV quantization).

    config: a QuantConfig (default: model.bisup_config). prompt_kv: precomputed K/V of a system
    prompt (a transformers Cache, or per-layer (key, value) [B, Hkv, P, D]) kept at full precision;
    without it the first config.prompt_len tokens the model appends stay at full precision.
    """
    config = config if config is not None else getattr(model, "bisup_config", None)
    if config is None or config.mode != "real" or not config.quantizes_kv:
        return None
    attns = _attention_modules(model)
    rotations = [getattr(a, "bisup_kv_rotation", None) if getattr(a, "bisup_kv", None) is not None
                 and a.bisup_kv.rotate else None for a in attns]
    pairs = None
    if prompt_kv is not None:
        pairs = [(la.keys, la.values) for la in prompt_kv.layers] if isinstance(prompt_kv, Cache) else list(prompt_kv)
        if len(pairs) != len(attns):
            raise ValueError(f"make_cache: prompt_kv has {len(pairs)} layers, the model has {len(attns)}")
    prompt_len = pairs[0][0].shape[2] if pairs else config.prompt_len
    cache = BisupKVCache(prompt_len, config.kv_bits, config.kv_group_size, model.config, rotations)
    for layer, (k, v) in zip(cache.layers, pairs or []):
        layer.set_prompt(k, v)
    return cache


def cache_argument(model: nn.Module) -> str:
    """The name under which model.forward takes its cache ("cache" in transformers >= 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _without_cache(kwargs: dict) -> bool:
    return all(kwargs.get(k) is None for k in ("cache", "past_key_values"))


def _inject_cache(model, args, kwargs):
    """Forward pre-hook: a forward without a cache gets a fresh real-mode cache."""
    if _without_cache(kwargs) and len(args) <= model._bisup_cache_pos:
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs[model._bisup_cache_arg] = make_cache(model)
    return args, kwargs


def _generate_with_cache(self, *args, **kwargs):
    """generate() that starts from make_cache(self) unless a cache is given (or use_cache=False)."""
    if _without_cache(kwargs) and kwargs.get("use_cache", True) is not False:
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs[self._bisup_cache_arg] = make_cache(self)
    return type(self).generate(self, *args, **kwargs)


def enable_real_kv(model: nn.Module, adapter, device=None) -> None:
    """Switch a model with KV specs to the real KV path (idempotent): rotation buffers, the
    "bisup_real" attention, and cache injection for forward / generate."""
    device = device if device is not None else adapter.embeddings().weight.device
    for layer in adapter.layers():
        attn = adapter.attention(layer)
        spec = getattr(attn, "bisup_kv", None)
        if spec is not None and spec.rotate:
            kv_rotation(attn, adapter.head_dim, device, torch.float32)  # registers the buffer once
    enable_bisup_attention(model)
    register()
    model.set_attn_implementation(ATTN_NAME)
    if uses_real_kv(model):
        return
    model._bisup_cache_arg = cache_argument(model)
    model._bisup_cache_pos = list(inspect.signature(model.forward).parameters).index(model._bisup_cache_arg)
    model.register_forward_pre_hook(_inject_cache, with_kwargs=True)
    model.generate = types.MethodType(_generate_with_cache, model)
    model._bisup_real_kv = True
