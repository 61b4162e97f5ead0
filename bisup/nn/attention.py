"""bisup's attention implementation for transformers ("bisup") and its per-module state.

One attention function, registered with transformers' AttentionInterface (mask: the SDPA one),
covers both ways bisup quantizes the KV cache:

- the layer's cache is a MixedPrecisionKVCache (real mode, or a user-made cache): the cache has
  already quantized K/V on append, and attention reads its full-precision prompt segment and its
  packed segment directly through `bisup.ops.attention` (fused dequantization). Where the op
  does not apply (padding masks, dropout, sliding windows, soft capping, attention sinks, a
  head_dim the CUDA kernels do not take) it falls back to transformers' SDPA on the dequantized
  K/V, so results stay correct;
- any other cache or none (fake mode, calibration): K/V positions >= spec.prompt_len are
  quantized per token and head along head_dim (KVQuantSpec). Without gradients, and where real
  mode would run the fused op, this is real mode's computation on the spot (bisup.ops.kv_quantize
  + bisup.ops.attention), so fake and real mode agree bit for bit; otherwise (training, specs the
  cache cannot hold, masks the op does not take) they are fake-quantized and SDPA runs.

QuaRot's Q/K rotation R (spec.rotate; the buffer `bisup_kv_rotation` of the attention module):
q.k is unchanged when both are multiplied by the orthogonal R, and R spreads outliers before K is
quantized. On the fake path q and k are rotated here; a MixedPrecisionKVCache layer rotates keys
itself on append (its `rotation`), so only q is rotated here, by that layer's matrix.

bisup's state on an attention module is one `AttentionQuantState` (attribute
`bisup_attention_state`): the KVQuantSpec and the cache of the forward in progress, which a
forward pre-hook records (transformers does not pass the cache to attention functions).
Works for models whose attention modules carry `layer_idx` and call `ALL_ATTENTION_FUNCTIONS`
(Llama, Qwen2, Qwen3, Gemma3, ...).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bisup import ops, reference
from bisup.nn.kv_cache import MixedPrecisionKVCache, MixedPrecisionKVLayer, rotate_rows
from bisup.quant.formats import KV_BITS, SCALE_DTYPE, is_off
from bisup.quant.quantizer import fake_quantize
from bisup.rotation.hadamard import hadamard_matrix

ATTN_IMPLEMENTATION = "bisup"
STATE_ATTR = "bisup_attention_state"
ROTATION_BUFFER = "bisup_kv_rotation"  # the checkpoint stores it under this name
VALUE_BASIS_BUFFER = "bisup_value_basis"  # likewise
_CUDA_HEAD_DIMS = (64, 128, 256)  # what csrc/cuda/attention.cu takes; the CPU twin takes any


@dataclass
class KVQuantSpec:
    """How an attention module quantizes its K/V (saved in checkpoints as to_dict())."""

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: float = 1.0
    prompt_len: int = 0
    rotate: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttentionQuantState:
    """bisup's state on one attention module (its attribute `bisup_attention_state`).

    kv_spec: KV quantization of the module (None: K/V unquantized).
    cache: the cache of the forward in progress (set by a forward pre-hook, cleared after).
    """

    kv_spec: Optional[KVQuantSpec] = None
    cache: Optional[Cache] = None


# ------------------------------------------------------------------------------------------------
# per-module state
# ------------------------------------------------------------------------------------------------
def attention_state(module: nn.Module) -> Optional[AttentionQuantState]:
    """The module's AttentionQuantState, None when bisup never touched it."""
    return getattr(module, STATE_ATTR, None)


def _ensure_state(module: nn.Module) -> AttentionQuantState:
    """The module's state, created (with the hooks that record the cache) on first use."""
    state = attention_state(module)
    if state is None:
        state = AttentionQuantState()
        setattr(module, STATE_ATTR, state)
        module.register_forward_pre_hook(_record_cache, with_kwargs=True)
        module.register_forward_hook(_forget_cache, with_kwargs=True)
    return state


