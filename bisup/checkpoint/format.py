"""The on-disk layout of a bisup checkpoint: file names, version, tensor keys, and the JSON schema.

A checkpoint is a directory (FORMAT_VERSION 1):
  bisup_config.json  format name + version, the QuantConfig, the transformers model config, one
                     entry per quantized linear (bits, groups, packing, shapes, activation
                     quantizer, input transform), the KV quantization spec per layer, and the
                     output-rotating wrappers;
  model.safetensors  packed integer weight codes (`<linear>.qweight`: INT4 nibbles / INT3 words /
                     int8), fp16 `<linear>.scales` (+ `.zeros` when asymmetric), outlier channels
                     (`.outlier_qweight` int8, `.outlier_scales` (+ `.outlier_zeros`)), the QuaRot
                     K rotation `<attention>.bisup_kv_rotation`, the basis of the values
                     `<attention>.bisup_value_basis` (QuaRot, BiSup), and every other parameter/buffer
                     of the model as is (rotations are already folded into them);
  tokenizer files    when a tokenizer is given.
Input transforms (QuaRot's online Hadamard) and output-rotating wrappers (QuaRot on Gemma3's post
norms) are bisup modules with to_config()/from_config(), rebuilt from their JSON entry. No pickle.
Fake- and real-mode models write the same files; either loads in either mode.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

FORMAT_NAME = "bisup-quantized"
FORMAT_VERSION = 1
CONFIG_FILE = "bisup_config.json"
TENSOR_FILE = "model.safetensors"
REQUIRED_FIELDS = ("quant_config", "model_config", "linears", "kv", "dtype", "tied_embeddings")
KV_ROTATION = "bisup_kv_rotation"  # buffer name of the QuaRot K rotation on an attention module
VALUE_BASIS = "bisup_value_basis"  # buffer name of an attention module's value basis (nn/attention.py)


class FormatError(ValueError):
    """A saved model that is corrupted, of another version, or inconsistent with itself."""


def qweight_key(linear: str) -> str:
    return f"{linear}.qweight"


def linear_keys(linear: str) -> Dict[str, str]:
    """Tensor keys of a quantized linear's codes (see the module docstring)."""
    return {name: f"{linear}.{name}" for name in
            ("qweight", "scales", "zeros", "outlier_qweight", "outlier_scales", "outlier_zeros")}


def kv_rotation_key(layer_index: int) -> str:
    return f"model.layers.{layer_index}.self_attn.{KV_ROTATION}"


def value_basis_key(layer_index: int) -> str:
    return f"model.layers.{layer_index}.self_attn.{VALUE_BASIS}"


def class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def import_bisup_class(path: str, what: str):
    """The class named "module:qualname" in a saved entry; only bisup's own classes are imported."""
    module_name, _, qualname = path.partition(":")
    if not module_name.startswith("bisup."):
        raise FormatError(f"refusing to import {what} {path!r}: not a bisup class")
    try:
        return getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as err:
        raise FormatError(f"{what} {path!r} does not exist in this bisup version") from err


def transform_entry(transform) -> Optional[dict]:
    """JSON entry of an input transform / rotation module (None for none)."""
    if transform is None:
        return None
    cls = type(transform)
    if not (isinstance(transform, nn.Module) and hasattr(transform, "to_config") and hasattr(cls, "from_config")
            and cls.__module__.startswith("bisup.")):
        raise NotImplementedError(
            f"cannot save input transform {cls.__module__}.{cls.__name__}: a saved transform must be a bisup "
            "nn.Module with to_config() and a from_config() classmethod")
    return {"class": class_path(transform), "config": transform.to_config()}


def build_transform(entry: Optional[dict]):
    if entry is None:
        return None
    return import_bisup_class(entry["class"], "input transform").from_config(entry["config"])


def read_meta(path: Path) -> dict:
    """The validated JSON of the checkpoint at path."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a bisup-quantized model directory")
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise FormatError(f"{file} is corrupted (invalid JSON: {err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{file}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file}: format_version {meta.get('format_version')!r} is not supported "
                          f"(this bisup reads version {FORMAT_VERSION})")
    for key in REQUIRED_FIELDS:
        if key not in meta:
            raise FormatError(f"{file}: missing field {key!r}")
    return meta


def take(tensors: Dict[str, torch.Tensor], key: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """Remove and return tensors[key], checking its shape and dtype."""
    if key not in tensors:
        raise FormatError(f"{TENSOR_FILE}: missing tensor {key!r}")
    t = tensors.pop(key)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise FormatError(f"{TENSOR_FILE}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t
