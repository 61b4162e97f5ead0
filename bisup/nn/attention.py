"""Route a transformers model's attention through bisup.ops.attention on a MixedPrecisionKVCache.

`enable_bisup_attention(model)` registers an attention implementation named "bisup" in
transformers' AttentionInterface (and its mask function, the SDPA one), switches the model to it
and hooks every attention module so the implementation can see the cache of the current
forward. On a MixedPrecisionKVCache with a plain causal mask, attention reads the
full-precision prompt segment and the packed quantized segment directly (fused dequantization);
in every other case (no cache or another cache, padding masks, dropout, sliding windows, soft
capping, a head_dim the CUDA kernels do not take) it falls back to transformers' SDPA on
dequantized K/V, so results stay correct.
Works for models whose attention modules carry `layer_idx` and call `ALL_ATTENTION_FUNCTIONS`
(Llama, Qwen2, Qwen3, ...).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from bisup import ops, reference
from bisup.nn.kv_cache import MixedPrecisionKVCache, MixedPrecisionKVLayer

ATTN_IMPLEMENTATION = "bisup"
_CACHE_ATTR = "_bisup_cache"
_CUDA_HEAD_DIMS = (64, 128, 256)  # what csrc/cuda/attention.cu takes; the CPU twin takes any


def _plain_causal(mask: Optional[torch.Tensor], tq: int, total: int) -> bool:
    """Whether a mask from the SDPA mask function is exactly the op's end-aligned causal mask."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (tq, total):
        return False
    want = reference.attention_mask(1, tq, total, 0, causal=True, device=mask.device)
    return bool(torch.equal(mask, want.unsqueeze(1).expand_as(mask)))


def bisup_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """transformers attention function: [B, Hq, Tq, D] queries -> ([B, Tq, Hq, D], None)."""
    cache = getattr(module, _CACHE_ATTR, None)
    layer = None
    if isinstance(cache, MixedPrecisionKVCache) and getattr(module, "layer_idx", None) is not None:
        layer = cache.layers[module.layer_idx]
    fused_ok = (
        isinstance(layer, MixedPrecisionKVLayer)
        and dropout == 0.0
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and kwargs.get("s_aux") is None
        and (query.device.type != "cuda" or query.shape[-1] in _CUDA_HEAD_DIMS)
        and _plain_causal(attention_mask, query.shape[2], layer.get_seq_length())
    )
    if not fused_ok:
        if isinstance(layer, MixedPrecisionKVLayer) and layer.fused:
            key, value = layer.dequantized()  # `update` returned only the new tokens
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = ops.attention(
        query.contiguous(),
        *layer.attention_inputs(),
        kv_bits=layer.attention_bits,
        group_size=layer.attention_group_size,
        softmax_scale=scaling,
        causal=True,
    )
    return out.transpose(1, 2).contiguous(), None


def register_bisup_attention() -> None:
    """Registers the "bisup" attention implementation and its mask function (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, bisup_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _remember_cache(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    setattr(module, _CACHE_ATTR, cache)
    if isinstance(cache, MixedPrecisionKVCache) and not cache.fused:
        cache.set_fused(True)


def _forget_cache(module, args, kwargs, output):
    cache = getattr(module, _CACHE_ATTR, None)
    if isinstance(cache, MixedPrecisionKVCache):
        cache.set_fused(False)  # outside bisup attention, `update` returns full K/V again
    setattr(module, _CACHE_ATTR, None)


def _attention_modules(model: torch.nn.Module):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def enable_bisup_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switches `model` to bisup attention (see module doc); returns the model."""
    register_bisup_attention()
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"enable_bisup_attention: found no attention module with a layer_idx in {type(model).__name__}")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if not getattr(model, "_bisup_attention_hooks", None):
        hooks = []
        for m in modules:
            hooks.append(m.register_forward_pre_hook(_remember_cache, with_kwargs=True))
            hooks.append(m.register_forward_hook(_forget_cache, with_kwargs=True))
        model._bisup_attention_hooks = hooks
    return model