def _record_cache(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    attention_state(module).cache = cache
    config = getattr(module, "config", None)
    if isinstance(cache, MixedPrecisionKVCache) and getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        cache.set_fused(True)


def _forget_cache(module, args, kwargs, output):
    state = attention_state(module)
    if isinstance(state.cache, MixedPrecisionKVCache):
        state.cache.set_fused(False)  # outside bisup attention, `update` returns full K/V again
    state.cache = None


def get_kv_spec(module: nn.Module) -> Optional[KVQuantSpec]:
    """The KVQuantSpec of an attention module (None: its K/V are not quantized)."""
    state = attention_state(module)
    return None if state is None else state.kv_spec


def set_kv_rotation(module: nn.Module, rotation: torch.Tensor) -> None:
    """Sets the module's Q/K rotation [head_dim, head_dim] (the buffer `bisup_kv_rotation`)."""
    module.register_buffer(ROTATION_BUFFER, rotation)


def kv_rotation(module: nn.Module, head_dim: int, device=None) -> torch.Tensor:
    """The module's Q/K rotation, created as a normalized Hadamard of order head_dim when missing."""
    rot = getattr(module, ROTATION_BUFFER, None)
    if rot is None:
        rot = hadamard_matrix(head_dim, dtype=torch.float32, device=device)
        set_kv_rotation(module, rot)
    return rot


def value_basis(module: nn.Module) -> Optional[torch.Tensor]:
    """The basis the module's values live in, [kv_heads, head_dim, head_dim] (None: the model's own).

    A method that transforms v_proj's output (QuaRot's per-head Hadamard, BiSup's v -> o smoothing)
    records it here: this module's V of KV head h is V_fp[h] @ basis[h], V_fp the value the
    unquantized model computes. It maps a full-precision model's prompt KV into this model's
    (bisup.generation.prompt_kv); the module's forward does not use it."""
    return getattr(module, VALUE_BASIS_BUFFER, None)


def set_value_basis(module: nn.Module, basis: torch.Tensor) -> None:
    """Sets the buffer `bisup_value_basis` [kv_heads, head_dim, head_dim] (float32)."""
    module.register_buffer(VALUE_BASIS_BUFFER, basis.to(torch.float32).contiguous())


def compose_value_basis(module: nn.Module, transform: torch.Tensor, kv_heads: int, head_dim: int) -> None:
    """Records that the module's values were transformed once more, V[h] -> V[h] @ transform[h].

    transform: [head_dim, head_dim] (the same for every head) or [kv_heads, head_dim, head_dim]."""
    t = transform.to(_device_of(module), torch.float64)  # the buffer lives with the module
    t = t.expand(kv_heads, head_dim, head_dim) if t.dim() == 2 else t
    if t.shape != (kv_heads, head_dim, head_dim):
        raise ValueError(f"compose_value_basis: transform must be [{head_dim}, {head_dim}] or "
                         f"[{kv_heads}, {head_dim}, {head_dim}], got {list(transform.shape)}")
    old = value_basis(module)
    if old is None:
        old = torch.eye(head_dim, dtype=torch.float64, device=t.device).expand(kv_heads, head_dim, head_dim)
    set_value_basis(module, old.to(t.device, torch.float64) @ t)


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def set_kv_quant(model: nn.Module, attention_modules: Iterable[nn.Module], spec: Optional[KVQuantSpec]) -> None:
    """Gives every attention module `spec` (None removes it) and switches the model to bisup
    attention. With spec.rotate the Q/K rotation buffer is created now (unless set_kv_rotation set
    one), so that it is part of the state dict."""
    for attn in attention_modules:
        _ensure_state(attn).kv_spec = spec
        if spec is not None and spec.rotate and getattr(attn, "head_dim", None):
            kv_rotation(attn, attn.head_dim, _device_of(attn))
    if spec is not None:
        use_bisup_attention(model)


# ------------------------------------------------------------------------------------------------
# the attention function
# ------------------------------------------------------------------------------------------------
def fake_quant_kv(x: torch.Tensor, spec: KVQuantSpec) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]: fake-quantize positions >= prompt_len along head_dim."""
    if is_off(spec.bits):
        return x
    p = min(spec.prompt_len, x.shape[2])
    q = fake_quantize(x[:, :, p:], spec.bits, spec.group_size, spec.sym, spec.clip, scale_dtype=SCALE_DTYPE)
    return q if p == 0 else torch.cat([x[:, :, :p], q], dim=2)


def _plain_causal(mask: Optional[torch.Tensor], tq: int, total: int, window: int = 0) -> bool:
    """Whether a mask from the SDPA mask function is exactly the op's end-aligned causal mask (with
    that sliding window)."""
    if mask is None:
        return window <= 0 or window >= total  # (a window over every key masks nothing)
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (tq, total):
        return False
    global _last_mask
    key = (mask._version, tq, total, window)
    if _last_mask is not None and _last_mask[0] is mask and _last_mask[1] == key:
        return _last_mask[2]  # every layer of one kind in one forward gets the same mask object
    want = reference.attention_mask(1, tq, total, 0, causal=True, device=mask.device, window=window)
    ok = bool(torch.equal(mask, want.unsqueeze(1).expand_as(mask)))
    _last_mask = (mask, key, ok)
    return ok


_last_mask = None  # (mask, (version, tq, total, window), verdict) of the last mask checked


def _window(kwargs: dict) -> int:
    """The sliding window transformers passes to a local layer's attention (Gemma3), 0 for none."""
    return int(kwargs.get("sliding_window") or 0)


