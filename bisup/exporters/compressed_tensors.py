"""A bisup-quantized model -> a compressed-tensors `pack-quantized` checkpoint (what vLLM serves, and
what transformers loads with the `compressed-tensors` package).

The directory is an ordinary Hugging Face model directory of the model's own architecture:
  config.json             the model's config + `quantization_config` (quant_method compressed-tensors,
                          format pack-quantized, one config group per distinct scheme of the decoder
                          linears, `ignore` for the linears left in floating point, and a
                          `transform_config` for the online Hadamard transforms);
  model.safetensors       per quantized linear `<linear>.weight_packed` (int32: the signed codes offset by
                          2^(b-1) and packed densely, value i at bits [i*b, (i+1)*b) of the little-endian
                          bit stream of each row, ceil(K*b/32) words), `<linear>.weight_scale` [N, K/g] (or
                          [N, 1] per channel) and `<linear>.weight_shape` (int64 [N, K]); per online
                          transform `<linear>.<scheme>_input.weight`: the +-1 matrix W with
                          transform(x) = x W / sqrt(n); every other tensor of the model as is;
  generation_config.json, tokenizer files, and bisup_export.json (the bisup config that made the
  model, the commit, and what the export left out).

Weights are exact: dequantization is code * scale in both formats (bisup's fp16 scales are stored in
the export dtype; float16 and float32 keep them exactly, bfloat16 rounds them). Activations: the
format declares dynamic, symmetric, unclipped quantization per token or per group, whose reference
quantizer is s = max|x| / ((2^b - 1) / 2) (formats.ENGINE_ACTS); a model calibrated with it
(QuantConfig.a_convention) is what transformers + compressed-tensors runs. vLLM's INT4-activation
kernels compute a variant of their own (README "Serve with vLLM"). What the format cannot carry is
refused with its reason (`refusals`), or dropped only when named in `drop` (DROPPABLE).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import nn

from bisup.checkpoint.save import atomic_write_dir, fake_form, output_wrappers
from bisup.config import QuantConfig
from bisup.models.adapters import get_adapter
from bisup.nn.attention import ROTATION_BUFFER, VALUE_BASIS_BUFFER
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.provenance import git_commit
from bisup.quant.formats import ENGINE_ACTS, effective_group
from bisup.rotation.fuse import HadamardTransform
from bisup.rotation.hadamard import sylvester

FORMAT = "compressed-tensors"
PROVENANCE_FILE = "bisup_export.json"
# What an export may leave out when asked to (export(drop=...)), and what that changes.
DROPPABLE = {
    "kv_cache": "bisup's low-bit KV cache (kv_bits < 16, its FP16 system-prompt segment and QuaRot's Q/K "
                "rotation, which only serves it): the engine keeps K/V in its own cache dtype",
    "act_quantizer": "bisup's activation quantizer (a_convention 'bisup': fp16 scales of clip * max|x| / "
                     "(2^(b-1) - 1), learned or fixed clips): the engine quantizes with its own convention, so "
                     "the served model is not exactly the tuned one",
}


class ExportError(ValueError):
    """The model holds something the compressed-tensors format cannot carry."""


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [N, K] (in [-2^(b-1), 2^(b-1)-1]) -> int32 [N, ceil(K*b/32)]: each row's values,
    offset by 2^(b-1) to unsigned, one after another in a little-endian bit stream (value i at bits
    [i*b, (i+1)*b)); a value may straddle two words; the last word is zero-padded."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32: bits must be in [1, 8], got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"pack_int32: codes must be 2-D [rows, K], got shape {tuple(codes.shape)}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < lo or c.max() > hi):
        raise ValueError(f"pack_int32: codes outside [{lo}, {hi}] for {bits} bits")
    rows, k = c.shape
    words = -(-k * bits // 32)
    u = c + (1 << (bits - 1))
    pos = torch.arange(k, device=c.device) * bits  # first bit of each value in the row's stream
    word, shift = pos // 32, pos % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=c.device)  # + 1: the spill of the last value
    out.index_add_(1, word, u << shift)  # disjoint bit ranges: adding is or-ing
    spill = shift + bits - 32  # bits of a value that land in the next word
    cross = spill > 0
    if cross.any():
        out.index_add_(1, word[cross] + 1, u[:, cross] >> (bits - spill[cross]))
    out = out[:, :words] & 0xFFFFFFFF
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # two's complement words


# ------------------------------------------------------------------------------------------------
# what the format carries
# ------------------------------------------------------------------------------------------------
def _weight_args(fq: FakeQuantLinear) -> dict:
    g = effective_group(fq.in_features, fq.w_group_size)
    return {"num_bits": fq.w_bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "group" if g < fq.in_features else "channel",
            "group_size": g if g < fq.in_features else None}


def _input_args(fq: FakeQuantLinear) -> Optional[dict]:
    aq = fq.act_quantizer
    if aq is None or not aq.enabled:
        return None
    g = effective_group(fq.in_features, aq.group_size)
    return {"num_bits": aq.bits, "type": "int", "symmetric": True, "dynamic": True,
            "strategy": "group" if g < fq.in_features else "token",
            "group_size": g if g < fq.in_features else None}


def _linear_refusals(name: str, fq: FakeQuantLinear, drop: Iterable[str], matrices: dict) -> List[str]:
    """Why this decoder linear cannot be exported as is (matrices: _pm1_matrix's cache)."""
    out = []
    aq = fq.act_quantizer
    t = fq.input_transform
    if t is not None and not isinstance(t, HadamardTransform):
        out.append(f"{name}: online input transform {type(t).__name__} has no compressed-tensors form")
    elif t is not None and _pm1_matrix(t, matrices) is None:
        out.append(f"{name}: online transform of order {t.n} is orthogonal but not a scaled +-1 Hadamard matrix "
                   "(an engine loads it in the model dtype, which would round it)")
    if t is not None and fq.bias is not None:
        out.append(f"{name}: an online transform on a linear with a bias (vLLM's transform path takes no bias)")
    if not fq.quantized:
        if aq is not None and aq.enabled:
            out.append(f"{name}: floating-point weights with quantized activations (no compressed-tensors scheme)")
        if t is not None:
            out.append(f"{name}: floating-point weights behind an online transform (a transform is declared for "
                       "quantized linears only)")
        return out
    if fq.outlier_idx.numel():
        out.append(f"{name}: {fq.outlier_idx.numel()} INT8 outlier input channels (Atom) have no compressed-tensors form")
    if not fq.w_sym:
        out.append(f"{name}: asymmetric weights (the engines' W4A4/W4A16 kernels take symmetric weights)")
    g = effective_group(fq.in_features, fq.w_group_size)
    if fq.in_features % g:
        out.append(f"{name}: in_features={fq.in_features} is not a multiple of the weight group {g} "
                   "(compressed-tensors has no shorter last group)")
    if aq is not None and aq.enabled:
        ga = effective_group(fq.in_features, aq.group_size)
        if fq.in_features % ga:
            out.append(f"{name}: in_features={fq.in_features} is not a multiple of the activation group {ga}")
        if not aq.sym:
            out.append(f"{name}: asymmetric activations (the engines quantize activations symmetrically)")
        if aq.outlier_idx.numel():
            out.append(f"{name}: activation outlier channels (Atom) have no compressed-tensors form")
        if aq.convention != ENGINE_ACTS and "act_quantizer" not in drop:
            out.append(f"{name}: activations quantized with the {aq.convention!r} convention (clip "
                       f"{float(aq.clip):g}); the engine computes its own (calibrate with QuantConfig(a_convention="
                       f"{ENGINE_ACTS!r}), or pass drop=['act_quantizer'] to serve it with the engine's quantizer anyway)")
    return out


def refusals(model: nn.Module, drop: Iterable[str] = (), matrices: Optional[dict] = None) -> List[str]:
    """Every reason the model cannot be exported to compressed-tensors (empty: it can). matrices: a
    cache of the online transforms' +-1 matrices (export shares its own)."""
    drop = set(drop)
    matrices = {} if matrices is None else matrices
    config: Optional[QuantConfig] = getattr(model, "bisup_config", None)
    if config is None:
        return ["the model was not quantized by bisup.quantize_model (nothing to export)"]
    out = []
    if config.quantizes_kv and "kv_cache" not in drop:
        out.append(f"the KV cache is quantized to {config.kv_bits} bits"
                   + (f" with a {config.prompt_len}-token FP16 system-prompt segment" if config.prompt_len else "")
                   + ": compressed-tensors' KV schemes are static INT8/FP8, not bisup's dynamic per-token "
                     "low-bit cache (pass drop=['kv_cache'] to serve with the engine's KV cache)")
    for path, module in output_wrappers(model).items():
        out.append(f"{path}: {type(module).__name__} rotates a norm's output online (a QuaRot Gemma3 checkpoint "
                   "written before QuaRot rotated Gemma3's readers online); compressed-tensors transforms apply "
                   "to linears only")
    quantized = 0
    for name, module in get_adapter(model).named_linears():
        fq = _fake_form(module, name, model)
        if fq is not None:
            out += _linear_refusals(name, fq, drop, matrices)
            quantized += fq.quantized
    if not quantized:
        out.append("no decoder linear has quantized weights (nothing for the format to carry)")
    return out


def _fake_form(module: nn.Module, name: str, model: nn.Module) -> Optional[FakeQuantLinear]:
    """The FakeQuantLinear of a decoder linear in either mode (None: a plain nn.Linear)."""
    return fake_form(module, name, get_adapter(model).embeddings().weight.dtype, model.bisup_config)


def _pm1_matrix(t: HadamardTransform, cache: dict) -> Optional[torch.Tensor]:
    """W = sqrt(n) M (+-1 entries, float32) with t(x) = x M, or None when M is not a scaled +-1
    matrix; cached per transform (every layer's down_proj usually shares one)."""
    key = json.dumps(t.to_config())
    if key not in cache:
        w = t.matrix(torch.float64) * math.sqrt(t.n)
        r = w.round()
        ok = torch.allclose(w, r, rtol=0, atol=1e-6) and torch.equal(r.abs(), torch.ones_like(r))
        cache[key] = r.to(torch.float32) if ok else None
    return cache[key]


def _transform_type(w: torch.Tensor) -> str:
    """"hadamard" when W is Sylvester's matrix (engines run it as a fast transform, e.g. vLLM's
    hadacore), else "random-hadamard" (engines multiply by the stored matrix)."""
    n = w.shape[0]
    if n & (n - 1) == 0 and torch.equal(w, torch.from_numpy(sylvester(n)).to(w.dtype)):
        return "hadamard"
    return "random-hadamard"


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _group_targets(names: List[str], all_quantized: int) -> List[str]:
    """Targets of a config group: the Linear class when it holds every quantized linear, else the names."""
    return ["Linear"] if len(names) == all_quantized else [f"re:^{re.escape(n)}$" for n in names]


def quantization_config(schemes: Dict[str, List[str]], ignore: List[str],
                        transforms: Dict[str, Tuple[str, str, List[str]]]) -> dict:
    """The config.json `quantization_config` of the export. schemes: {json of (weights, inputs): names};
    transforms: {transform config json: (scheme name, type, linear names)}."""
    total = sum(len(v) for v in schemes.values())
    groups = {}
    for i, (key, names) in enumerate(sorted(schemes.items())):
        weights, inputs = json.loads(key)
        groups[f"group_{i}"] = {"targets": _group_targets(names, total), "weights": weights,
                                "input_activations": inputs, "output_activations": None, "format": "pack-quantized"}
    out = {"quant_method": FORMAT, "format": "pack-quantized", "quantization_status": "compressed",
           "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}
    if transforms:
        out["transform_config"] = {"config_groups": {
            scheme: {"type": kind, "apply": [{"targets": [f"re:^{re.escape(n)}$" for n in names], "location": "input",
                                              "inverse": False}],
                     "randomize": False, "requires_grad": False}
            for scheme, kind, names in transforms.values()}}
    return out


def export_compressed_tensors(model: nn.Module, out_dir: Union[str, Path], tokenizer=None,
                              dtype: Optional[torch.dtype] = None, drop: Iterable[str] = ()) -> Path:
    """Write the model as a compressed-tensors pack-quantized checkpoint to out_dir (module docstring).

    dtype: of every floating-point tensor, weight scales included (default: the embeddings' dtype);
    drop: names from DROPPABLE that the export may leave out (anything else it cannot carry is an
    ExportError naming each reason)."""
    drop = list(drop)
    unknown = sorted(set(drop) - set(DROPPABLE))
    if unknown:
        raise ValueError(f"export: drop={unknown} unknown; expected names from {sorted(DROPPABLE)}")
    matrices: dict = {}
    problems = refusals(model, drop, matrices)
    if problems:
        raise ExportError(f"cannot export to {FORMAT}: " + "; ".join(problems))
    config: QuantConfig = model.bisup_config
    adapter = get_adapter(model)
    dtype = dtype or adapter.embeddings().weight.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"export: dtype must be a floating-point dtype, got {dtype}")
    if dtype == torch.bfloat16:
        warnings.warn("export(dtype=bfloat16): bisup's fp16 weight scales are rounded to bf16 (8 mantissa bits); "
                      "float16 or float32 keeps them exactly")
    if tokenizer is None:
        warnings.warn("export without a tokenizer: engines (vllm serve) need the tokenizer files in the directory")
    tensors: Dict[str, torch.Tensor] = {}
    schemes: Dict[str, List[str]] = {}
    transforms: Dict[str, Tuple[str, str, List[str]]] = {}
    written, quantized = [], set()  # bisup linears (their tensors written here, not from the state dict)
    for name, module in adapter.named_linears():
        fq = _fake_form(module, name, model)
        if fq is None:
            continue  # a plain nn.Linear: in the state dict as is
        written.append(name)
        if fq.bias is not None:
            tensors[f"{name}.bias"] = fq.bias.detach().cpu().to(dtype).contiguous()
        if not fq.quantized:  # floating point (no transform, no activation quantizer: refusals)
            tensors[f"{name}.weight"] = fq.weight.detach().cpu().to(dtype).contiguous()
            continue
        quantized.add(name)
        wc = fq.weight_codes()
        tensors[f"{name}.weight_packed"] = pack_int32(wc.codes.cpu(), wc.bits)
        tensors[f"{name}.weight_scale"] = wc.scales.cpu().to(dtype).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([fq.out_features, fq.in_features], dtype=torch.int64)
        key = json.dumps([_weight_args(fq), _input_args(fq)], sort_keys=True)
        schemes.setdefault(key, []).append(name)
        if fq.input_transform is not None:
            # every linear's own copy: engines create one transform module per layer and load each from
            # its own key (they may share the storage after loading)
            w = _pm1_matrix(fq.input_transform, matrices)
            tkey = json.dumps(fq.input_transform.to_config())
            scheme, _, names = transforms.setdefault(tkey, (f"bisup_online_{len(transforms)}", _transform_type(w), []))
            names.append(name)
            tensors[f"{name}.{scheme}_input.weight"] = w.to(dtype, copy=True)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    tied = adapter.tied_embeddings
    bisup_buffers = (ROTATION_BUFFER, VALUE_BASIS_BUFFER)
    for key, value in model.state_dict().items():
        if any(key.startswith(n + ".") for n in written) or key.rsplit(".", 1)[-1] in bisup_buffers:
            continue
        if tied and key == "lm_head.weight":
            continue
        tensors[key] = (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
    hf_config = model.config.to_dict()
    hf_config.update(tie_word_embeddings=tied, dtype=str(dtype).replace("torch.", ""),
                     architectures=[type(model).__name__],  # engines pick the model class by it
                     quantization_config=quantization_config(schemes, ignore, transforms))
    hf_config.pop("torch_dtype", None)
    provenance = {"bisup_commit": git_commit(), "quant_config": config.to_dict(), "dropped": {k: DROPPABLE[k] for k in drop},
                  "dtype": str(dtype).replace("torch.", "")}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    out = Path(out_dir)
    atomic_write_dir(out, write)
    return out
