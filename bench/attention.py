"""Decode attention over a mixed-precision KV cache vs torch SDPA on an FP16 cache.

GPU (the issue's setting): B in {1, 16}, context in {1k, 4k, 16k, 32k}, Hq=32, Hkv=8, D=128,
a 256-token FP16 prompt segment, the rest 4-bit (and 8-bit) KV; one query token. Also one
prefill row (Tq = context = 4096), where bisup falls back to dequantize + SDPA, to state what
that fallback costs. Without a GPU it runs a small CPU version so the script can be smoke-tested,
and says so. Prints a table; `--json PATH` writes the rows.

    python bench/attention.py [--json out.json] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bisup
from bisup import ops


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


def run_case(b, ctx, tq, hq, hkv, d, prompt, bits, device, dtype, warmup, iters) -> dict:
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

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)

    # sanity: ours == SDPA over the dequantized cache
    kd = torch.cat([kp, ops.kv_dequantize(*kq, bits, out_dtype=dtype)], 2)
    vd = torch.cat([vp, ops.kv_dequantize(*vq, bits, out_dtype=dtype)], 2)
    ref = F.scaled_dot_product_attention(q, kd, vd, is_causal=causal, enable_gqa=hq != hkv)
    err = (ours().float() - ref.float()).abs().max().item()
    del kd, vd, ref
    t_ours = timeit(ours, device, warmup, iters)
    t_sdpa = timeit(sdpa, device, warmup, iters)
    return {
        "batch": b, "context": ctx, "tq": tq, "prompt_fp16": prompt, "kv_bits": bits, "hq": hq, "hkv": hkv, "head_dim": d,
        "path": "cpu twin" if device.type == "cpu" else "fused decode" if tq <= 16 else "prefill fallback (dequant + SDPA)",
        "ms_bisup": round(t_ours, 4), "ms_sdpa_fp16": round(t_sdpa, 4), "speedup": round(t_sdpa / t_ours, 3),
        "kv_bytes_per_token_bisup": kv_bytes_per_token(hkv, d, bits),
        "kv_bytes_per_token_fp16": kv_bytes_per_token(hkv, d, 16),
        "max_abs_err_vs_dequant_sdpa": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cpu", action="store_true", help="force the small CPU version")
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available() and bisup.has_cuda_kernels() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        hq, hkv, d, prompt, dtype, warmup, iters = 32, 8, 128, 256, torch.float16, 5, 30
        cases = [(b, ctx, 1, bits) for bits in (4, 8) for b in (1, 16) for ctx in (1024, 4096, 16384, 32768)]
        cases += [(1, 4096, 4096, 4)]  # prefill: the fallback's cost
        where = torch.cuda.get_device_name()
    else:
        hq, hkv, d, prompt, dtype, warmup, iters = 8, 2, 64, 64, torch.float32, 1, 3
        cases = [(b, ctx, 1, 4) for b in (1, 4) for ctx in (512, 2048)] + [(1, 256, 256, 4)]
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        print("NOTE: no CUDA GPU (or no CUDA kernels in this build): running the small CPU version "
              f"(Hq={hq}, Hkv={hkv}, D={d}, fp32), not the issue's GPU benchmark.")
    rows = [run_case(b, ctx, tq, hq, hkv, d, prompt, bits, device, dtype, warmup, iters)
            for b, ctx, tq, bits in tqdm(cases, desc="attention bench")]

    print(f"\nbisup.ops.attention vs torch SDPA on a {str(dtype).replace('torch.', '')} cache of the same length, on {where}")
    head = (f"{'B':>3} {'ctx':>6} {'Tq':>5} {'bits':>4} {'bisup ms':>10} {'SDPA ms':>10} {'speedup':>8} "
            f"{'KV B/tok':>9} {'fp16 B/tok':>10} {'max err':>9}  path")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['batch']:>3} {r['context']:>6} {r['tq']:>5} {r['kv_bits']:>4} {r['ms_bisup']:>10.4f} "
              f"{r['ms_sdpa_fp16']:>10.4f} {r['speedup']:>7.2f}x {r['kv_bytes_per_token_bisup']:>9} "
              f"{r['kv_bytes_per_token_fp16']:>10} {r['max_abs_err_vs_dequant_sdpa']:>9.2e}  {r['path']}")
    if args.json:
        meta = {"device": where, "torch": torch.__version__, "ran_on": device.type, "dtype": str(dtype)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
