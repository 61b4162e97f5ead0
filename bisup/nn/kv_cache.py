"""MixedPrecisionKVCache: BiSup's horizontal error suppression as a transformers `Cache`.

Each decoder layer keeps the first `prompt_len` tokens (the system prompt) at full precision --
the model's own dtype, fp16/bf16 in deployment -- and quantizes every later token's K and V on
append with `bisup.ops.kv_quantize` (asymmetric, per token and head, 3/4/8 bits). The prompt
segment is either computed by the model itself during the first forward, or supplied
precomputed (e.g. by the full-precision model) with `MixedPrecisionKVCache.from_prompt_kv`.

A layer may carry a key rotation R [D, D] (QuaRot's Q/K rotation): keys are multiplied by R
before they are stored (after RoPE, which is why R cannot be folded into k_proj), and bisup
attention multiplies the queries by the same R, which leaves q.k unchanged.

With bisup attention (bisup/nn/attention.py) the attention layers read the two segments directly
through `bisup.ops.attention` (fused dequantization). Without it, `update` returns the
dequantized K/V like any transformers cache, so any attention implementation works.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from bisup import ops
from bisup.quant.formats import KV_BITS, OFF_BITS, SCALE_DTYPE, is_off, num_groups, packed_row_bytes


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ rotation [D, D], each row computed in float64 and rounded to x's dtype once.

    A float32 matmul's result for one row depends on how many rows it is computed with (the BLAS
    picks other kernels), so keys rotated one token at a time (the cache, decoding) and all at once
    (fake mode) would differ in the last bit; in float64 the sums are far below the output's rounding.
    Fake and real mode both rotate through here."""
    d = x.shape[-1]
    y = x.reshape(-1, d).to(torch.float64) @ rotation.to(x.device, torch.float64)
    return y.to(x.dtype).reshape(x.shape)


