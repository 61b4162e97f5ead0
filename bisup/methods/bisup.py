"""BiSup's vertical error suppression: block-wise quantization-aware fine-tuning on top of a base method.

    quantize_model(model, QuantConfig(method="quarot" | "atom" | "gptq" | "rtn", bisup=BiSupConfig()))

1. the base method's model-level steps (Method.bisup_base.prepare: QuaRot rotates the model; every
   base switches on its KV quantization);
2. decoder layer by decoder layer (iterate_layers(..., targets=True): inputs from the already
   quantized layers below, targets = the full-precision model's outputs of this layer), the layer's
   linears become LearnableLinears (bisup/quant/learnable.py) with the base's outlier channels
   (Atom) and input transforms (QuaRot's online Hadamard), sharing per-channel smoothing scales:
       norm -> q/k/v, norm -> gate/up   (readers divide their input; folded into the norm weight)
       v -> o                           (v's output rows / s, o's input columns * s, GQA-expanded)
       up -> down                       (up's output rows / s, down's input columns * s)
   and trained with AdamW (the rounding offsets optionally with SignSGD, BiSupConfig.rounding_optimizer) on
       relative_error(layer(h), target) + smooth_penalty * penalty   (bisup_training.py; BiSupConfig.loss: over all
       tokens at once, or per token and averaged)
   (straight-through estimator through every fake quantizer; fixed seed per layer);
3. export: an ORDINARY quantized layer. Smoothing is folded into the norms / weights, the learned
   weight clipping fixes the group scales, the codes are the learned rounding's (rounding=True, the
   default: chosen on validation windows, bench/results/bisup_rounding.md), or, without it, RTN
   codes, or GPTQ codes when the base uses GPTQ (on the trained block's own input Hessians, with
   the weight pre-clamped to the learned clip range), the learned activation clip
   ratio (a Python float per linear) goes into its ActQuantizer; FakeQuantLinear.from_codes /
   the GPTQ helpers build the modules, so save/load and mode="real" need nothing new.

Where smoothing folds under QuaRot: the scales live in the rotated residual basis (norm readers: the
norm weight is the identity after QuaRot's fold, it becomes 1/s) and in the per-head Hadamard basis
of V/O. For up -> down, a diagonal scale does not commute with the online Hadamard M before
down_proj (diag(s) M != M diag(s)), so a scale AFTER M could not be folded into up_proj. The scale is
applied BEFORE M, in the intermediate basis: up rows / s, down weight (W diag(s)) M, online M
unchanged; this folds exactly (x diag(1/s) M (W diag(s) M)^T = x W^T), at the price that the
smoothed activation is then mixed by M before it is quantized. Its initial scales are 1 under QuaRot
(SmoothQuant statistics of the pre-Hadamard activations say nothing about the quantized ones).
The same holds for the norm readers of a model whose QuaRot rotates them online after their norms
(Gemma3, methods/quarot.py): their scales sit before the online Q and fold into the kept norm weights.

Head rotations (BiSupConfig.head_rotation, beyond the paper): a learnable orthogonal matrix per KV
head, R_h = cayley(G_h) (G_h = 0 at the start: the base's model exactly), between v_proj and o_proj:
v_proj's rows of head h become R_h^T W_h (after the v -> o smoothing), o_proj's columns of every query
head reading it W_j R_h, and the value basis records it; o_proj's input quantizer and the V cache's
quantizer then see the rotated values. Merged: nothing at inference. Where the KV spec rotates keys
(QuaRot), the layer's Q/K rotation (the attention's rotation buffer, applied online to q and k after
RoPE; real mode's cache rotates keys on append) starts at its Hadamard and is learned the same way:
the same cost at inference as the Hadamard it replaces. Kronecker-structured (I_heads x R): d^2
parameters per head, trained with AdamW at BiSupConfig.rotation_lr.

Low-rank compensation is MERGED: delta = lowrank_scale * A @ B joins the latent weight before the
(learned-clip) quantizer, so the checkpoint format and the kernels are unchanged. A side branch
Q(W) x + A B x is what the SVD-of-the-error initialisation directly improves, but it would need an
FP16 branch in QuantLinear, the checkpoint and the accounting; merged, adding the SVD of the error
back before re-quantizing increases the weight error (measured: bench/results/bisup_first.md), so
the merged branch starts at B = lowrank_init * sqrt(S) V^T with lowrank_init = 0 (the base
method's model exactly) and learns in the error's leading left-singular subspace A = U sqrt(S).

Defaults (BiSupConfig) and how they were chosen: bench/results/bisup_first.md.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from bisup.config import BiSupConfig, QuantConfig
from bisup.methods.bisup_e2e import train_end_to_end
from bisup.methods.bisup_training import block_loss, train_block
from bisup.methods.calibration import InputStats, iterate_layers
from bisup.methods.common import BiSupBase, act_quantizer
from bisup.methods.gptq import gptq_linear, layer_plan
from bisup.methods.placement import Placement, module_device
from bisup.nn.attention import ROTATION_BUFFER, compose_value_basis, get_kv_spec, kv_rotation
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.gptq import gptq_quantize
from bisup.quant.learnable import HeadRotation, LearnableLinear, LowRank, Smoothing, smooth_init, svd_factors
from bisup.quant.quantizer import qrange

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


# ------------------------------------------------------------------------------------------------
# building the trainable block
# ------------------------------------------------------------------------------------------------
def _learnable(linear: nn.Module, config: QuantConfig, bc: BiSupConfig,
               outlier_idx: Optional[torch.Tensor]) -> LearnableLinear:
    return LearnableLinear(linear.weight, linear.bias, config.w_bits, config.w_group_size, config.w_sym,
                           config.a_bits, config.a_group_size, config.a_sym, config.w_clip, config.a_clip,
                           outlier_idx, config.atom_outlier_bits,
                           learn_weight_clip=bc.weight_clip and config.quantizes_weights,
                           learn_act_clip=bc.act_clip and config.quantizes_activations,
                           weight_clip_init=bc.weight_clip_init,
                           learn_rounding=bc.rounding and config.quantizes_weights,
                           a_convention=config.a_convention)


def _col_absmax(mods: List[LearnableLinear]) -> torch.Tensor:
    return torch.stack([m.weight.abs().amax(0) for m in mods]).amax(0)


def _gqa_expand(adapter, device) -> torch.Tensor:
    """o_proj input channel -> v_proj output channel (query head h reads kv head h // group)."""
    d, group = adapter.head_dim, adapter.num_heads // adapter.num_kv_heads
    heads = torch.arange(adapter.num_heads, device=device) // group
    return (heads[:, None] * d + torch.arange(d, device=device)[None, :]).reshape(-1)


class Block:
    """The LearnableLinears of one decoder layer (installed in it) and their shared smoothing scales."""

    def __init__(self, adapter, layer: nn.Module, config: QuantConfig, stats: Dict[str, InputStats],
                 outliers: Dict[str, torch.Tensor], transforms: Dict[str, Callable]):
        bc = config.bisup
        self.adapter, self.layer, self.config = adapter, layer, config
        self.transforms = transforms
        self.mods: Dict[str, LearnableLinear] = {  # the original linears are dropped once replaced below
            name: _learnable(adapter.get_linear(layer, name), config, bc, outliers.get(name))
            for name in adapter.linear_names()}
        self.smoothers: Dict[str, Smoothing] = {}
        self.value_rotation: Optional[HeadRotation] = None
        self.key_rotation: Optional[HeadRotation] = None
        self._key_hook = None
        for name, t in transforms.items():
            self.mods[name].transform = t
        if bc.smooth:
            self._add_smoothing(stats, bc.smooth_alpha)
        if bc.head_rotation and (config.quantizes_kv or config.quantizes_activations):
            self._add_head_rotations()
        if bc.weight_clip_search:  # after the smoothing (the clip is searched on the weight it quantizes),
            for m in self.mods.values():  # before the low-rank init (built from the error at this clip)
                m.search_weight_clip()
        if bc.lowrank and config.quantizes_weights:
            for m in self.mods.values():
                self._add_lowrank(m, bc)
        for name, m in self.mods.items():
            adapter.set_linear(layer, name, m)

    def _stat(self, stats, name) -> Optional[torch.Tensor]:
        st = stats.get(name)
        return None if st is None or st.abs_max is None else st.abs_max

    def _add_smoothing(self, stats, alpha: float) -> None:
        m, dev = self.mods, next(iter(self.mods.values())).weight.device
        for key, readers in (("attn", (Q, K, V)), ("mlp", (GATE, UP))):
            amax = self._stat(stats, readers[0])  # (not under an online transform: see up -> down)
            init = smooth_init(amax, _col_absmax([m[r] for r in readers]), alpha) \
                if amax is not None and readers[0] not in self.transforms \
                else torch.ones(m[readers[0]].in_features, device=dev)
            sm = Smoothing(init.to(dev))
            self.smoothers[key] = sm
            for r in readers:
                m[r].in_smooth, m[r].divide_input = sm, True
        # v -> o (per kv channel; o's columns expanded over the query heads of each kv head)
        expand = _gqa_expand(self.adapter, dev)
        amax = self._stat(stats, O)
        n_v = m[V].out_features
        if amax is not None:
            act = torch.zeros(n_v, device=dev).scatter_reduce(0, expand, amax.to(dev), "amax", include_self=False)
            wmax = torch.zeros(n_v, device=dev).scatter_reduce(0, expand, m[O].weight.abs().amax(0).float(), "amax",
                                                               include_self=False)
            init = smooth_init(act, torch.maximum(wmax, m[V].weight.abs().amax(1)), alpha)
        else:
            init = torch.ones(n_v, device=dev)
        sm = Smoothing(init)
        self.smoothers["vo"] = sm
        m[V].out_smooth = sm
        m[O].in_smooth, m[O].in_expand = sm, expand
        # up -> down (before the online Hadamard, when there is one: see the module docstring)
        amax = self._stat(stats, DOWN)
        if amax is not None and DOWN not in self.transforms:
            init = smooth_init(amax, torch.maximum(m[DOWN].weight.abs().amax(0), m[UP].weight.abs().amax(1)), alpha)
        else:
            init = torch.ones(m[DOWN].in_features, device=dev)
        sm = Smoothing(init.to(dev))
        self.smoothers["ud"] = sm
        m[UP].out_smooth = sm
        m[DOWN].in_smooth = sm

    def _add_head_rotations(self) -> None:
        """One learnable rotation per KV head between v_proj and o_proj (folds into both); and the
        layer's online Q/K rotation made learnable where its KV spec rotates keys. While training, a
        pre-hook puts the current Q/K matrix (with its gradient) in the attention's rotation buffer."""
        m, adapter = self.mods, self.adapter
        d, kv_heads = adapter.head_dim, adapter.num_kv_heads
        dev = m[V].weight.device
        rot = HeadRotation(torch.eye(d, device=dev).expand(kv_heads, d, d))
        self.value_rotation = rot
        m[V].out_rotation = rot
        m[O].in_rotation = rot
        m[O].in_rotation_heads = torch.arange(adapter.num_heads, device=dev) // (adapter.num_heads // kv_heads)
        attn = adapter.attention(self.layer)
        spec = get_kv_spec(attn)
        if spec is not None and spec.rotate:
            self.key_rotation = HeadRotation(kv_rotation(attn, d, dev)[None])

            def install(module, args):
                setattr(module, ROTATION_BUFFER, self.key_rotation.matrix()[0])
            self._key_hook = attn.register_forward_pre_hook(install)

    @torch.no_grad()
    def _add_lowrank(self, mod: LearnableLinear, bc: BiSupConfig) -> None:
        """A = U sqrt(S), B = lowrank_init sqrt(S) V^T of the quantization error, mapped back to the
        latent basis (the error is made in the effective basis ((W * s_in) / s_out) M: rows times M^T)."""
        w_eff, _ = mod.effective_weight()
        err = w_eff - mod.quantize_weight(w_eff)[0]
        if mod.transform is not None:
            err = mod.transform.inverse(err)
        s_in = mod.input_scale()
        if s_in is not None:
            err = err / s_in[None, :]
        if mod.out_smooth is not None:
            err = err * mod.out_smooth.scale()[:, None]
        a, b = svd_factors(err, bc.rank)
        mod.lowrank = LowRank(a / math.sqrt(bc.lowrank_scale), b * (bc.lowrank_init / math.sqrt(bc.lowrank_scale)),
                              bc.lowrank_scale)

    def param_groups(self, bc: BiSupConfig) -> List[dict]:
        main, low, rounding = [], [], []
        for m in self.mods.values():
            main += [p for p in (m.w_hi, m.w_lo, m.a_logit) if p is not None and p.requires_grad]
            if m.lowrank is not None:
                low += [m.lowrank.a, m.lowrank.b]
            if m.w_round is not None:
                rounding.append(m.w_round)
        main += [s.log_s for s in self.smoothers.values()]
        rotations = [r.generator for r in (self.value_rotation, self.key_rotation) if r is not None]
        groups = [dict(params=main, lr=bc.lr)] if main else []
        if rotations and bc.rotation_lr > 0:
            groups.append(dict(params=rotations, lr=bc.rotation_lr))
        if low and bc.lowrank_lr > 0:
            groups.append(dict(params=low, lr=bc.lowrank_lr))
        if rounding and bc.rounding_lr > 0:
            groups.append(dict(params=rounding, lr=bc.rounding_lr, name="rounding"))
        return groups

    def penalty(self, bc: BiSupConfig) -> torch.Tensor:
        pens = [s.penalty(bc.smooth_range) for s in self.smoothers.values()]
        return torch.stack(pens).sum() if pens else torch.zeros((), device=next(iter(self.mods.values())).weight.device)

    # ---------------------------------------------------------------- export
    @torch.no_grad()
    def export(self, hessians: Optional[Dict[str, InputStats]] = None) -> None:
        """Replace the LearnableLinears by ordinary FakeQuantLinears; fold the reader smoothing into the norms."""
        adapter = self.adapter
        off = adapter.norm_offset
        for key, norm in (("attn", adapter.attn_norm(self.layer)), ("mlp", adapter.mlp_norm(self.layer))):
            sm = self.smoothers.get(key)
            if sm is not None:
                w = norm.weight.detach().to(torch.float64)
                norm.weight.data = ((w + off) / sm.scale().to(torch.float64) - off).to(norm.weight.dtype)
        sm = self.smoothers.get("vo")
        if sm is not None:  # v_proj's output rows were divided by s: V[h] -> V[h] diag(1 / s[h])
            d, h = adapter.head_dim, adapter.num_kv_heads
            inv = (1.0 / sm.scale().detach().to(torch.float64)).reshape(h, d)
            compose_value_basis(adapter.attention(self.layer), torch.diag_embed(inv), h, d)
        if self.value_rotation is not None:  # then V[h] -> V[h] R_h (after the smoothing, as trained)
            compose_value_basis(adapter.attention(self.layer), self.value_rotation.matrix().detach(),
                                adapter.num_kv_heads, adapter.head_dim)
        if self.key_rotation is not None:
            self._key_hook.remove()
            setattr(adapter.attention(self.layer), ROTATION_BUFFER, self.key_rotation.matrix()[0].detach().clone())
        dtype = next(iter(self.mods.values())).weight.dtype  # the layer's compute dtype (Placement)
        for name, mod in self.mods.items():
            adapter.set_linear(self.layer, name, self._export_linear(name, mod, dtype, hessians))

    def _export_linear(self, name: str, mod: LearnableLinear, dtype, hessians) -> FakeQuantLinear:
        config = self.config
        wc, w, b, clip = mod.export()
        outlier_idx = mod.outlier_idx
        aq = act_quantizer(config.replace(a_clip=clip) if config.quantizes_activations else config,
                           outlier_idx, device=w.device)
        transform = self.transforms.get(name)
        if hessians is not None and wc is not None:  # GPTQ codes under the learned clipping
            w = mod.clamp_to_clip(w)
            shell = nn.Linear(mod.in_features, mod.out_features, bias=b is not None, device=w.device, dtype=dtype)
            shell.weight.data = w.to(dtype)
            if b is not None:
                shell.bias.data = b.to(dtype)
            fq = gptq_linear(shell, hessians[name], config.replace(w_clip=1.0, w_clip_search=False), outlier_idx)  # learned clip
            fq.act_quantizer, fq.input_transform = aq, transform
            return fq
        if wc is None:  # weights stay in floating point
            shell = nn.Linear(mod.in_features, mod.out_features, bias=b is not None, device="meta")
            fq = FakeQuantLinear(shell, config.w_bits, config.w_group_size, config.w_sym, config.w_clip, aq,
                                 transform, outlier_idx, config.atom_outlier_bits, weight=w.to(dtype))
            if b is not None:
                fq.bias = nn.Parameter(b.to(dtype), requires_grad=False)
            return fq
        return FakeQuantLinear.from_codes(wc, mod.in_features, None if b is None else b.to(dtype), aq, transform,
                                          config.w_clip, dtype)


@torch.no_grad()
def gptq_rounding_start(block: Block, inputs, chunks: List[int]) -> None:
    """Learned rounding starts at GPTQ's codes (BiSupConfig.rounding_init="gptq"): GPTQ on each linear's
    effective weight, pre-clamped to the learned clip's range, with the Hessian of the input it reads
    in this block (over `chunks`: the training ones); offset = clamp(round(w_gptq / s) - w / s, -0.5, 0.5)
    with s the learned clip's scales."""
    config = block.config
    hessians = _input_hessians(block, inputs, chunks)
    qmin, qmax = qrange(config.w_bits, config.w_sym)
    for name, m in block.mods.items():
        if m.w_round is None:
            continue
        w, _ = m.effective_weight()
        lo, hi = m.clip_bounds(w)
        main = w if m.outlier_idx is None else w[:, m._main_idx]
        plan = layer_plan(hessians[name], config, m.outlier_idx, w.device)
        res = gptq_quantize(m.clamp_to_clip(w, (lo, hi)), None, config.w_bits, config.w_group_size, sym=config.w_sym, clip=1.0,
                            damp=config.gptq_damp, act_order=config.gptq_act_order,
                            block_size=config.gptq_block_size, outlier_idx=m.outlier_idx,
                            outlier_bits=config.atom_outlier_bits, plan=plan)
        gq = res.weight.to(torch.float32)
        gq = gq if m.outlier_idx is None else gq[:, m._main_idx]
        scale = (hi - lo) / (qmax - qmin)  # per element: the learned clip's group scale
        m.w_round.copy_((torch.round(gq / scale) - main / scale).clamp(-0.5, 0.5))


def _input_hessians(block: Block, inputs, chunks: List[int]) -> Dict[str, InputStats]:
    """InputStats (Hessian) of the input every trained linear's weight multiplies, over the given chunks."""
    sums = {name: InputStats(m.in_features) for name, m in block.mods.items()}
    for name, m in block.mods.items():
        m.record = sums[name].add_hessian
    try:
        with torch.no_grad():
            for c in chunks:
                block.layer(inputs.hidden[c], **inputs.kwargs[c])
    finally:
        for m in block.mods.values():
            m.record = None
    return sums


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def apply(model: nn.Module, adapter, config: QuantConfig, calib_batches: torch.Tensor, base: BiSupBase,
          progress: bool = True, placement: Optional[Placement] = None) -> List[dict]:
    """BiSup on top of `base` (the config.method's BiSupBase), in place; returns (and stores as
    model.bisup_log) one dict per layer with its training and validation losses (then, with
    BiSupConfig.e2e_epochs, one for the end-to-end stage: bisup_e2e.py)."""
    bc = config.bisup
    if calib_batches is None:
        raise ValueError("BiSup needs calibration batches")
    n = calib_batches.shape[0]
    if bc.val_windows >= n:
        raise ValueError(f"BiSupConfig.val_windows={bc.val_windows} leaves no training window of the {n} given")
    n_chunks = -(-n // bc.batch_size)
    n_val = -(-bc.val_windows // bc.batch_size) if bc.val_windows else 0  # whole trailing batches
    if n_val >= n_chunks:
        raise ValueError(f"BiSupConfig.val_windows={bc.val_windows} with batch_size={bc.batch_size} "
                         f"leaves no training batch of the {n} calibration windows")
    train_chunks, val_chunks = list(range(n_chunks - n_val)), list(range(n_chunks - n_val, n_chunks))
    placement = placement or Placement.for_model(model)
    # the end-to-end stage runs the whole model where it lives: not when layers live off the compute device
    moved = [i for i, layer in enumerate(adapter.layers()) if placement.compute(layer) != module_device(layer)]
    e2e = bc.e2e_epochs > 0 and not moved
    if bc.e2e_epochs and moved:
        warnings.warn(f"BiSup: the end-to-end stage (e2e_epochs={bc.e2e_epochs}) is skipped: {len(moved)} decoder "
                      f"layers live off the compute device {placement.device}, and the stage needs the whole model "
                      "there; load the model onto that device to run it, or set BiSupConfig(e2e_epochs=0)")
    finish = placement.finish if e2e else None  # (mode="real") after the end-to-end stage, not per layer
    if finish is not None:
        placement = dataclasses.replace(placement, finish=None)
    transforms = base.prepare(model, adapter, config, placement) or {}
    use_gptq = base.gptq(config) and config.quantizes_weights and not bc.rounding  # learned rounding makes the codes
    kinds = tuple(sorted(set(base.stats) | ({"channel"} if bc.smooth else set())))
    model.requires_grad_(False)
    log: List[dict] = []
    final_targets: List[torch.Tensor] = []  # the last layer's full-precision outputs: the end-to-end teacher
    for index, layer, inputs in iterate_layers(model, adapter, calib_batches, progress=progress, stats=kinds,
                                               targets=True, batch_size=bc.batch_size, desc="BiSup",
                                               placement=placement):
        outliers = base.outliers(adapter, inputs.stats, config) if base.outliers is not None else {}
        block = Block(adapter, layer, config, inputs.stats, outliers, transforms)
        entry = {"layer": index}
        if val_chunks:
            entry["val_before"] = block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, val_chunks, bc.loss)
        if bc.rounding_init == "gptq" and bc.rounding and config.quantizes_weights:
            gptq_rounding_start(block, inputs, train_chunks)
        entry.update(train_block(block, inputs, bc, train_chunks, config.seed * 1000003 + index,
                                 f"BiSup layer {index}", progress))
        hessians = _input_hessians(block, inputs, train_chunks) if use_gptq else None  # (not the validation windows)
        block.export(hessians)
        if val_chunks:
            entry["val_after"] = block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, val_chunks, bc.loss)
        log.append(entry)
        if e2e and index == len(adapter.layers()) - 1:
            final_targets = [placement.hold(t) for t in inputs.targets]
        del block, hessians
    if bc.e2e_epochs and not e2e:
        log.append({"stage": "end-to-end", "skipped": f"{len(moved)} layers live off the compute device"})
    if e2e:
        log.append(train_end_to_end(adapter, calib_batches, final_targets, bc, train_chunks, val_chunks,
                                    config.seed * 1000003 - 1, progress))
        for layer in adapter.layers() if finish is not None else ():
            finish(layer)
    model.bisup_log = log
    return log