def _mixed_precision_layer(module: nn.Module, state: Optional[AttentionQuantState]) -> Optional[MixedPrecisionKVLayer]:
    cache, idx = (None if state is None else state.cache), getattr(module, "layer_idx", None)
    if isinstance(cache, MixedPrecisionKVCache) and idx is not None and idx < len(cache.layers):
        layer = cache.layers[idx]
        return layer if isinstance(layer, MixedPrecisionKVLayer) else None
    return None


def _fused_ok(query: torch.Tensor, attention_mask, total: int, dropout: float, kwargs: dict) -> bool:
    """Whether bisup.ops.attention computes this call (else: SDPA on dequantized K/V)."""
    return (
        dropout == 0.0
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and (query.device.type != "cuda" or query.shape[-1] in _CUDA_HEAD_DIMS)
        and _plain_causal(attention_mask, query.shape[2], total, _window(kwargs))
    )


def _kernel_fake_attention(query, key, value, attention_mask, spec: KVQuantSpec, dropout, scaling, kwargs):
    """Fake-mode inference with a KV spec the cache can hold: the very computation of real mode --
    positions < prompt_len as they are, the rest through bisup.ops.kv_quantize, read by
    bisup.ops.attention -- so fake and real mode agree bit for bit. (Fake-quantized K/V through SDPA
    hold the same values, but the softmax and P.V sums round in another order; on a W4A4 model
    such ulp differences flip downstream activation codes.) None where the fused op does not apply
    (gradients, or what real mode would run through SDPA too): the caller fake-quantizes for SDPA."""
    d = key.shape[-1]
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    if spec.bits not in KV_BITS or spec.sym or spec.clip != 1.0 or key.dtype not in (torch.float32, torch.float16,
                                                                                       torch.bfloat16):
        return None
    if (spec.group_size != -1 and (spec.group_size % 8 or d % spec.group_size)) or (spec.bits == 3 and d % 32):
        return None
    if not _fused_ok(query, attention_mask, key.shape[2], dropout, kwargs):
        return None
    p = min(spec.prompt_len, key.shape[2])
    kq = ops.kv_quantize(key[:, :, p:].contiguous(), spec.bits, spec.group_size)
    vq = ops.kv_quantize(value[:, :, p:].contiguous(), spec.bits, spec.group_size)
    out = ops.attention(query.contiguous(), key[:, :, :p].contiguous(), value[:, :, :p].to(key.dtype).contiguous(),
                        *kq, *vq, kv_bits=spec.bits, group_size=spec.group_size, softmax_scale=scaling, causal=True,
                        window=_window(kwargs))
    return out.transpose(1, 2).contiguous()


def bisup_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """transformers attention function: [B, Hq, Tq, D] queries -> ([B, Tq, Hq, D], None)."""
    state = attention_state(module)
    spec = None if state is None else state.kv_spec
    layer = _mixed_precision_layer(module, state)
    sdpa_kw = dict(dropout=dropout, scaling=scaling, **kwargs)
    if layer is None:  # fake KV quantization
        if spec is not None:
            if spec.rotate:
                rot = kv_rotation(module, query.shape[-1], query.device)
                query, key = rotate_rows(query, rot), rotate_rows(key, rot)
            out = _kernel_fake_attention(query, key, value, attention_mask, spec, dropout, scaling, kwargs)
            if out is not None:
                return out, None
            key, value = fake_quant_kv(key, spec), fake_quant_kv(value, spec)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kw)
    if layer.rotation is not None:  # the cache stored rotated keys
        query = rotate_rows(query, layer.rotation)
    if not _fused_ok(query, attention_mask, layer.get_seq_length(), dropout, kwargs):
        if layer.fused:
            key, value = layer.dequantized()  # `update` returned only the new tokens
        return sdpa_attention_forward(module, query, key, value, attention_mask, **sdpa_kw)
    out = ops.attention(
        query.contiguous(),
        *layer.attention_inputs(),
        kv_bits=layer.attention_bits,
        group_size=layer.attention_group_size,
        softmax_scale=scaling,
        causal=True,
        window=_window(kwargs),
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Registers the "bisup" attention implementation and its mask function (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, bisup_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_bisup_attention(model: nn.Module) -> None:
    """Sets the model's attention implementation to "bisup"."""
    _register()
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (ValueError, KeyError, AttributeError):
        pass  # e.g. no set_attn_implementation: set the config directly below
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.config._attn_implementation = ATTN_IMPLEMENTATION


def attention_modules(model: nn.Module) -> list:
    """The model's attention modules: those named *Attention that carry a layer_idx."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def enable_bisup_attention(model: nn.Module) -> nn.Module:
    """Switches a (plain or bisup-quantized) model to bisup attention, so that a
    MixedPrecisionKVCache passed to forward / generate is read by the fused op; returns the model."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"enable_bisup_attention: found no attention module with a layer_idx in {type(model).__name__}")
    for m in modules:
        _ensure_state(m)
    use_bisup_attention(model)
    return model


_register()
