"""quantize_model: calibration data, method dispatch (bisup.methods registry), mode="real" conversion."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from bisup.config import QuantConfig
from bisup.methods.placement import Placement
from bisup.models.adapters import get_adapter
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.formats import BISUP_ACTS, GEMM_BITS, KV_BITS, effective_group

CALIB_DATA_FORMS = ("None (the embedded corpus's calibration slice; needs a tokenizer)", "a LongTensor [n, seq_len]",
                    "a str", "a list of str", "a list of token-id sequences (1-D tensors or lists of int)")


# ------------------------------------------------------------------------------------------------
# calibration data
# ------------------------------------------------------------------------------------------------
def _windows(ids: torch.Tensor, config: QuantConfig, what: str) -> torch.Tensor:
    """A 1-D token stream cut into at most n_calib windows of calib_seq_len tokens."""
    n = min(config.n_calib, ids.numel() // config.calib_seq_len)
    if n == 0:
        raise ValueError(f"calib_data: {what} holds {ids.numel()} tokens, fewer than calib_seq_len={config.calib_seq_len}")
    return ids[: n * config.calib_seq_len].reshape(n, config.calib_seq_len)


def _token_sequences(items: Sequence) -> Optional[list]:
    """items as a list of 1-D LongTensors if every item is a token-id sequence, else None."""
    out = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() <= 2 and not item.is_floating_point() \
                and (item.dim() < 2 or item.shape[0] == 1):
            out.append(item.reshape(-1).to(torch.long))
        elif isinstance(item, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            out.append(torch.tensor(item, dtype=torch.long, device="cpu"))
        else:
            return None
    return out


def calibration_batches(calib_data, tokenizer, config: QuantConfig) -> torch.Tensor:
    """Any accepted calib_data (CALIB_DATA_FORMS) -> LongTensor [n, seq_len] of token ids.

    A LongTensor [n, L] is used as it is. Sequences of equal length are stacked (at most n_calib);
    sequences of different lengths, and text, are joined into one stream and cut into n_calib
    windows of calib_seq_len tokens.
    """
    if calib_data is None:
        if tokenizer is None:
            raise ValueError(f"method {config.method!r} calibrates: pass calib_data or a tokenizer "
                             "(without calib_data the embedded corpus is tokenized with it)")
        from bisup.eval.data import calibration_batches as embedded_batches

        return embedded_batches(tokenizer, config.n_calib, config.calib_seq_len)
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dtype != torch.long or calib_data.dim() != 2 or calib_data.shape[0] == 0:
            raise ValueError(f"calib_data: a tensor must be a LongTensor [n, seq_len] with n >= 1, got "
                             f"{calib_data.dtype} {tuple(calib_data.shape)}")
        return calib_data
    if isinstance(calib_data, str) or (isinstance(calib_data, (list, tuple)) and calib_data
                                       and all(isinstance(t, str) for t in calib_data)):
        if tokenizer is None:
            raise ValueError("calib_data is text: pass the model's tokenizer too")
        text = calib_data if isinstance(calib_data, str) else "\n\n".join(calib_data)
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long, device="cpu")
        return _windows(ids, config, "the calibration text")
    seqs = _token_sequences(calib_data) if isinstance(calib_data, (list, tuple)) and calib_data else None
    if seqs is None:
        raise ValueError(f"calib_data: got {_describe(calib_data)}; expected one of: " + "; ".join(CALIB_DATA_FORMS))
    lengths = {s.numel() for s in seqs}
    if len(lengths) == 1 and lengths != {0}:
        return torch.stack(seqs[: config.n_calib])
    return _windows(torch.cat(seqs), config, f"the {len(seqs)} token sequences")


def _describe(x) -> str:
    if isinstance(x, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in x})
        return f"a {type(x).__name__} of {len(x)} items ({', '.join(kinds) or 'empty'})"
    return f"a {type(x).__name__}"


# ------------------------------------------------------------------------------------------------
# real mode
# ------------------------------------------------------------------------------------------------
def check_real(config: QuantConfig, model: Optional[nn.Module] = None) -> None:
    """NotImplementedError saying why config (on model) cannot run on the real kernels."""
    unsupported = []
    if config.a_convention != BISUP_ACTS and config.quantizes_activations:
        unsupported.append(f"a_convention={config.a_convention!r} is an engine's activation quantizer, not bisup's "
                           "kernels' (export the model: bisup.export)")
    if config.w_bits not in GEMM_BITS or config.a_bits not in GEMM_BITS:
        unsupported.append(f"w_bits/a_bits must be {' or '.join(map(str, GEMM_BITS))} (got {config.w_bits}/{config.a_bits})")
    if not (config.w_sym and config.a_sym):
        unsupported.append("weights and activations must be symmetric")
    if config.w_group_size != config.a_group_size:
        unsupported.append(f"w_group_size must equal a_group_size (got {config.w_group_size}/{config.a_group_size})")
    elif config.w_group_size != -1 and config.w_group_size % 32:
        unsupported.append(f"the group size must be -1 or a multiple of 32 (got {config.w_group_size})")
    if config.method == "atom" and config.atom_outlier_bits != 8:
        unsupported.append(f"Atom outliers run as INT8 (got atom_outlier_bits={config.atom_outlier_bits})")
    if config.quantizes_kv:
        if config.kv_bits not in KV_BITS:
            unsupported.append(f"kv_bits must be one of {list(KV_BITS)} or 16 (got {config.kv_bits})")
        if config.kv_sym or config.kv_clip != 1.0:
            unsupported.append(f"the KV cache is asymmetric and unclipped (got kv_sym={config.kv_sym}, "
                               f"kv_clip={config.kv_clip})")
    if model is not None:
        unsupported += _model_limits(config, model)
    if unsupported:
        raise NotImplementedError("mode='real': " + "; ".join(unsupported) + ". Use mode='fake'.")


def _model_limits(config: QuantConfig, model: nn.Module) -> list:
    """What the real kernels cannot do on this model with config."""
    from bisup.nn import MixedPrecisionKVCache

    adapter = get_adapter(model)
    out = []
    if config.method == "atom":
        k = config.outlier_count(adapter.hidden_size)
        if k % 16:
            out.append(f"the Atom outlier count must be a multiple of 16 (got {k}; set atom_outliers)")
    if config.quantizes_kv:
        g = config.kv_group_size
        if g != -1 and (g % 8 or adapter.head_dim % g):
            out.append(f"kv_group_size must be -1 or a multiple of 8 dividing head_dim={adapter.head_dim} (got {g})")
        try:
            MixedPrecisionKVCache(config=model.config)
        except ValueError as err:
            out.append(f"KV cache: {err}")
    return out


def check_engine_activations(config: QuantConfig, model: nn.Module) -> None:
    """ValueError when an engine's activation quantizer (config.a_convention) cannot take this model's
    linears: its groups must divide every input width (the format has no shorter last group)."""
    if config.a_convention == BISUP_ACTS or not config.quantizes_activations:
        return
    widths = sorted({m.in_features for _, m in get_adapter(model).named_linears() if isinstance(m, nn.Linear)})
    ragged = [k for k in widths if k % effective_group(k, config.a_group_size)]
    if ragged:
        raise ValueError(f"QuantConfig.a_convention={config.a_convention!r}: a_group_size={config.a_group_size} does "
                         f"not divide the input widths {ragged} (the engine's activation groups have no shorter "
                         "last group); use a divisor of every width, or -1 (per token)")


def act_clip_of(fq: FakeQuantLinear, config: QuantConfig) -> float:
    """The linear's own activation clip ratio (BiSup learns one per linear), else config.a_clip."""
    aq = fq.act_quantizer
    if aq is None:
        return config.a_clip
    return float(aq.clip)


