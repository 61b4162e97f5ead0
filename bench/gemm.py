"""bisup.ops.gemm (W4A4 / W3A3, group 128) against torch on the same device, in one run.

    python bench/gemm.py [--device cuda|cpu] [--json out.json] [--w-bits 4,3]

CUDA: Llama-2-7B / Llama-3-8B linear shapes (N x K = 4096x4096, 11008x4096, 4096x11008,
14336x4096, 4096x14336) for M in {1, 16, 64, 256, 1024, 4096}; columns: our GEMM, the activation
quantize_pack alone, torch bf16 matmul (cuBLAS) and torch._int_mm (INT8 cuBLAS, where it accepts
the shape); TOPS = 2*M*N*K / time; speedups are torch time / our GEMM time.
CPU (--device cpu): Llama-2-7B shapes (4096x4096, 11008x4096, 4096x11008), M in {1, 16, 64, 256,
512}, against torch fp32 and bf16 matmul on this machine's threads, in the same run; the CPU path
(bisup.ops.cpu_gemm_isa(), BISUP_CPU_GEMM_ISA forces one); at M = 1 also the bandwidth our GEMM
reaches (packed weight + scales per call) as a fraction of a large tensor copy's (read + write
bytes per second) measured in the same run. --md writes the table with the CPU model and flags.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info, device_name, print_table, time_fn, write_json  # noqa: E402

from bisup import ops  # noqa: E402

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K)
GPU_MS = [1, 16, 64, 256, 1024, 4096]
CPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CPU_MS = [1, 16, 64, 256, 512]
GROUP = 128


def make_weights(n, k, w_bits, dev, gen):
    """Packed low-bit weight + scales, a dense weight in the torch dtype, and an INT8 one."""
    gpu = dev.type == "cuda"
    q = torch.randint(-(1 << (w_bits - 1)), 1 << (w_bits - 1), (n, k), generator=gen, device=dev, dtype=torch.int8)
    w_q = ops.pack_int4(q) if w_bits == 4 else ops.pack_int3(q)
    w_scale = (torch.rand(n, k // GROUP, generator=gen, device=dev) * 0.01 + 0.001).half()
    dense = torch.randn(n, k, generator=gen, device=dev, dtype=torch.bfloat16 if gpu else torch.float32)
    w8 = torch.randint(-128, 128, (k, n), generator=gen, device=dev, dtype=torch.int8) if gpu else dense.bfloat16()
    return w_q, w_scale, dense, w8  # CPU: w8 is the bf16 copy of the dense weight


def bench_case(m, n, k, w_bits, weights, dev, gen, min_time):
    gpu = dev.type == "cuda"
    w_q, w_scale, w_dense, w8 = weights
    x = torch.randn(m, k, generator=gen, device=dev, dtype=w_dense.dtype)
    a_q, a_scale, _ = ops.quantize_pack(x, w_bits, GROUP)
    kw = dict(a_bits=w_bits, w_bits=w_bits, group_size=GROUP, out_dtype=x.dtype)
    t_gemm = time_fn(lambda: ops.gemm(a_q, a_scale, w_q, w_scale, **kw), dev, min_time_s=min_time)
    t_quant = time_fn(lambda: ops.quantize_pack(x, w_bits, GROUP), dev, min_time_s=min_time)
    flops = 2.0 * m * n * k
    row = {"M": m, "N": n, "K": k, "W/A bits": f"W{w_bits}A{w_bits}", "gemm us": t_gemm * 1e6,
           "quant us": t_quant * 1e6, "TOPS": flops / t_gemm / 1e12}
    t_dense = time_fn(lambda: x @ w_dense.T, dev, min_time_s=min_time)
    dense_name = "bf16" if gpu else "fp32"
    row[f"{dense_name} us"] = t_dense * 1e6
    row[f"{dense_name} TFLOPS"] = flops / t_dense / 1e12
    row[f"vs {dense_name}"] = t_dense / t_gemm
    row[f"vs {dense_name} incl quant"] = t_dense / (t_gemm + t_quant)
    if not gpu:  # torch bf16 matmul on the same shape, and the bandwidth our GEMM reaches
        xb = x.bfloat16()
        t_bf16 = time_fn(lambda: xb @ w8.T, dev, min_time_s=min_time)
        row["bf16 us"] = t_bf16 * 1e6
        row["vs bf16"] = t_bf16 / t_gemm
        row["GB/s"] = (w_q.numel() + 2 * w_scale.numel()) / t_gemm / 1e9
    if gpu:
        x8 = torch.randint(-128, 128, (m, k), generator=gen, device=dev, dtype=torch.int8)
        try:
            t_int = time_fn(lambda: torch._int_mm(x8, w8), dev, min_time_s=min_time)
            row["int8 us"] = t_int * 1e6
            row["vs int8"] = t_int / t_gemm
        except RuntimeError:  # cuBLAS INT8 rejects some shapes (e.g. M <= 16)
            row["int8 us"] = None
    return row


def copy_bandwidth(dev, nbytes=1 << 29):
    """Bytes read + written per second by a large tensor copy (GB/s), the machine's practical bandwidth."""
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), dev, min_time_s=1.0)
    return 2 * nbytes / t / 1e9


