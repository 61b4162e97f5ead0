"""QuaRot (Ashkboos et al., 2024): rotate the model so that activations have no outlier channels,
then quantize weights (RTN, or GPTQ with config.gptq), activations per token, and the KV cache.

Steps (bisup/rotation/fuse.py has the algebra):
1. fold every RMSNorm scale feeding linears (attention / MLP input norms, the final norm) into
   those linears. q_norm / k_norm (Qwen3, Gemma3) act on q/k projections per head, in the
   unrotated head basis, and stay as they are;
2. rotate the residual stream by a randomized Hadamard Q (order hidden_size, any size):
   embeddings, q/k/v/gate/up/lm_head inputs, o/down outputs (lm_head untied if needed);
3. online Hadamard of order intermediate_size on the down_proj input (FakeQuantLinear's
   input_transform, bisup.ops.hadamard), its transpose folded into down_proj's weight;
4. V/O: a head_dim Hadamard folded into v_proj's output and o_proj's input, per head;
5. Q/K: rotated by a head_dim Hadamard after RoPE inside the fake-quant attention (rotate_kv),
   so K is quantized in the rotated basis (only when the KV cache is quantized).
Without quantization (16 bits everywhere) the rotated model computes the same function.

Models whose blocks end in a norm (Gemma3's post-attention / post-feedforward norms: "sandwich"
norms, `rotates_residual` is False) skip steps 1 and 2: each reader of the residual stream
(q/k/v, gate/up) instead reads its norm's output rotated online by Q (an input_transform like
step 3's, Q folded into the reader's weight), and the norms keep their scales. Two reasons:
- step 2 would buy nothing there: o/down write into a post norm, not into the stream, so their
  outputs cannot carry the rotation, and each post norm's output would need an online rotation
  anyway (as many transforms per layer as the readers' two inputs);
- step 1 is harmful there. A trained Gemma3's residual stream holds one massive channel in every
  token (gemma-3-270m: ~87% of the normalised stream's energy on channel 400, later 163), and the
  norms that feed the readers delete it (pre-feedforward scale 1 + w = 0 exactly on it, input norm
  ~1.5 against a mean of ~15). Folded into the readers and rotated, the scales no longer act
  before the quantizers: the rotated input carries the massive channel's energy spread over every
  coordinate, the readers' weights W diag(s) Q are blind to its direction but their 4-bit error is
  not, and the activation quantizer spends its range on it. Measured on gemma-3-270m, relative
  output error of a 4-bit g64 reader: 0.06-0.13 without rotation, 0.6-3.5 folded + rotated, and
  0.06-0.13 rotated after the norm; perplexity W4A16 RTN 22 -> 8.6e7 (docs/architecture.md).
"""
from __future__ import annotations

from typing import Dict, List, Optional

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
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def _post_norms(adapter, layer: nn.Module) -> List[str]:
    """Names of the layer's norms that act on a block's output before the residual add: the
    adapter's extra norms that are direct children of the layer (q/k norms live in the attention)."""
    extra = {id(n) for n in adapter.extra_norms(layer)}
    return [name for name, child in layer.named_children() if id(child) in extra]


def rotates_residual(adapter) -> bool:
    """Whether QuaRot rotates the residual stream (steps 1-2) or, for models with post norms, rotates
    each reader's input online after its norm (module docstring)."""
    return not any(_post_norms(adapter, layer) for layer in adapter.layers())


@torch.no_grad()
def rotate_model(model: nn.Module, adapter, config: QuantConfig,
                 placement: Optional[Placement] = None) -> Dict[str, fuse.HadamardTransform]:
    """Steps 1, 2 and 4 in place (the model still computes the same function), one decoder layer at a
    time on placement's compute device; embeddings and lm_head in chunks of rows there. Returns the
    online transforms the readers get instead of steps 1-2 ({} when the residual stream is rotated):
    {linear name: x -> x Q}, for the caller to fold into the weights (fold_online_hadamard) and install
    as input_transform, like step 3's."""
    placement = placement or Placement.for_model(model)
    hidden, head_dim = adapter.hidden_size, adapter.head_dim
    q = fuse.random_hadamard_transform(hidden, config.rotation_seed)  # q(x) = x @ Q, Q = random_hadamard(hidden, seed)
    h_head = hadamard_matrix(head_dim, torch.float64)
    residual = rotates_residual(adapter)
    if residual:
        if adapter.tied_embeddings:
            fuse.untie_lm_head(model, adapter.lm_head(), adapter.embeddings())
        fuse.rotate_embedding(adapter.embeddings(), q, placement.compute(adapter.embeddings()))
    for layer in adapter.layers():
        with placement.layer(layer, finish=False, cast=False):  # folds compute in fuse.work_dtype
            if residual:
                _rotate_layer(adapter, layer, q)
            _rotate_heads(adapter, layer, h_head)
    if not residual:
        return {name: q for name in READERS}
    fuse.fold_norm_into(adapter.final_norm(), [adapter.lm_head()], adapter.norm_offset)
    fuse.rotate_input(adapter.lm_head(), q, placement.compute(adapter.lm_head()))
    return {}


