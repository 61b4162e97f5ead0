"""Perplexity over non-overlapping windows of held-out text."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from bisup.eval.data import eval_tokens
from bisup.nn.real_kv import cache_argument, make_cache


@torch.no_grad()
def perplexity_on_tokens(model, tokens: torch.Tensor, seq_len: int = 512, max_windows: int = 8,
                         progress: bool = True) -> float:
    """exp(mean next-token NLL) over floor(len/seq_len) windows (at most max_windows) of a 1-D token tensor."""
    tokens = tokens.flatten()
    n_windows = tokens.numel() // seq_len
    if max_windows is not None and max_windows > 0:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {tokens.numel()}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        ids = tokens[w * seq_len:(w + 1) * seq_len].to(device)[None]
        cache = make_cache(model)  # real mode: a fresh mixed-precision KV cache per window
        kw = {} if cache is None else {cache_argument(model): cache}
        logits = model(ids, **kw).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        count += seq_len - 1
    model.train(was_training)
    return math.exp(total_nll / count)


def perplexity(model, tokenizer, dataset: str = "embedded", seq_len: int = 512, max_windows: int = 8,
               progress: bool = True) -> float:
    """Perplexity of `model` on max_windows x seq_len held-out tokens of `dataset`.

    dataset: "embedded" (held-out end of the packaged Wikipedia corpus; offline), "wikitext2" or
    "c4" (through `datasets`; need the network).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    tokens = eval_tokens(tokenizer, dataset, seq_len * max_windows)
    return perplexity_on_tokens(model, tokens, seq_len, max_windows, progress)
