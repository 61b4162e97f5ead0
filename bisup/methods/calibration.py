"""Block-by-block calibration: run the decoder one layer at a time over the calibration set.

Memory stays bounded by one layer's activations: the hidden states entering the current layer
(and those leaving it), never the whole model's. Usage:

    for index, layer, inputs in iterate_layers(model, adapter, calib_batches, stats=("hessian",)):
        h = inputs.stats["self_attn.q_proj"].hessian()      # collected with forward hooks
        ... replace the layer's linears ...                    # before asking for the next layer

How layer inputs are captured: every decoder layer's `forward` is swapped (on the instance, for
one model call) for a stub that records its arguments and returns the hidden states unchanged,
and a pre-hook on the final norm stops the call. So the embedding output (incl. any embedding
scale) and exactly the kwargs the installed transformers passes each layer (position_embeddings
from the model's rotary module, the attention mask, position_ids, per-layer-type masks and
rotary tables for Gemma3's sliding/global layers) are recorded without running any layer, and
without depending on the transformers version's argument names.

sequential=True (GPTQ's default): the layer's output passed on is computed AFTER the caller has
quantized the layer, so later layers calibrate on the inputs they will really see. False: the
full-precision output is passed on (statistics from unquantized inputs).

targets=True also hands out the FULL-PRECISION model's output of every layer (inputs.targets: the
unquantized model run end to end, without KV quantization either: what block-wise fine-tuning
regresses onto). It is a second stream carried beside the calibration one: each layer runs once more,
before the caller changes it, on the full-precision stream. Only the current layer's inputs and
outputs of both streams are held.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from bisup.generation import full_precision
from bisup.methods.placement import Placement

STATS = ("hessian", "channel")


class _StopForward(Exception):
    """Raised by the final-norm pre-hook: everything the layers need has been recorded."""


@dataclass
class InputStats:
    """Statistics of one linear's input over all calibration tokens.

    hessian_sum: sum_t x_t x_t^T [K, K] in float32 (when "hessian" is collected); abs_max, sq_sum: [K] per
    input channel (when "channel" is collected); tokens: number of tokens seen.
    """

    in_features: int
    hessian_sum: Optional[torch.Tensor] = None
    abs_max: Optional[torch.Tensor] = None
    sq_sum: Optional[torch.Tensor] = None
    tokens: int = 0

    def add_hessian(self, x: torch.Tensor) -> None:
        """Accumulate x^T x of tokens x [..., K] into hessian_sum, in float32 (a 70B down_proj's
        K = 28672 Hessian is 3.3 GB so, 6.6 GB in float64), and count them."""
        xf = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.tokens += xf.shape[0]
        if self.hessian_sum is None:
            self.hessian_sum = xf.T @ xf
        else:
            self.hessian_sum.addmm_(xf.T, xf)

    def hessian(self) -> torch.Tensor:
        """Mean X^T X over tokens, float32 [K, K] (GPTQ is invariant to the scale)."""
        if self.hessian_sum is None:
            raise RuntimeError("Hessian was not collected: pass stats=('hessian', ...) to iterate_layers")
        return self.hessian_sum.to(torch.float32) / max(self.tokens, 1)

    def mean_square(self) -> torch.Tensor:
        """Per-channel mean of x^2 over tokens, float32 [K]."""
        if self.sq_sum is None:
            raise RuntimeError("channel statistics were not collected: pass stats=('channel', ...)")
        return (self.sq_sum / max(self.tokens, 1)).to(torch.float32)


@dataclass
class LayerInputs:
    """Calibration inputs of one decoder layer, in chunks of the calibration batch.

    hidden[c]: hidden states [b, seq, hidden] entering the layer; kwargs[c]: everything else the
    model passed this layer for chunk c; stats: linear name -> InputStats (for the linears asked);
    targets[c]: the full-precision model's output of this layer (only with targets=True).
    """

    hidden: List[torch.Tensor]
    kwargs: List[Dict[str, Any]]
    stats: Dict[str, InputStats] = field(default_factory=dict)  # q/k/v (and gate/up) share one object
    targets: Optional[List[torch.Tensor]] = None

    def run(self, layer: nn.Module) -> List[torch.Tensor]:
        """The layer's outputs on every chunk."""
        return [_layer_output(layer(h, **kw)) for h, kw in zip(self.hidden, self.kwargs)]