class MixedPrecisionKVLayer(DynamicLayer):
    """One layer: K/V [B, H, P, D] at full precision, then packed K/V [B, H, S, bytes] + fp16 scale/zero.

    rotation: an optional [D, D] matrix every key is multiplied by before it is stored.
    """

    is_croppable = False

    def __init__(self, prompt_len: int = 0, kv_bits: int = 4, group_size: int = -1,
                 rotation: Optional[torch.Tensor] = None, **kwargs):
        super().__init__()
        self.prompt_len = prompt_len
        self.kv_bits = kv_bits
        self.group_size = group_size
        self.rotation = rotation
        # Set while bisup attention runs: `update` then skips building dequantized K/V nobody reads.
        self.fused = False
        self._clear()

    def _clear(self) -> None:
        self.k_prompt = self.v_prompt = None
        self.k_q = self.k_scale = self.k_zero = None
        self.v_q = self.v_scale = self.v_zero = None

    def _rotate(self, keys: torch.Tensor) -> torch.Tensor:
        return keys if self.rotation is None else rotate_rows(keys, self.rotation)

    # -- transformers layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: Optional[torch.Tensor] = None) -> None:
        # value_states is optional: some transformers 5.x versions pass only the keys here
        value_states = key_states if value_states is None else value_states
        b, h, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.k_prompt = key_states.new_empty(b, h, 0, d)
        self.v_prompt = value_states.new_empty(b, h, 0, d)
        if not is_off(self.kv_bits):
            packed = key_states.new_empty(b, h, 0, packed_row_bytes(self.kv_bits, d), dtype=torch.uint8)
            params = key_states.new_empty(b, h, 0, num_groups(d, self.group_size), dtype=SCALE_DTYPE)
            self.k_q, self.v_q = packed, packed.clone()
            self.k_scale, self.k_zero, self.v_scale, self.v_zero = (params.clone() for _ in range(4))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Appends new K/V [B, H, T, D] (keys rotated first): prompt slots first, the rest quantized.
        Returns the full dequantized K/V, or (while bisup attention runs) the inputs."""
        key_states = self._rotate(key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        p, t = self.k_prompt.shape[2], key_states.shape[2]
        n_prompt = t if is_off(self.kv_bits) else max(0, min(t, self.prompt_len - p))
        if n_prompt:
            self.k_prompt = torch.cat([self.k_prompt, key_states[:, :, :n_prompt].to(self.dtype)], dim=2)
            self.v_prompt = torch.cat([self.v_prompt, value_states[:, :, :n_prompt].to(self.dtype)], dim=2)
        if n_prompt < t:
            self._append_quantized(key_states[:, :, n_prompt:], value_states[:, :, n_prompt:])
        if self.fused:
            return key_states, value_states
        return self.dequantized()

    def _append_quantized(self, k: torch.Tensor, v: torch.Tensor) -> None:
        kq = ops.kv_quantize(k.contiguous(), self.kv_bits, self.group_size)
        vq = ops.kv_quantize(v.contiguous(), self.kv_bits, self.group_size)
        cat = lambda old, new: tuple(torch.cat([a, b], dim=2) for a, b in zip(old, new))  # noqa: E731
        self.k_q, self.k_scale, self.k_zero = cat((self.k_q, self.k_scale, self.k_zero), kq)
        self.v_q, self.v_scale, self.v_zero = cat((self.v_q, self.v_scale, self.v_zero), vq)

    def dequantized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The logical K/V [B, H, P + S, D] in the prompt dtype (keys as stored, i.e. rotated)."""
        if self.quant_len == 0:
            return self.k_prompt, self.v_prompt
        k = ops.kv_dequantize(self.k_q, self.k_scale, self.k_zero, self.kv_bits, self.group_size, self.dtype)
        v = ops.kv_dequantize(self.v_q, self.v_scale, self.v_zero, self.kv_bits, self.group_size, self.dtype)
        return torch.cat([self.k_prompt, k], dim=2), torch.cat([self.v_prompt, v], dim=2)

    def attention_inputs(self) -> tuple:
        """(k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero) for bisup.ops.attention."""
        if is_off(self.kv_bits):  # nothing quantized: an empty 4-bit segment
            b, h, _, d = self.k_prompt.shape
            packed = self.k_prompt.new_empty(b, h, 0, packed_row_bytes(4, d), dtype=torch.uint8)
            params = self.k_prompt.new_empty(b, h, 0, 1, dtype=SCALE_DTYPE)
            return self.k_prompt, self.v_prompt, packed, params, params, packed, params, params
        return (self.k_prompt, self.v_prompt, self.k_q, self.k_scale, self.k_zero, self.v_q, self.v_scale, self.v_zero)

    @property
    def attention_bits(self) -> int:
        return 4 if is_off(self.kv_bits) else self.kv_bits

    @property
    def attention_group_size(self) -> int:
        return -1 if is_off(self.kv_bits) else self.group_size

    @property
    def quant_len(self) -> int:
        return 0 if self.k_q is None else self.k_q.shape[2]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.k_prompt.shape[2] + self.quant_len

    def set_prompt(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Stores precomputed prompt K/V [B, H, P, D] (keys rotated first; on an empty layer only)."""
        if self.get_seq_length():
            raise ValueError("set_prompt: the layer already holds tokens; set the prompt on an empty cache")
        key_states = self._rotate(key_states)
        self.lazy_initialization(key_states, value_states)
        self.prompt_len = key_states.shape[2]
        self.k_prompt, self.v_prompt = key_states.contiguous(), value_states.to(key_states.dtype).contiguous()

    def memory_bytes(self) -> Tuple[int, int]:
        """(bytes stored, bytes of the same tokens in an fp16 cache)."""
        if not self.is_initialized:
            return 0, 0
        tensors = [getattr(self, name) for name in self._tensor_names()]
        stored = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        b, h, _, d = self.k_prompt.shape
        return stored, 2 * b * h * self.get_seq_length() * d * 2

    def _tensor_names(self):
        return ("k_prompt", "v_prompt", "k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")

    def _apply(self, fn) -> None:
        for name in self._tensor_names():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MixedPrecisionKVCache does not support crop (assisted decoding)")

    def offload(self):
        raise NotImplementedError("MixedPrecisionKVCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("MixedPrecisionKVCache does not support offloading")


# Sliding-window layers keep every token like the others (no eviction): bisup attention applies the
# window as a mask (bisup.ops.attention's `window`, which transformers passes to those layers), over
# the FP prompt segment too, so a query `window` or more tokens past the system prompt no longer
# sees it -- what the unquantized model computes. The memory of a sliding layer is that of a full one.
# (Fake mode decodes with transformers' own sliding cache, which evicts tokens past the window; its
# KV quantization counts prompt positions from the first token it is handed, so with prompt_len > 0
# a fake-mode decode past the window keeps the first prompt_len *kept* tokens unquantized, where real
# mode, the exact one, quantizes them. Forward passes and prompt_len = 0 agree bit for bit.)
LAYER_TYPES = ("full_attention", "sliding_attention")


def _kv_pairs(prompt_kv) -> List[tuple]:
    """(key, value) per layer of a transformers Cache or of a sequence of pairs."""
    if isinstance(prompt_kv, Cache):
        return [(layer.keys, layer.values) for layer in prompt_kv.layers]
    return list(prompt_kv)


class MixedPrecisionKVCache(Cache):
    """A transformers Cache whose layers keep `prompt_len` full-precision tokens, then `kv_bits` KV.

    Args:
        prompt_len: tokens per layer kept at full precision (the system prompt).
        kv_bits: 3, 4 or 8 for the quantized segment; 16 keeps everything at full precision.
        group_size: quantization group along head_dim (-1: one group per head).
        config: the model config (optional): builds one layer per decoder layer up front and
            rejects layer types other than full and sliding-window attention.
        rotations: optional key rotation per layer ([D, D] or None), see the module doc.
    """

    def __init__(self, prompt_len: int = 0, kv_bits: int = 4, group_size: int = -1, config=None,
                 rotations: Optional[Sequence[Optional[torch.Tensor]]] = None):
        if kv_bits not in KV_BITS and kv_bits != OFF_BITS:
            raise ValueError(f"MixedPrecisionKVCache: kv_bits must be one of {KV_BITS} or {OFF_BITS} "
                             f"(no quantization), got {kv_bits}")
        if prompt_len < 0:
            raise ValueError(f"MixedPrecisionKVCache: prompt_len must be >= 0, got {prompt_len}")
        if group_size != -1 and (group_size <= 0 or group_size % 8):
            raise ValueError(f"MixedPrecisionKVCache: group_size must be -1 or a positive multiple of 8, got {group_size}")
        self.prompt_len, self.kv_bits, self.group_size = prompt_len, kv_bits, group_size
        self.rotations = None if rotations is None else list(rotations)
        self.fused = False
        if config is None:  # layers appear as the model updates them, in layer order
            super().__init__(layer_class_to_replicate=lambda: self._new_layer(len(self.layers)))
            return
        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        unsupported = sorted(set(types) - set(LAYER_TYPES))
        if unsupported:
            raise ValueError(f"MixedPrecisionKVCache supports {list(LAYER_TYPES)} layers, the config also has "
                             f"{unsupported}")
        super().__init__(layers=[self._new_layer(i) for i in range(text.num_hidden_layers)])

    @classmethod
    def from_prompt_kv(cls, prompt_kv: Iterable, kv_bits: int = 4, group_size: int = -1, config=None,
                       rotations: Optional[Sequence[Optional[torch.Tensor]]] = None) -> "MixedPrecisionKVCache":
        """A cache holding precomputed prompt K/V: a transformers cache (e.g. the DynamicCache of
        the full-precision model after a forward over the system prompt) or a sequence of
        (key, value) [B, H, P, D] per layer. config / rotations as in the constructor."""
        pairs = _kv_pairs(prompt_kv)
        if not pairs:
            raise ValueError("from_prompt_kv: no layers given")
        lengths = sorted({k.shape[2] for k, _ in pairs})
        if len(lengths) > 1:  # e.g. a transformers sliding-window cache layer that evicted prompt tokens
            raise ValueError(f"from_prompt_kv: every layer must hold the whole prompt, got lengths {lengths} "
                             "(a sliding-window cache drops tokens beyond its window: compute the prompt KV "
                             "with a cache that keeps every token, or use a prompt shorter than the window)")
        cache = cls(pairs[0][0].shape[2], kv_bits, group_size, config, rotations)
        if config is None:
            cache.layers.extend(cache._new_layer(i) for i in range(len(pairs)))
        elif len(pairs) != len(cache.layers):
            raise ValueError(f"from_prompt_kv: prompt_kv has {len(pairs)} layers, the model has {len(cache.layers)}")
        for layer, (k, v) in zip(cache.layers, pairs):
            layer.set_prompt(k, v)
        return cache

    def _new_layer(self, index: int) -> MixedPrecisionKVLayer:
        rotation = self.rotations[index] if self.rotations is not None and index < len(self.rotations) else None
        layer = MixedPrecisionKVLayer(self.prompt_len, self.kv_bits, self.group_size, rotation)
        layer.fused = self.fused
        return layer

    def set_fused(self, fused: bool) -> None:
        """Whether `update` may skip returning dequantized K/V (bisup attention reads the segments)."""
        self.fused = fused
        for layer in self.layers:
            layer.fused = fused

    def memory_bytes(self) -> dict:
        """Bytes held vs an fp16 cache of the same tokens: {'bytes', 'fp16_bytes', 'ratio'}."""
        stored, fp16 = (sum(x) for x in zip(*(layer.memory_bytes() for layer in self.layers))) if self.layers else (0, 0)
        return {"bytes": stored, "fp16_bytes": fp16, "ratio": stored / fp16 if fp16 else float("nan")}
