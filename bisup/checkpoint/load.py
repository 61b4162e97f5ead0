"""load_quantized: a checkpoint directory (layout: format.py) -> a model in fake or real mode."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from bisup.checkpoint.format import (CONFIG_FILE, KV_ROTATION, TENSOR_FILE, VALUE_BASIS, FormatError, build_transform,
                                     import_bisup_class, kv_rotation_key, linear_keys, read_meta, take,
                                     value_basis_key)
from bisup.config import QuantConfig
from bisup.models.adapters import get_adapter
from bisup.nn import KVQuantSpec, set_kv_quant, set_kv_rotation
from bisup.nn.attention import set_value_basis
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear
from bisup.quant.codes import WeightCodes, unpack_codes
from bisup.quant.formats import SCALE_DTYPE, packed_row_bytes


def _load_codes(entry: dict, name: str, tensors, outlier_idx: Optional[torch.Tensor]) -> WeightCodes:
    n, k, n_out = entry["out_features"], entry["in_features"], entry["n_outliers"]
    km, groups, packing, sym = entry["main_features"], entry["n_groups"], entry["packing"], entry["w_sym"]
    if km != k - n_out:
        raise FormatError(f"{name}: main_features {km} != in_features {k} - outliers {n_out}")
    keys = linear_keys(name)
    try:
        row_bytes = packed_row_bytes(packing, km)
    except ValueError as err:
        raise FormatError(f"{name}: {err}") from err
    packed = take(tensors, keys["qweight"], (n, row_bytes), torch.int8 if packing == "int8" else torch.uint8)
    wc = WeightCodes(entry["w_bits"], entry["w_group_size"], sym, unpack_codes(packed, packing, sym),
                     take(tensors, keys["scales"], (n, groups), SCALE_DTYPE),
                     None if sym else take(tensors, keys["zeros"], (n, groups), SCALE_DTYPE))
    if n_out:
        wc.with_outliers(outlier_idx, entry["outlier_bits"],
                         unpack_codes(take(tensors, keys["outlier_qweight"], (n, n_out), torch.int8), "int8", sym),
                         take(tensors, keys["outlier_scales"], (n, 1), SCALE_DTYPE),
                         None if sym else take(tensors, keys["outlier_zeros"], (n, 1), SCALE_DTYPE))
    return wc


def _load_linear(entry: dict, linear: nn.Linear, name: str, tensors, dtype) -> FakeQuantLinear:
    n, k = entry["out_features"], entry["in_features"]
    if (linear.out_features, linear.in_features) != (n, k):
        raise FormatError(f"{name}: saved shape {(n, k)} does not match the model's {(linear.out_features, linear.in_features)}")
    aq = None if entry["act_quantizer"] is None else ActQuantizer(**entry["act_quantizer"], device="cpu")
    transform = build_transform(entry["input_transform"])
    n_out = entry["n_outliers"]
    outlier_idx = take(tensors, f"{name}.outlier_idx", (n_out,), torch.long) if n_out else None
    if aq is not None and f"{name}.act_quantizer.outlier_idx" in tensors:
        aq.outlier_idx = tensors.pop(f"{name}.act_quantizer.outlier_idx")
    if transform is not None:
        prefix = f"{name}.input_transform."
        transform.load_state_dict({key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)})
    bias = take(tensors, f"{name}.bias", (n,), dtype) if entry["bias"] else None
    if entry["quantized"]:
        return FakeQuantLinear.from_codes(_load_codes(entry, name, tensors, outlier_idx), k, bias, aq, transform,
                                          entry["w_clip"], dtype)
    shell = nn.Linear(k, n, bias=bias is not None, device="meta")
    fq = FakeQuantLinear(shell, entry["w_bits"], entry["w_group_size"], entry["w_sym"], entry["w_clip"], aq,
                         transform, outlier_idx, entry["outlier_bits"], weight=take(tensors, f"{name}.weight", (n, k), dtype))
    if bias is not None:
        fq.bias = nn.Parameter(bias, requires_grad=False)
    return fq


def _load_wrappers(model: nn.Module, wrappers: Dict[str, dict]) -> None:
    for module_path, entry in wrappers.items():
        wrapper_cls = import_bisup_class(entry["class"], "wrapper")
        try:
            parent_path, _, attr = module_path.rpartition(".")
            parent = model.get_submodule(parent_path)
            inner = getattr(parent, attr)
        except AttributeError as err:
            raise FormatError(f"{CONFIG_FILE}: wrapped module {module_path!r} does not exist in this model") from err
        setattr(parent, attr, wrapper_cls(inner, build_transform(entry["rotation"])))


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout: initialise as usual
        return contextlib.nullcontext()
    return no_init_weights()


def _build_model(path: Path, meta: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        quant_config = QuantConfig.from_dict(meta["quant_config"])
        model_config = dict(meta["model_config"])
        model_type = model_config.pop("model_type", meta.get("model_type"))
        hf_config = AutoConfig.for_model(model_type, **model_config)
        dtype = getattr(torch, meta["dtype"])
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise FormatError(f"{path / CONFIG_FILE}: invalid configuration: {err}") from err
    # on the CPU, where load_file puts the tensors (load_quantized moves the model at the end), without
    # the random init every parameter is overwritten anyway (minutes for a 7B)
    with torch.device("cpu"), _no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    return model, quant_config, dtype


def _check_remaining(model: nn.Module, meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Every tensor left must be one the model expects, and every expected one must be there."""
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if meta["tied_embeddings"] else set())
    expected = {k for k in expected if not k.endswith((KV_ROTATION, VALUE_BASIS))
                and not any(k.startswith(n + ".") for n in meta["linears"])}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise FormatError(f"{TENSOR_FILE}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for key, value in tensors.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise FormatError(f"{TENSOR_FILE}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(state[key].shape)}")


