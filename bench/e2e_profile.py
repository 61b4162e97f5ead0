"""Where real-mode time goes: torch.profiler over prefill + greedy decode on the embedded default.

  python bench/e2e_profile.py [--prefill 512] [--decode 64] [--threads 2] [--json FILE]

Prints, for prefill and decode separately, wall time and self CPU time per op category (bisup
kernels, the aten ops around them) and the remainder (Python and dispatch overhead: wall time not
spent inside any op), then the top ops.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import REAL_CONFIG, _prompt_ids  # noqa: E402

CATEGORIES = (
    ("gemm", ("bisup::gemm",)),
    ("act quantize", ("bisup::quantize_pack",)),
    ("attention", ("bisup::attention",)),
    ("hadamard", ("bisup::hadamard",)),
    ("kv quantize", ("bisup::kv_quantize",)),
    ("kv dequantize", ("bisup::kv_dequantize",)),
    ("copies (cat/copy/contiguous/pad/index)", ("aten::cat", "aten::copy_", "aten::index", "aten::constant_pad_nd",
                                                "aten::clone", "aten::contiguous", "aten::index_select", "aten::to")),
    ("matmul (rotations, lm_head)", ("aten::mm", "aten::matmul", "aten::addmm", "aten::linear", "aten::bmm")),
)


def categorize(events):
    out = defaultdict(float)
    for e in events:
        name = e.key
        for cat, names in CATEGORIES:
            if name in names:
                out[cat] += e.self_cpu_time_total / 1e6
                break
        else:
            out["other aten ops"] += e.self_cpu_time_total / 1e6
    return dict(out)


def run(model, arg, ids, cache, decode):
    with torch.no_grad():
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as p1:
            out = model(ids, **{arg: cache}, use_cache=True)
        t_pre = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as p2:
            for _ in range(decode):
                out = model(nxt, **{arg: cache}, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
        t_dec = time.perf_counter() - t0
    return (t_pre, p1.key_averages()), (t_dec, p2.key_averages())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import bisup
    from bisup.models.default import load_default_model
    from bisup.nn.real_kv import cache_argument, make_cache

    model, tok = load_default_model()
    model = bisup.quantize_model(model, bisup.QuantConfig(**REAL_CONFIG), tokenizer=tok, progress=False).eval()
    arg = cache_argument(model)
    ids = torch.tensor([_prompt_ids(args.prefill)])
    with torch.no_grad():  # warm-up
        c = make_cache(model)
        model(ids[:, :16], **{arg: c}, use_cache=True)
    report = {}
    for phase, (wall, events) in zip(("prefill", "decode"), run(model, arg, ids, make_cache(model), args.decode)):
        cats = categorize(events)
        in_ops = sum(cats.values())
        cats["python / dispatch (wall - ops)"] = max(0.0, wall - in_ops)
        report[phase] = dict(wall_s=wall, categories=cats)
        n = args.prefill if phase == "prefill" else args.decode
        print(f"\n== {phase}: {wall:.3f} s wall ({n / wall:.1f} tok/s)")
        for cat, s in sorted(cats.items(), key=lambda kv: -kv[1]):
            print(f"  {cat:42s} {s:8.3f} s  {100 * s / wall:5.1f}%")
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
        print("  top ops (self CPU):")
        for e in top:
            print(f"    {e.key:40s} {e.self_cpu_time_total / 1e6:8.3f} s  calls {e.count}")
        report[phase]["top"] = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
