"""Serve a bisup compressed-tensors export with vLLM and compare its perplexity with the reference
client's (transformers + compressed-tensors) on the same token windows. Needs a GPU machine with vLLM
installed; not part of the tests (vLLM does not run on this project's CPU machines).

    python scripts/vllm_check.py --export DIR [--windows 8] [--seq-len 512] [--dtype float16] [--json OUT.json]

Tokens: the embedded corpus's held-out slice when its package is installed (the protocol of
bisup.eval.perplexity), else --text FILE tokenized with the export's tokenizer.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def window_tokens(args, tokenizer) -> torch.Tensor:
    n = args.windows * args.seq_len
    if args.text is None:
        from bisup.eval.data import eval_tokens

        return eval_tokens(tokenizer, "embedded", n)[:n]
    ids = tokenizer.encode(Path(args.text).read_text(), add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"--text {args.text}: {len(ids)} tokens, need {n}")
    return torch.tensor(ids[:n])


def vllm_perplexity(export: str, windows: torch.Tensor, dtype: str, tp: int) -> float:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=export, dtype=dtype, tensor_parallel_size=tp, max_model_len=windows.shape[1] + 8,
              enforce_eager=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in windows], params)
    nll, count = 0.0, 0
    for window, out in zip(windows.tolist(), outs):
        for pos in range(1, len(window)):  # position 0 has no prediction
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
    return math.exp(nll / count)


def client_perplexity(export: str, windows: torch.Tensor) -> float:
    from bisup.eval.perplexity import perplexity_on_tokens
    from bisup.exporters.client import load_compressed_tensors

    model = load_compressed_tensors(export)  # float32 on the CPU: the format's reference semantics
    return perplexity_on_tokens(model, windows.reshape(-1), windows.shape[1], windows.shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="a directory written by bisup.export / bisup export")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--text", default=None, help="a text file to take the windows from (default: the embedded corpus)")
    ap.add_argument("--dtype", default="float16", help="vLLM's dtype (float16 keeps bisup's fp16 scales exactly)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.export)
    windows = window_tokens(args, tok).reshape(args.windows, args.seq_len)
    result = dict(export=args.export, windows=args.windows, seq_len=args.seq_len, vllm_dtype=args.dtype,
                  client="transformers + compressed-tensors, float32, CPU",
                  tensor_parallel_size=args.tensor_parallel_size,
                  ppl_client=client_perplexity(args.export, windows),
                  ppl_vllm=vllm_perplexity(args.export, windows, args.dtype, args.tensor_parallel_size))
    result["gap_pct"] = 100.0 * (result["ppl_vllm"] - result["ppl_client"]) / result["ppl_client"]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
