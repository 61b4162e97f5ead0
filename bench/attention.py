"""Decode attention over a mixed-precision KV cache vs torch SDPA on an FP16 cache.

GPU (the issue's setting): B in {1, 16}, context in {1k, 4k, 16k, 32k}, Hq=32, Hkv=8, D=128,
a 256-token FP16 prompt segment, the rest 4-bit (and 8-bit) KV; one query token. Also one
prefill row (Tq = context = 4096), where bisup falls back to dequantize + SDPA, to state what
that fallback costs. On CPU (`--cpu`, or no GPU) the decode case of the CPU twin: B=1, Hq=32,
Hkv=8, D=128, a 256-token FP16 prompt segment + 4-bit KV, context 4k and 16k, against torch SDPA
in fp32 on the full-precision K/V of the same length. Prints a table; `--json PATH` writes the
rows, `--md PATH` a markdown table.

    python bench/attention.py [--json out.json] [--md out.md] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bisup
from bisup import ops

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info  # noqa: E402


def kv_bytes_per_token(hkv: int, d: int, bits: int, groups: int = 1) -> int:
    """Bytes of K+V for one token of one layer."""
    if bits == 16:
        return 2 * hkv * d * 2
    return 2 * hkv * (d * bits // 8 + 4 * groups)  # codes + fp16 scale + fp16 zero per group


def timeit(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(b, ctx, tq, hq, hkv, d, prompt, bits, device, dtype, warmup, iters, sdpa_dtype=None) -> dict:
    """sdpa_dtype: the dtype torch SDPA runs in on the full-precision K/V (default: dtype)."""
    sdpa_dtype = sdpa_dtype or dtype
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, tq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, ctx, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, ctx, d, device=device, dtype=dtype, generator=gen)
    kp, vp = k[:, :, :prompt].contiguous(), v[:, :, :prompt].contiguous()
    kq = ops.kv_quantize(k[:, :, prompt:].contiguous(), bits)
    vq = ops.kv_quantize(v[:, :, prompt:].contiguous(), bits)
    causal = tq > 1

    def ours():
        return ops.attention(q, kp, vp, *kq, *vq, kv_bits=bits, causal=causal)

    qs, ks_, vs_ = q.to(sdpa_dtype), k.to(sdpa_dtype), v.to(sdpa_dtype)

    def sdpa():
        return F.scaled_dot_product_attention(qs, ks_, vs_, is_causal=causal, enable_gqa=hq != hkv)

    # sanity: ours == SDPA over the dequantized cache
    kd = torch.cat([kp.float(), ops.kv_dequantize(*kq, bits, out_dtype=torch.float32)], 2)
    vd = torch.cat([vp.float(), ops.kv_dequantize(*vq, bits, out_dtype=torch.float32)], 2)
    ref = F.scaled_dot_product_attention(q.float(), kd, vd, is_causal=causal, enable_gqa=hq != hkv)
    err = (ours().float() - ref.float()).abs().max().item()
    del kd, vd, ref
    t_ours = timeit(ours, device, warmup, iters)
    t_sdpa = timeit(sdpa, device, warmup, iters)
    return {
        "batch": b, "context": ctx, "tq": tq, "prompt_fp16": prompt, "kv_bits": bits, "hq": hq, "hkv": hkv, "head_dim": d,
        "path": "cpu twin" if device.type == "cpu" else "fused decode" if tq <= 16 else "prefill fallback (dequant + SDPA)",
        "ms_bisup": round(t_ours, 4), "ms_sdpa": round(t_sdpa, 4), "sdpa_dtype": str(sdpa_dtype).replace("torch.", ""),
        "speedup": round(t_sdpa / t_ours, 3),
        "kv_bytes_per_token_bisup": kv_bytes_per_token(hkv, d, bits),
        "kv_bytes_per_token_fp16": kv_bytes_per_token(hkv, d, 16),
        "max_abs_err_vs_dequant_sdpa": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--md", help="write a markdown table here")
    ap.add_argument("--cpu", action="store_true", help="run the CPU decode benchmark")
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available() and bisup.has_cuda_kernels() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        hq, hkv, d, prompt, dtype, warmup, iters = 32, 8, 128, 256, torch.float16, 5, 30
        cases = [(b, ctx, 1, bits) for bits in (4, 8) for b in (1, 16) for ctx in (1024, 4096, 16384, 32768)]
        cases += [(1, 4096, 4096, 4)]  # prefill: the fallback's cost
        where = torch.cuda.get_device_name()
        sdpa_dtype = dtype
    else:
        hq, hkv, d, prompt, dtype, warmup, iters = 32, 8, 128, 256, torch.float16, 3, 15
        sdpa_dtype = torch.float32
        cases = [(1, ctx, 1, 4) for ctx in (4096, 16384)]
        where = f"CPU ({cpu_info()[0]}, {torch.get_num_threads()} threads)"
    rows = [run_case(b, ctx, tq, hq, hkv, d, prompt, bits, device, dtype, warmup, iters, sdpa_dtype)
            for b, ctx, tq, bits in tqdm(cases, desc="attention bench")]

    title = (f"bisup.ops.attention ({str(dtype).replace('torch.', '')} q and prompt, {rows[0]['kv_bits']}-bit KV) vs "
             f"torch SDPA in {str(sdpa_dtype).replace('torch.', '')} on the full-precision K/V of the same length, "
             f"on {where}")
    print("\n" + title)
    head = (f"{'B':>3} {'ctx':>6} {'Tq':>5} {'bits':>4} {'bisup ms':>10} {'SDPA ms':>10} {'speedup':>8} "
            f"{'KV B/tok':>9} {'fp16 B/tok':>10} {'max err':>9}  path")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['batch']:>3} {r['context']:>6} {r['tq']:>5} {r['kv_bits']:>4} {r['ms_bisup']:>10.4f} "
              f"{r['ms_sdpa']:>10.4f} {r['speedup']:>7.2f}x {r['kv_bytes_per_token_bisup']:>9} "
              f"{r['kv_bytes_per_token_fp16']:>10} {r['max_abs_err_vs_dequant_sdpa']:>9.2e}  {r['path']}")
    if args.md:
        cols = ["batch", "context", "tq", "prompt_fp16", "kv_bits", "hq", "hkv", "head_dim", "ms_bisup", "ms_sdpa",
                "sdpa_dtype", "speedup", "kv_bytes_per_token_bisup", "max_abs_err_vs_dequant_sdpa"]
        with open(args.md, "w") as f:
            f.write(f"# {title}\n\ntorch {torch.__version__}; 'speedup' = SDPA time / bisup time, medians of "
                    f"{iters} calls\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for r in rows:
                f.write("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |\n")
        print(f"wrote {args.md}")
    if args.json:
        meta = {"device": where, "torch": torch.__version__, "ran_on": device.type, "dtype": str(dtype),
                "sdpa_dtype": str(sdpa_dtype)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
