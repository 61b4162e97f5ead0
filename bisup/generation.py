"""Generation with a system prompt whose KV cache is computed at full precision and kept there
(BiSup's horizontal error suppression), for fake- and real-mode models.

The system prompt is run once with activations unquantized and KV unquantized (`full_precision`),
by the quantized model itself (weights stay at their quantized values: a saved model holds no
others) or by an unquantized `fp_model`; or (`activations="quantized"`) by the quantized model
running as it runs every token, only its KV unquantized - what BiSup trains behind a prompt with.
Its K/V seed the cache: real mode stores them FP16 in the MixedPrecisionKVCache prompt segment and
quantizes every later token to kv_bits; fake mode keeps them in a DynamicCache and the fake
attention quantizes every position after them.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import nn
from transformers import DynamicCache

from bisup.nn.attention import KVQuantSpec, attention_state, value_basis
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.nn.quant_linear import QuantLinear
from bisup.nn.real_kv import cache_argument, make_cache
from bisup.nn.real_linear import dequantized_weight


def _fp_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight.to(x.device, x.dtype), None if bias is None else bias.to(x.dtype))
    return forward


@contextmanager
def full_precision(model: nn.Module):
    """Inside the block the model runs with unquantized activations and an unquantized KV cache;
    weights keep their (quantized) values. A model bisup did not quantize is left as it is."""
    act, real = [], []
    for m in model.modules():
        if isinstance(m, FakeQuantLinear) and m.act_quantizer is not None:
            act.append((m, m.act_quantizer))
            m.act_quantizer = None
        elif isinstance(m, QuantLinear):
            real.append(m)
            m.forward = _fp_linear(dequantized_weight(m), m.bias)
    try:
        with _kv_specs_replaced(model, lambda spec: None):
            yield model
    finally:
        for m, aq in act:
            m.act_quantizer = aq
        for m in real:
            del m.forward


def _kv_states(model: nn.Module) -> list:
    return [s for s in (attention_state(m) for m in model.modules()) if s is not None and s.kv_spec is not None]


@contextmanager
def _kv_specs_replaced(model: nn.Module, replace: Callable[[KVQuantSpec], Optional[KVQuantSpec]]):
    """Inside the block every attention module's KVQuantSpec is replace(spec)."""
    states = _kv_states(model)
    saved = [s.kv_spec for s in states]
    for state in states:
        state.kv_spec = replace(state.kv_spec)
    try:
        yield
    finally:
        for state, spec in zip(states, saved):
            state.kv_spec = spec


def prompt_len_replaced(model: nn.Module, prompt_len: int):
    """Context manager: inside it, fake KV quantization leaves the first prompt_len positions unquantized."""
    return _kv_specs_replaced(model, lambda spec: dataclasses.replace(spec, prompt_len=prompt_len))


def set_prompt_len(model: nn.Module, prompt_len: int) -> None:
    """From now on the first prompt_len positions' KV stay unquantized (fake specs and the real-mode
    cache), e.g. 0 after calibrating behind a system prompt (prompt_aware_calibration)."""
    for state in _kv_states(model):
        state.kv_spec = dataclasses.replace(state.kv_spec, prompt_len=prompt_len)
    if getattr(model, "bisup_config", None) is not None:
        model.bisup_config = model.bisup_config.replace(prompt_len=prompt_len)


def prompt_aware_calibration(calib: torch.Tensor, system_ids: torch.Tensor):
    """(windows, P): calibration windows [N, T] behind the system prompt [1, P], cut to T tokens, for
    QuantConfig(prompt_len=P): the prompt's KV then stays unquantized while BiSup trains, as at inference."""
    p = system_ids.shape[1]
    if p >= calib.shape[1]:
        raise ValueError(f"the system prompt ({p} tokens) leaves nothing of {calib.shape[1]}-token windows")
    return torch.cat([system_ids.expand(calib.shape[0], -1), calib[:, :calib.shape[1] - p]], dim=1), p