@dataclass
class CapturedInputs:
    """hidden: chunks entering layer 0; layer_kwargs[i][c]: kwargs of layer i for chunk c."""

    hidden: List[torch.Tensor]
    layer_kwargs: List[List[Dict[str, Any]]]


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _chunks(calib_batches: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    if calib_batches.dim() != 2 or calib_batches.dtype != torch.long:
        raise ValueError(f"calib_batches must be a LongTensor [n, seq_len], got {calib_batches.dtype} {tuple(calib_batches.shape)}")
    if calib_batches.shape[0] == 0:
        raise ValueError("calib_batches is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(calib_batches.split(batch_size))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter, calib_batches: torch.Tensor, batch_size: int = 8,
                         placement: Optional[Placement] = None) -> CapturedInputs:
    """Hidden states entering layer 0 (held as placement.hold says) and the kwargs every layer gets
    (as the model made them), per chunk of `batch_size`."""
    placement = placement or Placement.for_model(model)
    layers = adapter.layers()
    device = _model_device(model)
    hidden: List[torch.Tensor] = []
    layer_kwargs: List[List[Dict[str, Any]]] = [[] for _ in layers]

    def make_stub(i: int):
        def stub(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            if args[1:]:
                raise RuntimeError(f"decoder layer {i} got unexpected positional arguments; calibration replays keywords only")
            if i == 0:
                hidden.append(placement.hold(h))
            layer_kwargs[i].append(kwargs)
            return h
        return stub

    def stop(module, args):
        raise _StopForward

    was_training = model.training
    model.eval()
    saved = [layer.__dict__.get("forward") for layer in layers]  # e.g. another tool's patch
    for i, layer in enumerate(layers):
        layer.forward = make_stub(i)
    handle = adapter.final_norm().register_forward_pre_hook(stop)
    try:
        for ids in _chunks(calib_batches, batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = fwd
        model.train(was_training)
    if any(len(kw) != len(hidden) for kw in layer_kwargs):
        raise RuntimeError("not every decoder layer was reached while capturing calibration inputs")
    return CapturedInputs(hidden, layer_kwargs)


class _StatsHooks:
    """Forward pre-hooks accumulating InputStats of the named linears of one layer.

    Linears fed the very same tensor (q/k/v, gate/up) share one InputStats object, computed once
    per chunk and stored once: one K x K Hessian per distinct input, not per linear.
    """

    def __init__(self, adapter, layer: nn.Module, names: Sequence[str], kinds: Sequence[str],
                 transforms: Optional[Dict[str, Callable]] = None):
        self.kinds = set(kinds)
        self.transforms = transforms or {}
        self.handles = []
        self._stats: Dict[str, InputStats] = {}
        self._owner: Dict[str, str] = {}  # linear -> linear whose stats it shares (itself if none)
        self._seen: Dict[int, Tuple[torch.Tensor, str]] = {}  # this chunk: id(input) -> (input, first reader)
        for name in names:
            linear = adapter.get_linear(layer, name)
            self._stats[name] = InputStats(linear.in_features)
            self.handles.append(linear.register_forward_pre_hook(self._hook(name)))

    @property
    def stats(self) -> Dict[str, InputStats]:
        return {name: self._stats[self._owner.get(name, name)] for name in self._stats}

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            prev = self._seen.get(id(x))
            owner = prev[1] if prev is not None and prev[0] is x else name
            if self._owner.setdefault(name, owner) != owner:
                raise RuntimeError(f"{name}: its input was shared with {self._owner[name]} in one chunk but not in another")
            if owner != name:
                return  # this input was already accumulated, by its first reader
            self._seen[id(x)] = (x, name)
            t = self.transforms.get(name)
            self._accumulate(self._stats[name], x if t is None else t(x))
        return hook

    def _accumulate(self, st: InputStats, x: torch.Tensor) -> None:
        xf = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if "hessian" in self.kinds:
            st.add_hessian(xf)
        else:
            st.tokens += xf.shape[0]
        if "channel" in self.kinds:
            amax = xf.abs().amax(dim=0)
            sq = xf.square().sum(dim=0, dtype=torch.float64)
            st.abs_max = amax if st.abs_max is None else torch.maximum(st.abs_max, amax)
            st.sq_sum = sq if st.sq_sum is None else st.sq_sum.add_(sq)

    def end_chunk(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._seen.clear()


@torch.no_grad()
def iterate_layers(
    model: nn.Module,
    adapter,
    calib_batches: torch.Tensor,
    progress: bool = True,
    stats: Iterable[str] = ("hessian",),
    linear_names: Optional[Sequence[str]] = None,
    sequential: bool = True,
    batch_size: int = 8,
    desc: str = "calibrating",
    targets: bool = False,
    placement: Optional[Placement] = None,
    stat_transforms: Optional[Dict[str, Callable]] = None,
) -> Iterator[Tuple[int, nn.Module, LayerInputs]]:
    """Yield (index, layer, inputs) for every decoder layer, in order.

    Before a layer is yielded it has been run once over the calibration set with hooks on its
    linears (`linear_names`, default all of adapter.linear_names()), filling inputs.stats with
    the statistics in `stats` ("hessian": X^T X; "channel": per-channel abs-max and mean square).
    The caller may replace the layer's modules in place before asking for the next layer; with
    sequential=True the next layer's inputs are this (now modified) layer's outputs. targets=True:
    inputs.targets holds the full-precision model's outputs of the layer (see the module docstring).
    stat_transforms {linear name: x -> x M}: statistics of that linear's input are taken of x M (the
    input the weight will read once an online transform is installed; QuaRot's Hadamard before
    down_proj), cheaper than transforming a K x K Hessian afterwards.

    placement (default: each layer where it is): while yielded, the layer sits on placement.compute(layer)
    with float32 parameters, and inputs (hidden, kwargs, targets) are float32 tensors there; when the
    caller asks for the next layer, this one goes back to its device and dtype (Placement.layer).
    """
    kinds = tuple(stats)
    bad = [k for k in kinds if k not in STATS]
    if bad:
        raise ValueError(f"unknown statistics {bad}; expected some of {list(STATS)}")
    placement = placement or Placement.for_model(model)
    names = list(adapter.linear_names() if linear_names is None else linear_names)
    captured = capture_layer_inputs(model, adapter, calib_batches, batch_size, placement)
    hidden, layer_kwargs = captured.hidden, captured.layer_kwargs
    fp_hidden = hidden if targets else None  # the full-precision stream
    del captured  # only `hidden` (and fp_hidden) may hold activations
    was_training = model.training
    model.eval()
    try:
        layers = adapter.layers()
        for index in tqdm(range(len(layers)), desc=desc, disable=not progress):
            with placement.layer(layers[index]) as layer:
                dev = placement.compute(layer)
                kwargs = [placement.to_compute(kw, dev) for kw in layer_kwargs[index]]
                inputs = LayerInputs([placement.to_compute(h, dev) for h in hidden], kwargs)
                del hidden
                if fp_hidden is not None:  # before the hooks: statistics come from the quantized stream only
                    with full_precision(layer):  # no KV quantization either
                        fp_in = LayerInputs([placement.to_compute(h, dev) for h in fp_hidden], kwargs)
                        inputs.targets = fp_in.run(layer)
                    del fp_in, fp_hidden
                hooks = _StatsHooks(adapter, layer, names, kinds, stat_transforms)
                try:
                    outputs = []
                    for h, kw in zip(inputs.hidden, inputs.kwargs):
                        out = _layer_output(layer(h, **kw))
                        hooks.end_chunk()
                        if not sequential:
                            outputs.append(placement.hold(out))
                        del out
                finally:
                    hooks.remove()
                inputs.stats = hooks.stats
                yield index, layer, inputs
                if sequential:
                    outputs = [placement.hold(o) for o in inputs.run(layer)]
                if targets:
                    fp_hidden = [placement.hold(t) for t in inputs.targets]
                layer_kwargs[index] = []  # this layer's kwargs are no longer needed
                hidden = outputs
                del inputs, kwargs
    finally:
        model.train(was_training)
