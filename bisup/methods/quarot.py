"""QuaRot (Ashkboos et al., 2024): rotate the model so that activations have no outlier channels,
then quantize weights (RTN, or GPTQ with config.gptq), activations per token, and the KV cache.

Steps (bisup/rotation/fuse.py has the algebra):
1. fold every RMSNorm scale feeding linears (attention / MLP input norms, the final norm) into
   those linears; Gemma's (1 + w) norms via adapter.norm_offset. q_norm / k_norm (Qwen3, Gemma3)
   act on q/k projections per head, in the unrotated head basis, and stay as they are;
2. rotate the residual stream by a randomized Hadamard Q (order hidden_size, any size):
   embeddings, q/k/v/gate/up/lm_head inputs, o/down outputs (lm_head untied if needed). Gemma3's
   post-attention / post-feedforward norms act on o/down outputs before the residual add, so
   there o/down stay unrotated and the norm's output is rotated online (RotateAfter);
3. online Hadamard of order intermediate_size on the down_proj input (FakeQuantLinear's
   input_transform, bisup.ops.hadamard), its transpose folded into down_proj's weight;
4. V/O: a head_dim Hadamard folded into v_proj's output and o_proj's input, per head;
5. Q/K: rotated by a head_dim Hadamard after RoPE inside the fake-quant attention (rotate_kv),
   so K is quantized in the rotated basis (only when the KV cache is quantized).
Without quantization (16 bits everywhere) the rotated model computes the same function.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from bisup.config import QuantConfig
from bisup.methods.calibration import iterate_layers
from bisup.methods.placement import Placement
from bisup.methods.common import BiSupBase, Method, apply_kv_quant, fake_quant_linear
from bisup.methods.gptq import quantize_layer_gptq
from bisup.nn.attention import compose_value_basis
from bisup.rotation import fuse
from bisup.rotation.hadamard import hadamard_matrix

DOWN = "mlp.down_proj"


def _post_norms(adapter, layer: nn.Module) -> List[str]:
    """Names of the layer's norms that act on a block's output before the residual add: the
    adapter's extra norms that are direct children of the layer (q/k norms live in the attention)."""
    extra = {id(n) for n in adapter.extra_norms(layer)}
    return [name for name, child in layer.named_children() if id(child) in extra]


@torch.no_grad()
def rotate_model(model: nn.Module, adapter, config: QuantConfig, placement: Optional[Placement] = None) -> None:
    """Steps 1, 2 and 4 in place (the model still computes the same function), one decoder layer at a
    time on placement's compute device; embeddings and lm_head in chunks of rows there."""
    placement = placement or Placement.for_model(model)
    hidden, head_dim = adapter.hidden_size, adapter.head_dim
    if adapter.tied_embeddings:
        fuse.untie_lm_head(model, adapter.lm_head(), adapter.embeddings())
    q = fuse.random_hadamard_transform(hidden, config.rotation_seed)  # q(x) = x @ Q, Q = random_hadamard(hidden, seed)
    h_head = hadamard_matrix(head_dim, torch.float64)

    fuse.rotate_embedding(adapter.embeddings(), q, placement.compute(adapter.embeddings()))
    for layer in adapter.layers():
        with placement.layer(layer, finish=False, cast=False):  # folds compute in fuse.work_dtype
            _rotate_layer(adapter, layer, q, h_head)
    fuse.fold_norm_into(adapter.final_norm(), [adapter.lm_head()], adapter.norm_offset)
    fuse.rotate_input(adapter.lm_head(), q, placement.compute(adapter.lm_head()))


