"""BiSup's end-to-end stage (BiSupConfig.e2e_epochs > 0), after the block-wise training: every quantized
linear keeps its integer codes; its weight group scales and its activation clip ratio (when
BiSupConfig.act_clip is on and the activations use bisup's own quantizer) are trained
together, over the whole model, so that the quantized model's next-token distribution matches the
full-precision model's (KL divergence, mean over tokens) on the calibration windows. The block loss
sees one layer's output; this loss sees what the perplexity sees, and lets a layer's scales make
up for error that earlier layers left (EfficientQAT's end-to-end step-size training, with the
full-precision model's distribution as the teacher instead of the labels).

The teacher needs no second model: block-wise training already computes the full-precision outputs
of the last decoder layer (its targets); final_norm + lm_head of the (unquantized) head turn them into
the teacher's logits. What it changes is what every quantized linear already stores - fp16 scales
and a clip ratio - so the checkpoint, the kernels and mode="real" are unchanged (the scales are
rounded to fp16 in every training forward: the trained model is the exported one).

Costs: one forward and backward of the whole model per calibration batch (decoder layers recomputed
in the backward pass: one layer's activations at a time), plus the last layer's full-precision
outputs kept from the block-wise pass. It runs where the model lives: methods/bisup.py skips it, with
a warning, when the layers live off the compute device (a model streamed layer by layer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bisup.config import BiSupConfig
from bisup.methods.bisup_training import run_epochs
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.formats import BISUP_ACTS
from bisup.quant.learnable import fp16_ste


class ScaleTunedLinear(nn.Module):
    """A FakeQuantLinear's forward with trainable scales: s = s0 * exp(t) (t = 0 at the start: the
    exported model exactly, up to the float path's rounding), clip = min(1, clip0 * exp(t_clip))."""

    def __init__(self, fq: FakeQuantLinear, learn_act_clip: bool = True):
        super().__init__()
        self.fq = fq
        self.codes = fq.weight_codes()
        self.log_scale = nn.Parameter(torch.zeros_like(self.codes.scales, dtype=torch.float32))
        out = self.codes.outlier_scales if self.codes.has_outliers else None
        self.log_outlier_scale = None if out is None else nn.Parameter(torch.zeros_like(out, dtype=torch.float32))
        aq = fq.act_quantizer  # an engine's activation quantizer (compressed-tensors) is unclipped: not trained
        trains_clip = learn_act_clip and aq is not None and aq.enabled and aq.convention == BISUP_ACTS
        self.clip0 = float(aq.clip) if trains_clip else None
        self.log_clip = None if self.clip0 is None else nn.Parameter(torch.zeros((), device=self.log_scale.device))

    def _scales(self):
        s = fp16_ste(self.codes.scales.float() * self.log_scale.exp())
        if self.log_outlier_scale is None:
            return s, None
        return s, fp16_ste(self.codes.outlier_scales.float() * self.log_outlier_scale.exp())

    def clip(self) -> torch.Tensor:
        return (self.clip0 * self.log_clip.exp()).clamp(max=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.fq
        if fq.input_transform is not None:
            x = fq.input_transform(x)
        if self.log_clip is not None:
            fq.act_quantizer.clip = self.clip()
        if fq.act_quantizer is not None:
            x = fq.act_quantizer(x)
        s, s_out = self._scales()
        w = dataclasses.replace(self.codes, scales=s, outlier_scales=s_out).dequantize(fq.in_features, torch.float32)
        return F.linear(x, w.to(x.dtype), fq.bias)

    @torch.no_grad()
    def export(self) -> FakeQuantLinear:
        """The FakeQuantLinear with the trained fp16 scales and clip (codes unchanged)."""
        fq = self.fq
        s, s_out = self._scales()
        codes = dataclasses.replace(self.codes, scales=s.to(self.codes.scales.dtype),
                                    outlier_scales=None if s_out is None else s_out.to(self.codes.outlier_scales.dtype))
        if self.log_clip is not None:
            fq.act_quantizer.clip = float(self.clip())
        return FakeQuantLinear.from_codes(codes, fq.in_features, fq.bias, fq.act_quantizer, fq.input_transform,
                                          fq.w_clip, fq.weight.dtype)


def distribution_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, mean over tokens (float32)."""
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), -1)
    s = F.log_softmax(student_logits.float().flatten(0, -2), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@contextlib.contextmanager
def recomputed_layers(layers):
    """While inside, each decoder layer's forward keeps only its inputs for the backward pass and runs
    again there (activation checkpointing): the whole model's backward then holds one layer's
    activations at a time, not every layer's (SmolLM2, 2 x 512 tokens: ~8 GB less), for ~1/3 more
    compute."""
    own = [vars(layer).get("forward") for layer in layers]  # an instance forward (e.g. accelerate's hook)
    for layer in layers:
        layer.forward = lambda *args, _f=layer.forward, **kwargs: checkpoint(_f, *args, use_reentrant=False, **kwargs)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward


def train_end_to_end(adapter, calib_batches: torch.Tensor, final_targets: List[torch.Tensor],
                     bc: BiSupConfig, train_chunks: List[int], val_chunks: List[int], seed: int,
                     progress: bool = True) -> dict:
    """The end-to-end stage, in place (module docstring). final_targets[c]: the full-precision outputs of
    the last decoder layer on calibration chunk c (batches of bc.batch_size windows). Returns the first
    and last epoch's mean KL, and the mean KL on the validation chunks before and after."""
    head, norm = adapter.lm_head(), adapter.final_norm()
    device = adapter.embeddings().weight.device

    def kl(c: int) -> torch.Tensor:
        ids = calib_batches[c * bc.batch_size:(c + 1) * bc.batch_size].to(device)
        with torch.no_grad():
            teacher = head(norm(final_targets[c].to(device, head.weight.dtype)))
        return distribution_loss(head(adapter.decoder(input_ids=ids, use_cache=False).last_hidden_state), teacher)

    def val_kl() -> float:  # on the exported model (FakeQuantLinears: the kernels' arithmetic)
        with torch.no_grad():
            return sum(kl(c).item() for c in val_chunks) / len(val_chunks)

    log = {"stage": "end-to-end", "e2e_kl_first_epoch": float("nan"), "e2e_kl_last_epoch": float("nan")}
    if val_chunks:
        log["e2e_val_kl_before"] = val_kl()
    tuned: List[tuple] = []
    for layer in adapter.layers():
        for name in adapter.linear_names():
            fq = adapter.get_linear(layer, name)
            if isinstance(fq, FakeQuantLinear) and fq.quantized:
                st = ScaleTunedLinear(fq, learn_act_clip=bc.act_clip)
                adapter.set_linear(layer, name, st)
                tuned.append((layer, name, st))
    params = [p for _, _, st in tuned for p in (st.log_scale, st.log_outlier_scale, st.log_clip) if p is not None]
    if not params:  # nothing quantized to tune (e.g. W16 with KV quantization only)
        return log
    opt = torch.optim.AdamW(params, lr=bc.e2e_lr, weight_decay=0.0)

    def step(c: int) -> float:
        loss = kl(c)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    try:
        with torch.enable_grad(), recomputed_layers(adapter.layers()):
            log["e2e_kl_first_epoch"], log["e2e_kl_last_epoch"] = run_epochs(
                step, train_chunks, bc.e2e_epochs, seed, "BiSup end-to-end", progress, name="kl")
    finally:
        for layer, name, st in tuned:
            adapter.set_linear(layer, name, st.export())
    if val_chunks:
        log["e2e_val_kl_after"] = val_kl()
    if not math.isfinite(log["e2e_kl_last_epoch"]):
        raise FloatingPointError(f"BiSup end-to-end: the KL became {log['e2e_kl_last_epoch']} (lower e2e_lr)")
    return log
