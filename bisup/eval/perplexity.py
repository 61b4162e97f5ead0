"""Perplexity over non-overlapping windows of held-out text, optionally behind a system prompt.

Without a system prompt every window is run on its own. With one (BiSup's horizontal-suppression
protocol) every window is preceded by the same system prompt and only the window's own next-token
predictions are scored (the same seq_len - 1 tokens per window as without a prompt), so rows with
and without a prompt, and with the prompt's KV kept at full precision or not, score the same tokens:

- prompt_kv="low-bit":   the prompt is run with the window, everything quantized (KV included);
- prompt_kv="kv-fp":     the prompt's KV is computed once by the quantized model with its activations
                         quantized as for every token and kept at full precision (what BiSup trains
                         behind a prompt with, QuantConfig.prompt_len = P: a tuned model sees the
                         prompt as it was trained to);
- prompt_kv="quantized": the prompt's KV is computed once by the quantized model with unquantized
                         activations and KV (weights stay quantized) and kept at full precision;
                         every window token's activations and KV are low-bit;
- prompt_kv="fp-model":  as "quantized", but the prompt's KV comes from the unquantized `fp_model`
                         (mapped into the quantized model's value basis, bisup.generation.prompt_kv).
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from bisup.eval.data import eval_tokens
from bisup.generation import prompt_kv as compute_prompt_kv, prompt_len_replaced
from bisup.nn.real_kv import cache_argument, make_cache

PROMPT_KV_MODES = ("low-bit", "kv-fp", "quantized", "fp-model")


def default_system_prompt(tokenizer) -> str:
    """The constant prefix the tokenizer's chat template puts before a user message: its default
    system message and the user turn's header (e.g. SmolLM2's "You are a helpful AI assistant ...")."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so there is no default system prompt: "
                         "pass system_prompt= as text or token ids")
    a, b = (tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False) for c in ("A", "B"))
    prefix = a[: next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
    if not prefix:
        raise ValueError("the chat template puts nothing before the user message: pass system_prompt= explicitly")
    return prefix


def system_prompt_ids(tokenizer, system_prompt: Union[str, torch.Tensor, list, None] = "default") -> torch.Tensor:
    """The system prompt as ids [1, P]: "default" (default_system_prompt), any text, or token ids."""
    if isinstance(system_prompt, str):
        if tokenizer is None:
            raise ValueError("a text system prompt needs the tokenizer")
        text = default_system_prompt(tokenizer) if system_prompt == "default" else system_prompt
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = torch.as_tensor(system_prompt, dtype=torch.long, device="cpu")  # as a tokenizer returns them
    ids = ids.reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the system prompt is empty")
    return ids


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, seq_len: int = 512, max_windows: Optional[int] = 8,
               system_ids: Optional[torch.Tensor] = None, prompt_kv: str = "quantized", fp_model=None,
               progress: bool = True) -> torch.Tensor:
    """Next-token NLL [windows, seq_len - 1] of each window's tokens 1..seq_len-1 (see the module doc)."""
    if prompt_kv not in PROMPT_KV_MODES:
        raise ValueError(f"prompt_kv={prompt_kv!r}, expected one of {PROMPT_KV_MODES}")
    if prompt_kv == "fp-model" and system_ids is not None and fp_model is None:
        raise ValueError('prompt_kv="fp-model" needs fp_model (the unquantized model)')
    tokens = tokens.flatten()
    n_windows = tokens.numel() // seq_len
    if max_windows is not None and max_windows > 0:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {tokens.numel()}")
    device = next(model.parameters()).device
    config = getattr(model, "bisup_config", None)
    was_training = model.training
    model.eval()
    p = 0 if system_ids is None else system_ids.shape[1]
    pkv = None
    if p and prompt_kv != "low-bit":
        pkv = compute_prompt_kv(model, system_ids.to(device), fp_model if prompt_kv == "fp-model" else None,
                                "quantized" if prompt_kv == "kv-fp" else "fp")
    out = torch.empty(n_windows, seq_len - 1, device="cpu")  # filled with .cpu() rows
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        ids = tokens[w * seq_len:(w + 1) * seq_len].to(device)[None]
        context = nullcontext()
        if pkv is not None:  # the window runs after the precomputed full-precision prompt KV
            cache = make_cache(model, prompt_kv=pkv)  # real mode: FP prompt segment + low-bit rest
            if cache is None:  # fake mode: the prompt in a copy of the DynamicCache, left unquantized
                cache, context = copy.deepcopy(pkv), prompt_len_replaced(model, p)
            inputs, first = ids, 0
        else:
            inputs = ids if not p else torch.cat([system_ids.to(device), ids], dim=1)
            if p:  # everything low-bit: no full-precision positions at all
                low = None if config is None else config.replace(prompt_len=0)
                cache = make_cache(model, low) if low is not None else None
                context = prompt_len_replaced(model, 0)
            else:
                cache = make_cache(model)  # real mode: a fresh mixed-precision KV cache per window
            first = p
        kw = {} if cache is None else {cache_argument(model): cache}
        with context:
            logits = model(inputs, **kw).logits[0, first:first + seq_len - 1].float()
        out[w] = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()
    model.train(was_training)
    return out


def perplexity_on_tokens(model, tokens: torch.Tensor, seq_len: int = 512, max_windows: Optional[int] = 8,
                         progress: bool = True, system_ids: Optional[torch.Tensor] = None,
                         prompt_kv: str = "quantized", fp_model=None) -> float:
    """exp(mean next-token NLL) over floor(len/seq_len) windows (at most max_windows) of a 1-D token
    tensor, each behind system_ids when given (prompt_kv / fp_model: see the module doc)."""
    nll = window_nll(model, tokens, seq_len, max_windows, system_ids, prompt_kv, fp_model, progress)
    return math.exp(float(nll.double().mean()))


def position_perplexity(nll: torch.Tensor, bucket: int = 32) -> torch.Tensor:
    """Perplexity per position bucket of window_nll's output: [ceil((seq_len - 1) / bucket)]."""
    n = nll.shape[1]
    return torch.stack([nll[:, i:i + bucket].double().mean().exp() for i in range(0, n, bucket)])


def perplexity(model, tokenizer, dataset: str = "embedded", seq_len: int = 512, max_windows: int = 8,
               progress: bool = True, system_prompt: Union[str, torch.Tensor, list, None] = None,
               prompt_kv: str = "quantized", fp_model=None) -> float:
    """Perplexity of `model` on max_windows x seq_len held-out tokens of `dataset`.

    dataset: "embedded" (held-out end of the packaged Wikipedia corpus; offline), "embedded_head" /
    "pydoc" (other held-out text, offline: bisup.eval.data), "wikitext2" or
    "c4" (through `datasets`; need the network). system_prompt: None (no prompt), "default" (the
    chat template's system message, default_system_prompt), any text, or token ids; every window
    is then preceded by it and prompt_kv says how its KV is made (module doc).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    tokens = eval_tokens(tokenizer, dataset, seq_len * max_windows)
    system_ids = None if system_prompt is None else system_prompt_ids(tokenizer, system_prompt)
    return perplexity_on_tokens(model, tokens, seq_len, max_windows, progress, system_ids, prompt_kv, fp_model)