def _rotate_layer(adapter, layer: nn.Module, q: fuse.HadamardTransform) -> None:
    """Steps 1 and 2 on one decoder layer."""
    off = adapter.norm_offset
    readers = [adapter.q_proj(layer), adapter.k_proj(layer), adapter.v_proj(layer)]
    fuse.fold_norm_into(adapter.attn_norm(layer), readers, off)
    mlp_readers = [adapter.gate_proj(layer), adapter.up_proj(layer)]
    fuse.fold_norm_into(adapter.mlp_norm(layer), mlp_readers, off)
    for lin in readers + mlp_readers:
        fuse.rotate_input(lin, q)
    fuse.rotate_output(adapter.o_proj(layer), q)
    fuse.rotate_output(adapter.down_proj(layer), q)


def _rotate_heads(adapter, layer: nn.Module, h_head: torch.Tensor) -> None:
    """Step 4 on one decoder layer."""
    head_dim = adapter.head_dim
    fuse.rotate_heads_output(adapter.v_proj(layer), h_head, head_dim)
    fuse.rotate_heads_input(adapter.o_proj(layer), h_head, head_dim)
    compose_value_basis(adapter.attention(layer), h_head, adapter.num_kv_heads, head_dim)


def online_transforms(model: nn.Module, adapter, config: QuantConfig,
                      placement: Optional[Placement] = None) -> Dict[str, fuse.HadamardTransform]:
    """Steps 1, 2 and 4 (rotate_model), and {linear name: online transform} of every linear that reads
    its input through one: the readers' Q when the residual stream is not rotated, step 3's Hadamard."""
    transforms = dict(rotate_model(model, adapter, config, placement))
    if config.online_hadamard:
        transforms[DOWN] = fuse.HadamardTransform(adapter.intermediate_size)
    return transforms


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
    transforms = online_transforms(model, adapter, config, placement)
    apply_kv_quant(model, adapter, config, rotate=config.rotate_kv)

    if config.gptq and config.quantizes_weights:
        if calib_batches is None:
            raise ValueError("QuaRot with gptq=True needs calibration batches")
        for _, layer, inputs in iterate_layers(model, adapter, calib_batches, progress=progress,
                                               stats=("hessian",), desc="QuaRot+GPTQ", placement=placement,
                                               stat_transforms=transforms or None):
            for name, t in transforms.items():  # their Hessians are already of the transformed inputs
                fold_online_hadamard(adapter.get_linear(layer, name), t)
            quantize_layer_gptq(adapter, layer, inputs.stats, config)
            for name, t in transforms.items():
                adapter.get_linear(layer, name).input_transform = t
        return

    for layer in tqdm(adapter.layers(), desc="QuaRot", disable=not progress):
        with placement.layer(layer):
            for name in adapter.linear_names():
                linear = adapter.get_linear(layer, name)
                t = transforms.get(name)
                if t is not None:
                    fold_online_hadamard(linear, t)
                adapter.set_linear(layer, name, fake_quant_linear(linear, config, input_transform=t))


def _bisup_prepare(model: nn.Module, adapter, config: QuantConfig, placement: Optional[Placement] = None) -> dict:
    """QuaRot's model-level steps for BiSup: rotate (steps 1, 2, 4), KV quantization with the Q/K
    rotation (step 5); the online transforms (step 3's Hadamard before down_proj, the readers' Q on
    models with post norms) are handed to the layer loop, which folds them into the weights after the
    learned smoothing (see bisup/methods/bisup.py)."""
    transforms = online_transforms(model, adapter, config, placement)
    apply_kv_quant(model, adapter, config, rotate=config.rotate_kv)
    return transforms


METHOD = Method("quarot", apply, calibrates=lambda config: config.gptq and config.quantizes_weights,
                options=("rotation_seed", "online_hadamard", "rotate_kv", "gptq"),
                summary="Hadamard rotations (residual, online before down_proj, V/O, Q/K); RTN or GPTQ weights",
                bisup_base=BiSupBase(prepare=_bisup_prepare))
