"""Public entry points: quantize_model, save_quantized, load_quantized.

Saved format (a directory, FORMAT_VERSION 1):
  bisup_config.json  format name + version, the QuantConfig, the transformers model config, one
                     entry per quantized linear (bits, groups, packing, shapes, activation
                     quantizer, input transform) and the KV quantization spec;
  model.safetensors  packed integer weight codes (`<linear>.qweight`, INT4 nibbles / INT3 words /
                     int8), fp16 `<linear>.scales` (+ `.zeros` when asymmetric), outlier channels
                     (`.outlier_qweight` int8, `.outlier_scales`), and every other parameter/buffer
                     of the model as is (rotations are already folded into them);
  tokenizer files when a tokenizer is given.
Input transforms (QuaRot's online Hadamard) and output-rotating wrappers (QuaRot on Gemma3's post
norms) are bisup modules with to_config()/from_config(); they are rebuilt from their JSON entry.
No pickle anywhere. Writes go to a temporary directory renamed into place.
Fake- and real-mode models write the same files (a QuantLinear is saved through its FakeQuantLinear
twin, bisup/nn/real_linear.py); load_quantized(path, mode=...) runs a file in either mode.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bisup.config import QuantConfig
from bisup.models.adapters import get_adapter
from bisup.nn.fake_attention import KVQuantSpec, set_kv_quant
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear, WeightCodes

FORMAT_NAME = "bisup-quantized"
FORMAT_VERSION = 1
CONFIG_FILE = "bisup_config.json"
TENSOR_FILE = "model.safetensors"
NEEDS_CALIBRATION = ("gptq", "atom", "quarot")


# ================================================================================================
# quantize
# ================================================================================================
def _calibration_tensor(calib_data, tokenizer, config: QuantConfig) -> torch.Tensor:
    """calib_data (None = embedded corpus, a LongTensor [n, L], or text) -> LongTensor [n, L]."""
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dtype != torch.long or calib_data.dim() != 2:
            raise ValueError(f"calib_data must be a LongTensor [n, seq_len], got {calib_data.dtype} {tuple(calib_data.shape)}")
        return calib_data
    if tokenizer is None:
        raise ValueError(f"method {config.method!r} calibrates: pass calib_data (LongTensor [n, seq_len]) or a tokenizer")
    if calib_data is None:
        from bisup.eval.data import calibration_batches

        return calibration_batches(tokenizer, config.n_calib, config.calib_seq_len)
    text = calib_data if isinstance(calib_data, str) else "\n\n".join(calib_data)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    n = min(config.n_calib, ids.numel() // config.calib_seq_len)
    if n == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than calib_seq_len={config.calib_seq_len}")
    return ids[: n * config.calib_seq_len].reshape(n, config.calib_seq_len)


def _real_linear_class():
    try:
        module = importlib.import_module("bisup.nn.quant_linear")
    except ModuleNotFoundError as err:
        if err.name != "bisup.nn.quant_linear":
            raise
        return None
    return getattr(module, "QuantLinear", None)


def _check_real(config: QuantConfig, model: Optional[nn.Module] = None):
    """The QuantLinear class, or NotImplementedError saying why config (on model) cannot run on the real kernels."""
    cls = _real_linear_class()
    if cls is None:
        raise NotImplementedError(
            "mode='real' needs bisup.nn.QuantLinear (bisup/nn/quant_linear.py), which this build lacks; "
            "use mode='fake'")
    unsupported = []
    if config.w_bits not in (3, 4) or config.a_bits not in (3, 4):
        unsupported.append(f"w_bits/a_bits must be 3 or 4 (got {config.w_bits}/{config.a_bits})")
    if not (config.w_sym and config.a_sym):
        unsupported.append("weights and activations must be symmetric")
    if config.w_group_size != config.a_group_size:
        unsupported.append(f"w_group_size must equal a_group_size (got {config.w_group_size}/{config.a_group_size})")
    elif config.w_group_size != -1 and config.w_group_size % 32:
        unsupported.append(f"the group size must be -1 or a multiple of 32 (got {config.w_group_size})")
    if config.method == "atom" and config.atom_outlier_bits != 8:
        unsupported.append(f"Atom outliers run as INT8 (got atom_outlier_bits={config.atom_outlier_bits})")
    if config.quantizes_kv:
        from bisup.nn.real_kv import REAL_KV_BITS

        if config.kv_bits not in REAL_KV_BITS:
            unsupported.append(f"kv_bits must be one of {list(REAL_KV_BITS)} or 16 (got {config.kv_bits})")
        if config.kv_sym or config.kv_clip != 1.0:
            unsupported.append(f"the KV cache is asymmetric and unclipped (got kv_sym={config.kv_sym}, "
                               f"kv_clip={config.kv_clip})")
    if model is not None:
        unsupported += _model_limits(config, model)
    if unsupported:
        raise NotImplementedError("mode='real': " + "; ".join(unsupported) + ". Use mode='fake'.")
    return cls


def _model_limits(config: QuantConfig, model: nn.Module) -> list:
    """What the real kernels cannot do on this model with config."""
    adapter = get_adapter(model)
    out = []
    if config.method == "atom":
        k = config.outlier_count(adapter.hidden_size)
        if k % 16:
            out.append(f"the Atom outlier count must be a multiple of 16 (got {k}; set atom_outliers)")
    if config.quantizes_kv:
        from bisup.nn.kv_cache import MixedPrecisionKVCache

        g = config.kv_group_size
        if g != -1 and (g % 8 or adapter.head_dim % g):
            out.append(f"kv_group_size must be -1 or a multiple of 8 dividing head_dim={adapter.head_dim} (got {g})")
        try:
            MixedPrecisionKVCache(config=model.config)
        except ValueError as err:
            out.append(f"KV cache: {err}")
    return out


def _to_real(model: nn.Module, adapter, config: QuantConfig) -> None:
    """Swap every FakeQuantLinear for a bisup.nn.QuantLinear running the integer GEMM, with the
    same integer codes and scales (so GPTQ / Atom / QuaRot weights carry over exactly), and, when
    the KV cache is quantized, switch attention to MixedPrecisionKVCache + bisup.ops.attention."""
    from bisup.nn.real_linear import fake_to_real

    _check_real(config, model)
    for layer in adapter.layers():
        for name in adapter.linear_names():
            fq = adapter.get_linear(layer, name)
            if isinstance(fq, FakeQuantLinear):
                adapter.set_linear(layer, name, fake_to_real(fq, config.a_bits, config.a_clip))
    if config.quantizes_kv:
        from bisup.nn.real_kv import enable_real_kv

        enable_real_kv(model, adapter)


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None, calib_data=None, tokenizer=None,
                   progress: bool = True) -> nn.Module:
    """Quantize a transformers causal LM in place with config.method and return it.

    calib_data: a LongTensor [n, seq_len] of token ids, text, or None for the embedded corpus's
    calibration slice (needs `tokenizer`); RTN needs no calibration.
    mode="real": decoder linears become QuantLinear (integer GEMM); with kv_bits < 16, attention
    runs bisup.ops.attention on a MixedPrecisionKVCache (bisup.make_cache; forward and generate
    create one when none is passed), see bisup/nn/real_kv.py.
    """
    from bisup.methods import get_method

    config = config or QuantConfig()
    if getattr(model, "bisup_config", None) is not None:
        raise ValueError("this model is already quantized by bisup; quantize a fresh copy")
    adapter = get_adapter(model)
    method = get_method(config.method)
    if config.mode == "real":
        _check_real(config, model)  # fail before the (possibly long) calibration
    calib = None
    if config.method in NEEDS_CALIBRATION and (config.method != "quarot" or config.gptq or calib_data is not None
                                               or tokenizer is not None):
        calib = _calibration_tensor(calib_data, tokenizer, config)
    torch.manual_seed(config.seed)
    method.apply(model, adapter, config, calib, progress=progress)
    if config.mode == "real":
        _to_real(model, adapter, config)
    model.bisup_config = config
    return model


# ================================================================================================
# save
# ================================================================================================
def _packing(bits: int, k: int) -> str:
    if bits == 3 and k % 32 == 0:
        return "int3"
    if bits <= 4 and k % 2 == 0:
        return "int4"
    return "int8"


def _pack(codes: torch.Tensor, packing: str, signed: bool) -> torch.Tensor:
    from bisup import ops

    codes = codes.contiguous().cpu()
    if packing == "int4":
        return ops.pack_int4(codes, signed)
    if packing == "int3":
        return ops.pack_int3(codes, signed)
    return codes


def _unpack(packed: torch.Tensor, packing: str, signed: bool) -> torch.Tensor:
    from bisup import ops

    if packing == "int4":
        return ops.unpack_int4(packed.contiguous(), signed)
    if packing == "int3":
        return ops.unpack_int3(packed.contiguous(), signed)
    return packed


def _packed_shape(packing: str, n: int, k: int):
    return {"int4": (n, k // 2), "int3": (n, k // 32 * 12), "int8": (n, k)}[packing]


def _transform_entry(transform) -> Optional[dict]:
    if transform is None:
        return None
    cls = type(transform)
    if not (isinstance(transform, nn.Module) and hasattr(transform, "to_config") and hasattr(cls, "from_config")
            and cls.__module__.startswith("bisup.")):
        raise NotImplementedError(
            f"cannot save input transform {cls.__module__}.{cls.__name__}: a saved transform must be a bisup "
            "nn.Module with to_config() and a from_config() classmethod")
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "config": transform.to_config()}


def _linear_entry(fq: FakeQuantLinear, tensors: Dict[str, torch.Tensor], prefix: str) -> dict:
    entry = dict(in_features=fq.in_features, out_features=fq.out_features, bias=fq.bias is not None,
                 w_bits=fq.w_bits, w_group_size=fq.w_group_size, w_sym=fq.w_sym, w_clip=float(fq.w_clip),
                 outlier_bits=fq.outlier_bits, n_outliers=int(fq.outlier_idx.numel()),
                 act_quantizer=None if fq.act_quantizer is None else fq.act_quantizer.to_config(),
                 input_transform=_transform_entry(fq.input_transform), quantized=fq.quantized)
    if not fq.quantized:
        return entry
    wc = fq.weight_codes()
    n, km = wc.codes.shape
    entry.update(packing=_packing(wc.bits, km), main_features=km, n_groups=int(wc.scales.shape[1]))
    tensors[f"{prefix}.qweight"] = _pack(wc.codes, entry["packing"], wc.sym)
    tensors[f"{prefix}.scales"] = wc.scales.cpu()
    if wc.zeros is not None:
        tensors[f"{prefix}.zeros"] = wc.zeros.cpu()
    if wc.outlier_codes is not None:
        tensors[f"{prefix}.outlier_qweight"] = wc.outlier_codes.cpu()
        tensors[f"{prefix}.outlier_scales"] = wc.outlier_scales.cpu()
        if wc.outlier_zeros is not None:
            tensors[f"{prefix}.outlier_zeros"] = wc.outlier_zeros.cpu()
    return entry


def _as_fake(module: nn.Module, name: str, dtype: torch.dtype, config: QuantConfig) -> Optional[FakeQuantLinear]:
    """The FakeQuantLinear form of a quantized decoder linear (None for a plain nn.Linear)."""
    if isinstance(module, FakeQuantLinear):
        return module
    if isinstance(module, nn.Linear):
        return None
    from bisup.nn.real_linear import is_real, real_to_fake

    if is_real(module):
        return real_to_fake(module, dtype, config.w_clip)
    raise NotImplementedError(f"save_quantized: cannot save {name}, a {type(module).__name__}")


def _wrapper_entries(model: nn.Module) -> Dict[str, dict]:
    """bisup modules that wrap an original module and rotate its output (QuaRot's RotateAfter on
    Gemma3's post norms): {path: {"class", "rotation"}}; the wrapped module's tensors are in the state dict."""
    out = {}
    for path, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith("bisup.") and isinstance(getattr(module, "inner", None), nn.Module) \
                and hasattr(module, "rotation"):
            out[path] = {"class": f"{cls.__module__}:{cls.__qualname__}", "rotation": _transform_entry(module.rotation)}
    return out


def _atomic_write_dir(path: Path, write) -> None:
    """Run write(tmp_dir), then move tmp_dir to path (replacing an existing directory)."""
    path = Path(path)
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
        fq = _as_fake(module, name, dtype, config)
        if fq is None:
            continue  # left in floating point: saved with the state dict
        linears[name] = _linear_entry(fq, tensors, name)
        # the linear's tensors in the fake-mode layout, whichever mode it runs in
        skip.update(k for k in state if k.startswith(name + "."))
        for key, value in fq.state_dict(prefix=name + ".").items():
            if not (fq.quantized and key == f"{name}.weight"):
                tensors[key] = value.detach().cpu().contiguous()
    wrappers = _wrapper_entries(model)
    tied = adapter.tied_embeddings
    if tied:
        skip.add("lm_head.weight")
    for key, value in state.items():
        if key not in skip:
            tensors[key] = value.detach().cpu().contiguous()
    kv = {}
    for i, layer in enumerate(adapter.layers()):
        spec = getattr(adapter.attention(layer), "bisup_kv", None)
        if spec is not None:
            kv[str(i)] = spec.to_dict()
    model_config = model.config.to_dict()
    model_config["tie_word_embeddings"] = tied
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quant_config": config.to_dict(),
        "model_type": model.config.model_type,
        "model_config": model_config,
        "dtype": str(adapter.embeddings().weight.dtype).replace("torch.", ""),
        "tied_embeddings": tied,
        "linears": linears,
        "kv": kv,
        "wrappers": wrappers,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(meta, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    _atomic_write_dir(Path(path), write)
    return Path(path)


# ================================================================================================
# load
# ================================================================================================
class FormatError(ValueError):
    """A saved model that is corrupted, of another version, or inconsistent with itself."""


def _read_meta(path: Path) -> dict:
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
    for key in ("quant_config", "model_config", "linears", "kv", "dtype", "tied_embeddings"):
        if key not in meta:
            raise FormatError(f"{file}: missing field {key!r}")
    return meta


def _take(tensors: Dict[str, torch.Tensor], key: str, shape, dtype: torch.dtype) -> torch.Tensor:
    if key not in tensors:
        raise FormatError(f"{TENSOR_FILE}: missing tensor {key!r}")
    t = tensors.pop(key)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise FormatError(f"{TENSOR_FILE}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def _import_transform(entry: dict):
    module_name, _, qualname = entry["class"].partition(":")
    if not module_name.startswith("bisup."):
        raise FormatError(f"refusing to import input transform {entry['class']!r}: not a bisup class")
    return getattr(importlib.import_module(module_name), qualname).from_config(entry["config"])


def _load_linear(entry: dict, linear: nn.Linear, name: str, tensors, dtype) -> FakeQuantLinear:
    n, k = entry["out_features"], entry["in_features"]
    if (linear.out_features, linear.in_features) != (n, k):
        raise FormatError(f"{name}: saved shape {(n, k)} does not match the model's {(linear.out_features, linear.in_features)}")
    aq = None if entry["act_quantizer"] is None else ActQuantizer(**entry["act_quantizer"])
    transform = None if entry["input_transform"] is None else _import_transform(entry["input_transform"])
    n_out = entry["n_outliers"]
    outlier_idx = _take(tensors, f"{name}.outlier_idx", (n_out,), torch.long) if n_out else None
    if aq is not None and f"{name}.act_quantizer.outlier_idx" in tensors:
        aq.outlier_idx = tensors.pop(f"{name}.act_quantizer.outlier_idx")
    if transform is not None:
        prefix = f"{name}.input_transform."
        state = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        transform.load_state_dict(state)
    bias = _take(tensors, f"{name}.bias", (n,), dtype) if entry["bias"] else None
    shell = nn.Linear(k, n, bias=bias is not None, device="meta")
    if not entry["quantized"]:
        weight = _take(tensors, f"{name}.weight", (n, k), dtype)
        fq = FakeQuantLinear(shell, entry["w_bits"], entry["w_group_size"], entry["w_sym"], entry["w_clip"],
                             aq, transform, outlier_idx, entry["outlier_bits"], weight=weight)
    else:
        km, groups, packing, sym = entry["main_features"], entry["n_groups"], entry["packing"], entry["w_sym"]
        if km != k - n_out:
            raise FormatError(f"{name}: main_features {km} != in_features {k} - outliers {n_out}")
        codes = _unpack(_take(tensors, f"{name}.qweight", _packed_shape(packing, n, km),
                              torch.int8 if packing == "int8" else torch.uint8), packing, sym)
        wc = WeightCodes(entry["w_bits"], entry["w_group_size"], sym, codes,
                         _take(tensors, f"{name}.scales", (n, groups), torch.float16),
                         None if sym else _take(tensors, f"{name}.zeros", (n, groups), torch.float16))
        if n_out:
            wc.outlier_idx, wc.outlier_bits = outlier_idx, entry["outlier_bits"]
            wc.outlier_codes = _take(tensors, f"{name}.outlier_qweight", (n, n_out), torch.int8)
            wc.outlier_scales = _take(tensors, f"{name}.outlier_scales", (n, 1), torch.float16)
            wc.outlier_zeros = None if sym else _take(tensors, f"{name}.outlier_zeros", (n, 1), torch.float16)
        fq = FakeQuantLinear(shell, entry["w_bits"], entry["w_group_size"], sym, entry["w_clip"], aq, transform,
                             outlier_idx, entry["outlier_bits"], weight=wc.dequantize(k, dtype))
        fq._codes = wc
    if bias is not None:
        fq.bias = nn.Parameter(bias, requires_grad=False)
    return fq


def load_quantized(path: Union[str, Path], device="cpu", return_tokenizer: bool = False, mode: Optional[str] = None):
    """Load a model written by save_quantized (returns the model; with return_tokenizer, (model, tokenizer)).

    mode: "fake" or "real" to run the saved codes in that mode whichever mode saved them; None: as saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode not in (None, "fake", "real"):
        raise ValueError(f"load_quantized: mode={mode!r}, expected None (as saved), 'fake' or 'real'")
    path = Path(path)
    meta = _read_meta(path)
    try:
        tensors = load_file(str(path / TENSOR_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path / TENSOR_FILE} is missing or corrupted: {err}") from err
    try:
        quant_config = QuantConfig.from_dict(meta["quant_config"])
        model_config = dict(meta["model_config"])
        model_type = model_config.pop("model_type", meta.get("model_type"))
        hf_config = AutoConfig.for_model(model_type, **model_config)
        dtype = getattr(torch, meta["dtype"])
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise FormatError(f"{path / CONFIG_FILE}: invalid configuration: {err}") from err
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    adapter = get_adapter(model)
    layers = adapter.layers()
    for name, entry in meta["linears"].items():
        try:
            _, _, idx, rest = name.split(".", 3)
            layer = layers[int(idx)]
            linear = adapter.get_linear(layer, rest)
        except (ValueError, IndexError, KeyError) as err:
            raise FormatError(f"{CONFIG_FILE}: linear {name!r} does not exist in this {model_type} model") from err
        adapter.set_linear(layer, rest, _load_linear(entry, linear, name, tensors, dtype))
    for path, entry in meta.get("wrappers", {}).items():
        module_name, _, qualname = entry["class"].partition(":")
        if not module_name.startswith("bisup."):
            raise FormatError(f"refusing to import wrapper {entry['class']!r}: not a bisup class")
        try:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            inner = getattr(parent, attr)
        except AttributeError as err:
            raise FormatError(f"{CONFIG_FILE}: wrapped module {path!r} does not exist in this model") from err
        wrapper_cls = getattr(importlib.import_module(module_name), qualname)
        setattr(parent, attr, wrapper_cls(inner, _import_transform(entry["rotation"])))
    for i, spec in meta["kv"].items():
        attn = adapter.attention(layers[int(i)])
        rot_key = f"model.layers.{i}.self_attn.bisup_kv_rotation"
        if rot_key in tensors:
            attn.register_buffer("bisup_kv_rotation", tensors.pop(rot_key))
        set_kv_quant(model, [attn], KVQuantSpec(**spec))
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if meta["tied_embeddings"] else set())
    expected -= {f"{n}.weight" for n, e in meta["linears"].items() if e["quantized"]}
    expected -= {k for k in expected if k.endswith("bisup_kv_rotation")}
    remaining_expected = expected - {k for k in expected if any(k.startswith(n + ".") for n in meta["linears"])}
    missing = sorted(remaining_expected - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise FormatError(f"{TENSOR_FILE}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for key, value in tensors.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise FormatError(f"{TENSOR_FILE}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(state[key].shape)}")
    model.load_state_dict(tensors, strict=False)
    if meta["tied_embeddings"]:
        model.lm_head.weight = adapter.embeddings().weight
    if mode is not None and mode != quant_config.mode:
        quant_config = quant_config.replace(mode=mode)
    if quant_config.mode == "real":
        _to_real(model, adapter, quant_config)
    model.bisup_config = quant_config
    model = model.to(device).eval()
    if not return_tokenizer:
        return model
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


# ================================================================================================
# storage accounting
# ================================================================================================
def weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the decoder linears' weights as packed integers + fp16 scales vs as FP16.

    The codes are really packed with bisup.ops (INT4 nibbles / INT3 words / int8), as save_quantized stores them.
    """
    adapter = get_adapter(model)
    out = dict(linears=0, params=0, fp16_bytes=0, code_bytes=0, scale_bytes=0)
    from bisup.nn.real_linear import is_real, split_real, weight_codes

    for _, module in adapter.named_linears():
        real = split_real(module)[0] if is_real(module) else None
        n, k = (real.out_features, real.in_features) if real is not None else module.weight.shape
        out["linears"] += 1
        out["params"] += n * k
        out["fp16_bytes"] += 2 * n * k
        if real is not None or (isinstance(module, FakeQuantLinear) and module.quantized):
            wc = weight_codes(real) if real is not None else module.weight_codes()
            out["code_bytes"] += _pack(wc.codes, _packing(wc.bits, wc.codes.shape[1]), wc.sym).numel()
            extra = [wc.scales, wc.zeros, wc.outlier_codes, wc.outlier_scales, wc.outlier_zeros]
            out["code_bytes"] += 0 if wc.outlier_codes is None else wc.outlier_codes.numel()
            out["scale_bytes"] += sum(t.numel() * t.element_size() for t in extra[:2] + extra[3:] if t is not None)
        else:
            out["code_bytes"] += 2 * n * k
    out["packed_bytes"] = out["code_bytes"] + out["scale_bytes"]
    return out
