"""Plain torch hooks the measurements are made of, and the per-token statistics they record.

Everything works on one window (batch 1) at a time; captured tensors are detached and live only
until the window is done.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bisup.quant.quantizer import fake_quantize

TINY = 1e-30


# ------------------------------------------------------------------------------------------------
# statistics (per token, over the channel dim)
# ------------------------------------------------------------------------------------------------
def token_rel_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_t - b_t|| / ||b_t|| for every token t of [1, T, C] (or [T, C]) tensors -> float64 [T]."""
    a = a.detach().reshape(-1, a.shape[-1]).double()
    b = b.detach().reshape(-1, b.shape[-1]).double().to(a.device)
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(TINY)).cpu()


def token_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis (3 for a Gaussian) of each token's channel values -> float64 [T]."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    c = x - x.mean(dim=-1, keepdim=True)
    var = c.pow(2).mean(dim=-1)
    return (c.pow(4).mean(dim=-1) / var.pow(2).clamp_min(TINY)).cpu()


def token_max_to_mean(x: torch.Tensor) -> torch.Tensor:
    """max_c |x_tc| / mean_c |x_tc| per token -> float64 [T]."""
    x = x.detach().reshape(-1, x.shape[-1]).double().abs()
    return (x.amax(dim=-1) / x.mean(dim=-1).clamp_min(TINY)).cpu()


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of token t+1 given positions <= t, for t = 0..T-2 -> float64 [T-1]."""
    lp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return (-lp.gather(-1, ids[0, 1:, None].to(lp.device))[:, 0]).cpu()


class Mean:
    """Running mean of equally shaped float64 arrays (NaN entries are skipped per element)."""

    def __init__(self):
        self.sum: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        ok = ~torch.isnan(x)
        if self.sum is None:
            self.sum, self.count = torch.zeros_like(x), torch.zeros_like(x)
        self.sum += torch.where(ok, x, torch.zeros_like(x))
        self.count += ok.double()

    def value(self) -> torch.Tensor:
        return torch.where(self.count > 0, self.sum / self.count.clamp_min(1), torch.full_like(self.sum, float("nan")))


# ------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------
def hidden_of(output):
    """A decoder layer's hidden-state output (transformers returns a tensor or a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, new):
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


class LayerCapture:
    """inputs[l] / outputs[l]: the residual stream entering / leaving decoder layer l in the last call.

    replace: inputs to feed instead (replace[l] replaces layer l's input), which runs every layer on
    given inputs in one forward pass (the local-error measurement).
    """

    def __init__(self, layers: Sequence[nn.Module], replace: Optional[Sequence[torch.Tensor]] = None):
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(layers)
        self.outputs: List[Optional[torch.Tensor]] = [None] * len(layers)
        self.calls = 0
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i, replace), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, i: int, replace):
        def hook(module, args, kwargs):
            h = _hidden_arg(args, kwargs)
            if i == 0:
                self.calls += 1
            if replace is not None:
                new = replace[i].to(device=h.device, dtype=h.dtype)
                if new.shape != h.shape:
                    raise ValueError(f"layer {i}: replacement input {tuple(new.shape)} for {tuple(h.shape)}")
                self.inputs[i] = new
                return _with_hidden(args, kwargs, new)
            self.inputs[i] = h.detach()
            return None
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = hidden_of(output).detach()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def capture_layers(layers: Sequence[nn.Module], replace: Optional[Sequence[torch.Tensor]] = None):
    cap = LayerCapture(layers, replace)
    try:
        yield cap
    finally:
        cap.remove()


@contextmanager
def record_outputs(modules: Dict[str, nn.Module]):
    """{key: [every output of modules[key], in call order]} while inside the block."""
    got: Dict[str, List[torch.Tensor]] = {k: [] for k in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, k=k: got[k].append(hidden_of(out).detach()))
               for k, m in modules.items()]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


@contextmanager
def linear_hooks(pairs: Sequence[Tuple[str, nn.Module]], fn: Callable):
    """fn(key, input, output) after every call of each (key, linear)."""
    handles = [m.register_forward_hook(lambda mod, args, out, k=k: fn(k, args[0], out)) for k, m in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def quantize_heads(x: torch.Tensor, head_dim: int, bits: int) -> torch.Tensor:
    """Asymmetric per-head quantization along head_dim (fp16 scales) of [..., heads * head_dim]."""
    shape = x.shape
    q = fake_quantize(x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim), bits, -1, sym=False,
                      scale_dtype=torch.float16)
    return q.reshape(shape)


@contextmanager
def inject_kv_error(adapter, position: int, bits: int):
    """Quantize the K and V projections of token `position` only (every layer; everything else FP)."""
    def hook(module, args, out):
        out = out.clone()
        out[:, position] = quantize_heads(out[:, position], adapter.head_dim, bits)
        return out

    handles = []
    for layer in adapter.layers():
        for proj in (adapter.k_proj(layer), adapter.v_proj(layer)):
            handles.append(proj.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# what a quantized linear really quantizes
# ------------------------------------------------------------------------------------------------
def quantizer_input(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The part of x that `linear` quantizes to low bits: after its input transform (QuaRot's online
    Hadamard, `input_transform`), without its high-precision outlier channels (Atom, `outlier_idx`).
    Linears without these attributes quantize x as it is."""
    transform = getattr(linear, "input_transform", None)
    if callable(transform):
        x = transform(x)
    idx = getattr(linear, "outlier_idx", None)
    if idx is None:
        idx = getattr(getattr(linear, "linear", None), "outlier_idx", None)
    if isinstance(idx, torch.Tensor) and idx.numel():
        keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        keep[idx.to(x.device)] = False
        x = x[..., keep]
    return x