def split_chat(tokenizer, messages: list, prefix: str):
    """(prefix, rest) of `messages` rendered by the tokenizer's chat template with the generation
    prompt: the prefix (a system prompt) is tokenized and cached on its own, the rest follows it."""
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(prefix):
        raise ValueError(f"the chat template does not render the system prompt {prefix[:40]!r} as a prefix "
                         "of the conversation")
    return prefix, full[len(prefix):]


def _check_fp_model(model: nn.Module, fp_model: nn.Module) -> None:
    from bisup.models.adapters import get_adapter

    a, b = get_adapter(model), get_adapter(fp_model)
    got, want = (b.num_layers, b.num_kv_heads, b.head_dim), (a.num_layers, a.num_kv_heads, a.head_dim)
    if got != want:
        raise ValueError(f"fp_model has (layers, kv heads, head_dim) = {got}, the quantized model {want}")


def _to_value_basis(model: nn.Module, cache: DynamicCache) -> DynamicCache:
    """An unquantized model's prompt KV in `model`'s value basis (QuaRot rotates V per head, BiSup's
    v -> o smoothing scales it: nn.attention.value_basis); keys need no change (every method keeps q.k)."""
    from bisup.models.adapters import get_adapter

    adapter = get_adapter(model)
    out = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        basis = value_basis(adapter.attention(adapter.layers()[i]))
        if basis is not None:
            v = torch.einsum("bhtd,hde->bhte", v.to(torch.float32), basis.to(v.device)).to(v.dtype)
        out.update(k, v, i)
    return out


PROMPT_ACTIVATIONS = ("fp", "quantized")


@torch.no_grad()
def prompt_kv(model: nn.Module, system_ids: torch.Tensor, fp_model: Optional[nn.Module] = None,
              activations: str = "fp") -> DynamicCache:
    """K/V of the system prompt [B, P] at full precision, as a DynamicCache: computed by the
    quantized model with unquantized activations and KV (weights stay quantized), or with its
    activations quantized as for every token (activations="quantized": only the KV is unquantized,
    as BiSup trains behind a prompt, QuantConfig.prompt_len), or, with fp_model (the unquantized
    model), by fp_model and mapped into the quantized model's value basis."""
    if activations not in PROMPT_ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: expected one of {list(PROMPT_ACTIVATIONS)}")
    if fp_model is not None:
        if activations != "fp":
            raise ValueError("fp_model computes the prompt at full precision: activations must be 'fp'")
        _check_fp_model(model, fp_model)
    src = model if fp_model is None else fp_model
    cache = DynamicCache(config=src.config)
    run = full_precision(src) if activations == "fp" else _kv_specs_replaced(src, lambda spec: None)
    with run:
        src(system_ids, use_cache=True, **{cache_argument(src): cache})
    return cache if fp_model is None else _to_value_basis(model, cache)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, system_ids: Optional[torch.Tensor] = None,
             fp_model: Optional[nn.Module] = None, return_cache: bool = False, prompt_activations: str = "fp",
             **generate_kwargs):
    """model.generate() on concat(system_ids, input_ids), the system prompt's KV computed at full
    precision (see the module doc; prompt_activations="quantized": by the quantized model running its
    activations quantized, see prompt_kv) and kept unquantized; later tokens' KV at the model's kv_bits.

    Returns the generated ids [B, P + T + new] (and the cache with return_cache).
    """
    if system_ids is None:
        cache = make_cache(model)
        full = input_ids
    else:
        if system_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"system_ids has batch {system_ids.shape[0]}, input_ids {input_ids.shape[0]}")
        pkv = prompt_kv(model, system_ids, fp_model, prompt_activations)
        cache = make_cache(model, prompt_kv=pkv)
        full = torch.cat([system_ids, input_ids], dim=1)
    kw = dict(generate_kwargs)
    if system_ids is not None and cache is None:  # fake mode (or no KV quantization): the FP prompt in a DynamicCache
        cache = pkv
        # fake KV quantization leaves the system prompt's positions unquantized
        with prompt_len_replaced(model, system_ids.shape[1]):
            out = model.generate(full, **{cache_argument(model): cache}, **kw)
    else:
        if cache is not None:
            kw[cache_argument(model)] = cache
        out = model.generate(full, **kw)
    return (out, cache) if return_cache else out
