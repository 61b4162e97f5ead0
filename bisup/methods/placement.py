"""Where quantization computes: one decoder layer at a time on a compute device, in float32.

A model stays where, and in the dtype, the user loaded it (e.g. a 70B in bf16 in CPU RAM). While a
method works on a decoder layer, `Placement.layer(layer)` moves that layer to the compute device and
casts its floating-point parameters to float32; on leaving, the (now quantized) layer goes back to
its home device and its parameters to the model's dtype. Buffers keep their dtype (rotation bases,
value bases, index tensors) and only follow the device. Calibration activations live on the compute
device, or on the CPU between layers with offload_activations=True.

    placement = Placement.for_model(model, device="cuda")
    with placement.layer(layer):
        ...  # layer on cuda, float32 parameters
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

COMPUTE_DTYPE = torch.float32
DeviceLike = Union[str, torch.device, None]


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for an empty module."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 when it has none)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@dataclass(frozen=True)
class Placement:
    """device: where layers compute (None: where each layer is, e.g. a model spread over devices by
    accelerate's device_map; nothing moves); offload_activations: keep the calibration
    activations between layers on the CPU (for a compute device with little memory); finish: called
    with each quantized layer once it is back home (quantize_model's mode="real": the layer's linears
    become QuantLinears right away, so a large model never holds every layer in fake-quant form)."""

    device: Optional[torch.device] = None
    offload_activations: bool = False
    finish: Optional[Callable[[nn.Module], None]] = None

    @classmethod
    def for_model(cls, model: nn.Module, device: DeviceLike = None, offload_activations: bool = False,
                  finish: Optional[Callable[[nn.Module], None]] = None) -> "Placement":
        """device None: each layer computes where it is (nothing moves; layers still compute in float32)."""
        dev = None if device is None else torch.device(device)
        if dev is not None and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return cls(dev, offload_activations, finish)

    def compute(self, module: nn.Module) -> torch.device:
        """Where `module` computes: self.device, else where it is."""
        return self.device if self.device is not None else module_device(module)

    @contextlib.contextmanager
    def layer(self, layer: nn.Module, finish: bool = True, cast: bool = True) -> Iterator[nn.Module]:
        """The layer on the compute device with float32 parameters (cast=False: in their own dtype); back
        home (device, dtype) on exit, then self.finish(layer) unless finish=False (or the block raised)."""
        home, main_dtype = module_device(layer), module_dtype(layer)
        dtypes = {name: p.dtype for name, p in layer.named_parameters()}  # each back to its own dtype
        try:
            layer.to(self.compute(layer))
            if cast:
                _cast_parameters(layer, COMPUTE_DTYPE)
            yield layer
        finally:
            for name, p in layer.named_parameters():  # parameters new to the layer: the layer's dtype
                dtype = dtypes.get(name, main_dtype)
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            layer.to(home)
        if finish and self.finish is not None:
            self.finish(layer)

    @staticmethod
    def to_compute(value: Any, device: torch.device) -> Any:
        """Tensors (also inside tuples, lists and dicts) on `device`, floating ones in float32."""
        return _map_tensors(value, lambda t: t.to(device, COMPUTE_DTYPE if t.is_floating_point() else t.dtype))

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """A calibration activation as held between layers: float32, on the CPU with offload_activations,
        else where it is."""
        return t.to("cpu" if self.offload_activations else t.device, COMPUTE_DTYPE)


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value