def layer_to_real(adapter, layer: nn.Module, config: QuantConfig) -> None:
    """Swap the layer's FakeQuantLinears for QuantLinears with the same codes (others stay)."""
    from bisup.nn.real_linear import fake_to_real

    for name in adapter.linear_names():
        fq = adapter.get_linear(layer, name)
        if isinstance(fq, FakeQuantLinear):
            adapter.set_linear(layer, name, fake_to_real(fq, config.a_bits, act_clip_of(fq, config)))


def to_real(model: nn.Module, adapter, config: QuantConfig) -> None:
    """Swap every FakeQuantLinear for a bisup.nn.QuantLinear running the integer GEMM, with the
    same integer codes and scales (so GPTQ / Atom / QuaRot weights carry over exactly), and, when
    the KV cache is quantized, switch attention to MixedPrecisionKVCache + bisup.ops.attention."""
    from bisup.nn import enable_real_kv

    check_real(config, model)
    for layer in adapter.layers():
        layer_to_real(adapter, layer, config)
    if config.quantizes_kv:
        enable_real_kv(model, adapter)


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None, calib_data=None, tokenizer=None,
                   progress: bool = True, device=None, offload_activations: bool = False) -> nn.Module:
    """Quantize a transformers causal LM in place with config.method and return it.

    calib_data: see CALIB_DATA_FORMS (None: the embedded corpus's calibration slice, tokenized with
    `tokenizer`); methods that do not calibrate (RTN, QuaRot without GPTQ) ignore it.
    mode="real": decoder linears become QuantLinear (integer GEMM); with kv_bits < 16, attention
    runs bisup.ops.attention on a MixedPrecisionKVCache (bisup.make_cache; forward and generate
    create one when none is passed).

    The model stays on its device and in its dtype (e.g. bf16 in CPU RAM): each decoder layer is
    moved to `device` (default: where it is), computed in float32 there and written back
    (bisup.methods.placement). offload_activations=True keeps calibration activations on the CPU
    between layers. With mode="real" each layer becomes real as soon as it is quantized, so the
    model never holds every layer's fake-quant weights and codes at once.
    """
    from bisup.methods import get_method

    config = config or QuantConfig()
    if getattr(model, "bisup_config", None) is not None:
        raise ValueError("this model is already quantized by bisup; quantize a fresh copy")
    adapter = get_adapter(model)
    method = get_method(config.method)
    if config.mode == "real":
        check_real(config, model)  # fail before the (possibly long) calibration
    check_engine_activations(config, model)
    if config.bisup is not None and method.bisup_base is None:
        raise ValueError(f"QuantConfig.bisup: method {config.method!r} has no BiSup integration")
    calibrates = method.calibrates(config) or config.bisup is not None
    calib = calibration_batches(calib_data, tokenizer, config) if calibrates else None
    finish = (lambda layer: layer_to_real(adapter, layer, config)) if config.mode == "real" else None
    placement = Placement.for_model(model, device, offload_activations, finish)
    torch.manual_seed(config.seed)
    if config.bisup is not None:  # BiSup's layer loop wraps the base method's per-layer quantizer
        from bisup.methods.bisup import apply as bisup_apply

        bisup_apply(model, adapter, config, calib, method.bisup_base, progress=progress, placement=placement)
    else:
        method.apply(model, adapter, config, calib, progress=progress, placement=placement)
    if config.mode == "real":
        to_real(model, adapter, config)
    model.bisup_config = config
    return model