def load_quantized(path: Union[str, Path], device="cpu", return_tokenizer: bool = False, mode: Optional[str] = None):
    """Load a model written by save_quantized (returns the model; with return_tokenizer, (model, tokenizer)).

    mode: "fake" or "real" to run the saved codes in that mode whichever mode saved them; None: as saved.
    """
    from bisup.nn.real_linear import fake_to_real
    from bisup.quantize import act_clip_of, check_real, to_real

    if mode not in (None, "fake", "real"):
        raise ValueError(f"load_quantized: mode={mode!r}, expected None (as saved), 'fake' or 'real'")
    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path / TENSOR_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path / TENSOR_FILE} is missing or corrupted: {err}") from err
    model, quant_config, dtype = _build_model(path, meta)
    if mode is not None and mode != quant_config.mode:
        quant_config = quant_config.replace(mode=mode)
    real = quant_config.mode == "real"
    if real:
        check_real(quant_config, model)
    adapter = get_adapter(model)
    layers = adapter.layers()
    for name, entry in meta["linears"].items():
        try:
            _, _, idx, rest = name.split(".", 3)
            layer = layers[int(idx)]
            linear = adapter.get_linear(layer, rest)
        except (ValueError, IndexError, KeyError, AttributeError) as err:
            raise FormatError(f"{CONFIG_FILE}: linear {name!r} does not exist in this {model.config.model_type} model") from err
        module = _load_linear(entry, linear, name, tensors, dtype)
        if real and isinstance(module, FakeQuantLinear):  # packed at once: the model never holds every
            own = [k for k in tensors if k.startswith(name + ".")]  # fake weight; its other state first
            module.load_state_dict({k[len(name) + 1:]: tensors.pop(k) for k in own}, strict=False)
            module = fake_to_real(module, quant_config.a_bits, act_clip_of(module, quant_config))
        adapter.set_linear(layer, rest, module)
    _load_wrappers(model, meta.get("wrappers", {}))
    for i, layer in enumerate(layers):
        if value_basis_key(i) in tensors:
            set_value_basis(adapter.attention(layer), tensors.pop(value_basis_key(i)))
    for i, spec in meta["kv"].items():
        attn = adapter.attention(layers[int(i)])
        if kv_rotation_key(int(i)) in tensors:
            set_kv_rotation(attn, tensors.pop(kv_rotation_key(int(i))))
        set_kv_quant(model, [attn], KVQuantSpec(**spec))
    _check_remaining(model, meta, tensors)
    model.load_state_dict(tensors, strict=False)
    if meta["tied_embeddings"]:
        model.lm_head.weight = adapter.embeddings().weight
    if real:
        to_real(model, adapter, quant_config)  # the KV cache (the linears are real already)
    model.bisup_config = quant_config
    model = model.to(device).eval()
    if not return_tokenizer:
        return model
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