def _rotate_layer(adapter, layer: nn.Module, q: fuse.HadamardTransform, h_head: torch.Tensor) -> None:
    """Steps 1, 2 and 4 on one decoder layer."""
    off, head_dim = adapter.norm_offset, adapter.head_dim
    readers = [adapter.q_proj(layer), adapter.k_proj(layer), adapter.v_proj(layer)]
    fuse.fold_norm_into(adapter.attn_norm(layer), readers, off)
    mlp_readers = [adapter.gate_proj(layer), adapter.up_proj(layer)]
    fuse.fold_norm_into(adapter.mlp_norm(layer), mlp_readers, off)
    for lin in readers + mlp_readers:
        fuse.rotate_input(lin, q)
    post = _post_norms(adapter, layer)
    if post:  # Gemma3: rotate after the post norms instead of the o/down outputs
        for name in post:
            setattr(layer, name, fuse.RotateAfter(getattr(layer, name), q))
    else:
        fuse.rotate_output(adapter.o_proj(layer), q)
        fuse.rotate_output(adapter.down_proj(layer), q)
    fuse.rotate_heads_output(adapter.v_proj(layer), h_head, head_dim)
    fuse.rotate_heads_input(adapter.o_proj(layer), h_head, head_dim)
    compose_value_basis(adapter.attention(layer), h_head, adapter.num_kv_heads, head_dim)


@torch.no_grad()
def fold_online_hadamard(linear: nn.Module, transform: fuse.HadamardTransform) -> None:
    """The layer will read x M (x -> transform(x) = x @ M, M orthogonal): W' = W M keeps x W^T."""
    fuse.rotate_input(linear, transform)


@torch.no_grad()
def apply(model: nn.Module, adapter, config: QuantConfig, calib_batches: Optional[torch.Tensor] = None,
          progress: bool = True, placement: Optional[Placement] = None) -> None:
    """QuaRot in place: rotate (steps 1-5), then quantize weights (RTN, or GPTQ on the rotated
    model's calibration Hessians when config.gptq), activations per token and KV per config."""
    placement = placement or Placement.for_model(model)
    rotate_model(model, adapter, config, placement)
    down_t = fuse.HadamardTransform(adapter.intermediate_size) if config.online_hadamard else None
    apply_kv_quant(model, adapter, config, rotate=config.rotate_kv)

    if config.gptq and config.quantizes_weights:
        if calib_batches is None:
            raise ValueError("QuaRot with gptq=True needs calibration batches")
        for _, layer, inputs in iterate_layers(model, adapter, calib_batches, progress=progress,
                                               stats=("hessian",), desc="QuaRot+GPTQ", placement=placement,
                                               stat_transforms={DOWN: down_t} if down_t is not None else None):
            if down_t is not None:  # its Hessian is already of the transformed input (stat_transforms)
                fold_online_hadamard(adapter.down_proj(layer), down_t)
            quantize_layer_gptq(adapter, layer, inputs.stats, config)
            if down_t is not None:
                adapter.down_proj(layer).input_transform = down_t
        return

    for layer in tqdm(adapter.layers(), desc="QuaRot", disable=not progress):
        with placement.layer(layer):
            for name in adapter.linear_names():
                linear = adapter.get_linear(layer, name)
                t = down_t if name == DOWN else None
                if t is not None:
                    fold_online_hadamard(linear, t)
                adapter.set_linear(layer, name, fake_quant_linear(linear, config, input_transform=t))


def _bisup_prepare(model: nn.Module, adapter, config: QuantConfig, placement: Optional[Placement] = None) -> dict:
    """QuaRot's model-level steps for BiSup: rotate (steps 1, 2, 4), KV quantization with the Q/K
    rotation (step 5); the online Hadamard before down_proj (step 3) is handed to the layer loop,
    which folds it into down_proj's weight after the learned smoothing (see bisup/methods/bisup.py)."""
    rotate_model(model, adapter, config, placement)
    apply_kv_quant(model, adapter, config, rotate=config.rotate_kv)
    return {DOWN: fuse.HadamardTransform(adapter.intermediate_size)} if config.online_hadamard else {}


METHOD = Method("quarot", apply, calibrates=lambda config: config.gptq and config.quantizes_weights,
                options=("rotation_seed", "online_hadamard", "rotate_kv", "gptq"),
                summary="Hadamard rotations (residual, online before down_proj, V/O, Q/K); RTN or GPTQ weights",
                bisup_base=BiSupBase(prepare=_bisup_prepare))
