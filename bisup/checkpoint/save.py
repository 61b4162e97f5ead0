"""save_quantized: a bisup-quantized model -> a checkpoint directory (layout: format.py)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from bisup.checkpoint.format import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, TENSOR_FILE, class_path, linear_keys,
                                     transform_entry)
from bisup.config import QuantConfig
from bisup.models.adapters import get_adapter
from bisup.nn import get_kv_spec
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.codes import pack_codes


def _linear_entry(fq: FakeQuantLinear, tensors: Dict[str, torch.Tensor], name: str) -> dict:
    entry = dict(in_features=fq.in_features, out_features=fq.out_features, bias=fq.bias is not None,
                 w_bits=fq.w_bits, w_group_size=fq.w_group_size, w_sym=fq.w_sym, w_clip=float(fq.w_clip),
                 outlier_bits=fq.outlier_bits, n_outliers=int(fq.outlier_idx.numel()),
                 act_quantizer=None if fq.act_quantizer is None else fq.act_quantizer.to_config(),
                 input_transform=transform_entry(fq.input_transform), quantized=fq.quantized)
    if not fq.quantized:
        return entry
    wc = fq.weight_codes()
    keys = linear_keys(name)
    entry.update(packing=wc.packing, main_features=wc.codes.shape[1], n_groups=int(wc.scales.shape[1]))
    stored = dict(qweight=pack_codes(wc.codes, wc.packing, wc.sym), scales=wc.scales, zeros=wc.zeros)
    if wc.has_outliers:
        stored.update(outlier_qweight=pack_codes(wc.outlier_codes, "int8", wc.sym), outlier_scales=wc.outlier_scales,
                      outlier_zeros=wc.outlier_zeros)
    tensors.update({keys[k]: t.cpu() for k, t in stored.items() if t is not None})
    return entry


def fake_form(module: nn.Module, name: str, dtype: torch.dtype, config: QuantConfig) -> Optional[FakeQuantLinear]:
    """The FakeQuantLinear form of a quantized decoder linear (None for a plain nn.Linear)."""
    from bisup.nn.real_linear import is_real, real_to_fake

    if isinstance(module, FakeQuantLinear):
        return module
    if is_real(module):
        return real_to_fake(module, dtype, config.w_clip)
    if isinstance(module, nn.Linear):
        return None
    raise NotImplementedError(f"{name}: a {type(module).__name__} is not a linear bisup knows how to write")


def output_wrappers(model: nn.Module) -> Dict[str, nn.Module]:
    """bisup modules that wrap an original module and rotate its output online (QuaRot's RotateAfter on
    Gemma3's post norms): {path: module}."""
    return {path: module for path, module in model.named_modules()
            if type(module).__module__.startswith("bisup.") and isinstance(getattr(module, "inner", None), nn.Module)
            and hasattr(module, "rotation")}


def _wrapper_entries(model: nn.Module) -> Dict[str, dict]:
    """{path: {"class", "rotation"}} of output_wrappers; the wrapped module's tensors are in the state dict."""
    return {path: {"class": class_path(module), "rotation": transform_entry(module.rotation)}
            for path, module in output_wrappers(model).items()}


def atomic_write_dir(path: Path, write) -> None:
    """Run write(tmp_dir), then move tmp_dir to path (replacing an existing directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(model: nn.Module, path: Union[str, Path], tokenizer=None) -> Path:
    """Save a bisup-quantized model (packed integer weights + scales, safetensors + JSON) to directory `path`."""
    config: Optional[QuantConfig] = getattr(model, "bisup_config", None)
    if config is None:
        raise ValueError("save_quantized: the model was not quantized by bisup.quantize_model")
    adapter = get_adapter(model)
    dtype = adapter.embeddings().weight.dtype
    tensors: Dict[str, torch.Tensor] = {}
    linears: Dict[str, dict] = {}
    skip = set()
    state = model.state_dict()
    for name, module in adapter.named_linears():
        fq = fake_form(module, name, dtype, config)
        if fq is None:
            continue  # left in floating point: saved with the state dict
        linears[name] = _linear_entry(fq, tensors, name)
        # the linear's tensors in the fake-mode layout, whichever mode it runs in
        skip.update(k for k in state if k.startswith(name + "."))
        for key, value in fq.state_dict(prefix=name + ".").items():
            if not (fq.quantized and key == f"{name}.weight"):
                tensors[key] = value.detach().cpu().contiguous()
    tied = adapter.tied_embeddings
    if tied:
        skip.add("lm_head.weight")
    tensors.update({k: v.detach().cpu().contiguous() for k, v in state.items() if k not in skip})
    kv = {str(i): spec.to_dict() for i, layer in enumerate(adapter.layers())
          if (spec := get_kv_spec(adapter.attention(layer))) is not None}
    model_config = model.config.to_dict()
    model_config["tie_word_embeddings"] = tied
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quant_config": config.to_dict(),
        "model_type": model.config.model_type,
        "model_config": model_config,
        "dtype": str(dtype).replace("torch.", ""),
        "tied_embeddings": tied,
        "linears": linears,
        "kv": kv,
        "wrappers": _wrapper_entries(model),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(meta, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    path = Path(path)
    atomic_write_dir(path, write)
    return path
