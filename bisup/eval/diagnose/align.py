"""What a quantized model is compared with: the full-precision computation in the quantized model's bases.

Methods that rotate (QuaRot: the residual stream by a randomized Hadamard Q, V heads by a head_dim
Hadamard, the down_proj input online) leave hidden states and some linear inputs/outputs in other
bases than the FP model's, so h_q - h_fp means nothing there. The reference of such a model is its
*unquantized twin*: a copy of the FP model put through the same method with every bit width at 16
(`QuantConfig.replace(w_bits=16, a_bits=16, kv_bits=16, ...)`, public API). The twin computes the FP
function (checked: its NLL must match the FP model's) with exactly the transforms of the quantized
model (checked: its embedding matrix must equal the quantized model's), so every difference is
quantization error. Methods that keep every basis (RTN, GPTQ, Atom: Atom's reorder lives inside a
linear) and models bisup did not quantize are compared with the FP model itself.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from bisup.models.adapters import get_adapter

BASIS_KEEPING = ("rtn", "gptq", "atom")
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
EMBED_RTOL = 1e-3


def check_compatible(fp_model: nn.Module, model: nn.Module, name: str) -> None:
    """ValueError naming every mismatch when `model` cannot be compared with `fp_model`."""
    a, b = get_adapter(fp_model), get_adapter(model)
    diffs = [f"{f}: FP {getattr(a, f)} vs {getattr(b, f)}" for f in SHAPE_FIELDS if getattr(a, f) != getattr(b, f)]
    va, vb = a.embeddings().weight.shape[0], b.embeddings().weight.shape[0]
    if va != vb:
        diffs.append(f"vocabulary: FP {va} vs {vb}")
    if diffs:
        raise ValueError(f"diagnose: model {name!r} does not have the FP model's architecture ({'; '.join(diffs)}); "
                         "compare a quantized model only with the FP model it was quantized from")


def check_tokenizers(fp_tok, other_tok, name: str) -> None:
    """ValueError when two tokenizers differ (None on either side: nothing to compare)."""
    if fp_tok is None or other_tok is None:
        return
    va = fp_tok.get_vocab() if hasattr(fp_tok, "get_vocab") else None
    vb = other_tok.get_vocab() if hasattr(other_tok, "get_vocab") else None
    if va != vb:
        n = len(set(va or {}) ^ set(vb or {}))
        raise ValueError(f"diagnose: model {name!r} has another tokenizer than the FP model "
                         f"({len(va or {})} vs {len(vb or {})} tokens, {n} differ); the token ids would not mean the same")


def unquantized_config(config):
    """config with every quantizer off (the same transforms, nothing rounded)."""
    return config.replace(w_bits=16, a_bits=16, kv_bits=16, atom_outlier_bits=16, gptq=False, mode="fake",
                          prompt_len=0)


@torch.no_grad()
def reference_for(fp_model: nn.Module, model: nn.Module, calib_ids: torch.Tensor, name: str
                  ) -> Tuple[nn.Module, str]:
    """(reference model, what it is) for `model`; see the module doc."""
    import bisup

    config = getattr(model, "bisup_config", None)
    if config is None:
        ref, what = fp_model, "the FP model (not a bisup-quantized model)"
    elif config.method in BASIS_KEEPING:
        ref, what = fp_model, f"the FP model ({config.method} keeps every basis)"
    else:
        ref = copy.deepcopy(fp_model)
        bisup.quantize_model(ref, unquantized_config(config), calib_data=calib_ids, progress=False)
        what = f"the FP model transformed by {config.method} without quantization (unquantized twin)"
    _check_same_embeddings(ref, model, name)
    return ref, what


def _check_same_embeddings(ref: nn.Module, model: nn.Module, name: str) -> None:
    e_ref = get_adapter(ref).embeddings().weight.detach().float()
    e_q = get_adapter(model).embeddings().weight.detach().float().to(e_ref.device)
    scale = float(e_ref.abs().max().clamp_min(1e-30))
    diff: Optional[float] = float((e_ref - e_q).abs().max()) / scale if e_ref.shape == e_q.shape else None
    if diff is None or diff > EMBED_RTOL:
        raise ValueError(
            f"diagnose: the embeddings of {name!r} differ from its reference's (max relative difference "
            f"{diff if diff is not None else 'shape'}): it was not quantized from this FP model, or its method "
            "transforms the residual stream in a way its unquantized twin does not reproduce")