def write_md(path, meta, results, cols):
    lines = [f"# bisup CPU GEMM (group {GROUP}) vs torch, {meta['date']}", "",
             f"- CPU: {meta['cpu_model']}, {meta['threads']} threads; SIMD flags: {' '.join(meta['cpu_flags'])}",
             f"- bisup path: `{meta['isa']}` (supported here: {', '.join(meta['isas'])}); torch {meta['torch']}",
             f"- large-tensor copy bandwidth (read + write): {meta['copy_GBps']:.1f} GB/s; 'GB/s' = (packed weight + "
             "scales) / GEMM time, 'of bw' = that / copy bandwidth (meaningful at M = 1)",
             "- 'vs X' = torch X matmul time / our GEMM time (activations already quantized); "
             "'incl quant' adds ops.quantize_pack of the activations", ""]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in results:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and ops.has_cuda_kernels() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="(CPU) also write the table as markdown")
    ap.add_argument("--w-bits", default="4,3", help="comma-separated weight/activation bit widths")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    shapes, ms = (GPU_SHAPES, GPU_MS) if gpu else (CPU_SHAPES, CPU_MS)
    min_time = args.min_time if args.min_time is not None else (0.05 if gpu else 0.3)
    gen = torch.Generator(device=dev).manual_seed(0)
    results = []
    bandwidth = None if gpu else copy_bandwidth(dev)
    with tqdm(total=len(args.w_bits.split(",")) * len(shapes) * len(ms), desc="gemm bench", leave=False) as bar:
        for b in (int(v) for v in args.w_bits.split(",")):
            for n, k in shapes:
                weights = make_weights(n, k, b, dev, gen)  # once per shape, shared by every M
                for m in ms:
                    results.append(bench_case(m, n, k, b, weights, dev, gen, min_time))
                    bar.update()
                del weights
                if gpu:
                    torch.cuda.empty_cache()
    dense = "bf16" if gpu else "fp32"
    cols = ["W/A bits", "M", "N", "K", "gemm us", "quant us", "TOPS", f"{dense} us", f"{dense} TFLOPS", f"vs {dense}",
            f"vs {dense} incl quant"] + (["int8 us", "vs int8"] if gpu else ["bf16 us", "vs bf16", "GB/s", "of bw"])
    meta = {"bench": "gemm", "device": device_name(dev), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "group_size": GROUP}
    if not gpu:
        for r in results:
            r["of bw"] = r["GB/s"] / bandwidth
        model, flags = cpu_info()
        meta.update(cpu_model=model, cpu_flags=flags, threads=torch.get_num_threads(), isa=ops.cpu_gemm_isa(),
                    isas=ops.cpu_gemm_isas(), copy_GBps=bandwidth)
        print(f"CPU {model}; path {meta['isa']}; copy bandwidth {bandwidth:.1f} GB/s")
    print(f"bisup gemm (group {GROUP}) vs torch on {device_name(dev)}; 'vs X' = X time / our GEMM time")
    print_table(results, cols)
    write_json(args.json, {**meta, "results": results})
    if args.md and not gpu:
        write_md(args.md, meta, results, cols)


if __name__ == "__main__":
    main()
