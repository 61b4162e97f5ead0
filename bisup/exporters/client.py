"""Load a compressed-tensors export the way an engine's reference client does: transformers +
the `compressed-tensors` package (an implementation bisup did not write), to check bisup's export
against it (tests, bench/export_ct.py).

transformers applies the quantization config (packed weights, dynamic activation quantization)
but not the `transform_config`; compressed-tensors' own `apply_transform_config` installs the
online transforms, whose matrices are then read from the checkpoint (compressed-tensors would
otherwise make its own random ones).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open


def load_compressed_tensors(path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """The causal LM at `path` (an export) as transformers + compressed-tensors run it, in eval mode."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise ImportError("loading a compressed-tensors export needs `pip install compressed-tensors`") from err
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the transform matrices are "unexpected keys" until installed below
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(verbosity)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    if qc.get("transform_config"):
        config = TransformConfig.model_validate(qc["transform_config"])
        apply_transform_config(model, config)
        params = dict(model.named_parameters(remove_duplicate=False))
        # compressed-tensors names each installed transform "<linear>.<scheme>_<location>"
        suffixes = tuple(f".{scheme}_{args.location}.weight" for scheme, tf in config.config_groups.items()
                         for args in tf.apply)
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            keys = [k for k in f.keys() if k.endswith(suffixes)]
            installed = [k for k in params if k.endswith(suffixes)]
            if sorted(keys) != sorted(installed):
                raise KeyError(f"{path}: the checkpoint's transform tensors {sorted(set(keys) ^ set(installed))[:4]} "
                               "do not match the transforms compressed-tensors installed")
            with torch.no_grad():
                for key in keys:
                    params[key].copy_(f.get_tensor(key))
    return model.eval()
