"""Fake KV-cache quantization as a transformers attention function ("bisup_fakequant").

Each attention module that carries a `bisup_kv` spec (KVQuantSpec) gets its keys and values
fake-quantized per token and per head along head_dim before SDPA runs; the first `prompt_len`
positions (the system prompt, kept in FP16 by the mixed-precision cache) stay unquantized.
With `rotate`, q and k are first multiplied by an orthogonal head_dim x head_dim matrix (a
Hadamard, QuaRot), which leaves q.k unchanged but spreads outliers before K is quantized.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bisup.quant.quantizer import fake_quantize

ATTN_NAME = "bisup_fakequant"


@dataclass
class KVQuantSpec:
    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: float = 1.0
    prompt_len: int = 0
    rotate: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def fake_quant_kv(x: torch.Tensor, spec: KVQuantSpec) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]: fake-quantize positions >= prompt_len along head_dim."""
    if spec.bits >= 16:
        return x
    p = min(spec.prompt_len, x.shape[2])
    q = fake_quantize(x[:, :, p:], spec.bits, spec.group_size, spec.sym, spec.clip, scale_dtype=torch.float16)
    return q if p == 0 else torch.cat([x[:, :, :p], q], dim=2)


def kv_rotation(module: nn.Module, head_dim: int, device, dtype) -> torch.Tensor:
    """The module's q/k rotation (a buffer `bisup_kv_rotation`); a Hadamard of order head_dim by default."""
    rot = getattr(module, "bisup_kv_rotation", None)
    if rot is None:
        try:
            from bisup.rotation.hadamard import hadamard_matrix
        except ImportError as err:  # the rotation package is another part of bisup
            raise ImportError("rotate_kv needs bisup.rotation.hadamard.hadamard_matrix") from err
        rot = hadamard_matrix(head_dim, dtype=torch.float32, device=device)
        module.register_buffer("bisup_kv_rotation", rot)
    return rot.to(device=device, dtype=dtype)


def fakequant_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The sdpa path with fake-quantized (and optionally rotated) K/V; same signature as sdpa."""
    spec: Optional[KVQuantSpec] = getattr(module, "bisup_kv", None)
    if spec is not None:
        if spec.rotate:
            rot = kv_rotation(module, query.shape[-1], query.device, query.dtype)
            query, key = query @ rot, key @ rot
        key, value = fake_quant_kv(key, spec), fake_quant_kv(value, spec)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register the attention function and its mask builder (the sdpa one) with transformers."""
    AttentionInterface.register(ATTN_NAME, fakequant_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_fakequant_attention(model: nn.Module) -> None:
    """Switch a model to the "bisup_fakequant" attention (a no-op for modules without a spec)."""
    register()
    try:
        model.set_attn_implementation(ATTN_NAME)
    except (ValueError, KeyError, AttributeError):
        model.config._attn_implementation = ATTN_NAME
    if model.config._attn_implementation != ATTN_NAME:
        model.config._attn_implementation = ATTN_NAME


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def set_kv_quant(model: nn.Module, attention_modules, spec: Optional[KVQuantSpec]) -> None:
    """Attach `spec` to every attention module (None removes it) and switch the model's attention.
    With spec.rotate the q/k rotation buffer is created now, so that it is part of the state dict."""
    for attn in attention_modules:
        attn.bisup_kv = spec
        if spec is not None and spec.rotate and getattr(attn, "head_dim", None):
            kv_rotation(attn, attn.head_dim, _device_of(attn), torch.float32)
    if spec is not None:
        use_fakequant_attention(model)


register()
