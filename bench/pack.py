"""Throughput of the packing / quantize kernels against a torch copy of the same bytes.

    python bench/pack.py [--device cuda|cpu] [--json out.json]

GB/s counts bytes read + bytes written by each op; the ratio column is ours / torch copy
(a copy moving the same number of bytes is the memory-bound ceiling).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, print_table, time_fn, write_json  # noqa: E402

from bisup import ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    big = dev.type == "cuda"
    rows_, k = (16384, 4096) if big else (1024, 4096)
    g = torch.Generator(device="cpu").manual_seed(0)
    q4 = torch.randint(-8, 8, (rows_, k), generator=g, dtype=torch.int8).to(dev)
    q3 = torch.randint(-4, 4, (rows_, k), generator=g, dtype=torch.int8).to(dev)
    x16 = torch.randn(rows_, k, generator=g).to(dev, torch.float16)
    p4, p3 = ops.pack_int4(q4), ops.pack_int3(q3)
    qa, sa, _ = ops.quantize_pack(x16, 4, 128)

    cases = [
        ("pack_int4", lambda: ops.pack_int4(q4), q4.numel() + p4.numel()),
        ("unpack_int4", lambda: ops.unpack_int4(p4), q4.numel() + p4.numel()),
        ("pack_int3", lambda: ops.pack_int3(q3), q3.numel() + p3.numel()),
        ("unpack_int3", lambda: ops.unpack_int3(p3), q3.numel() + p3.numel()),
        ("quantize_pack fp16 g128", lambda: ops.quantize_pack(x16, 4, 128), x16.numel() * 2 + qa.numel() + sa.numel() * 2),
        ("quantize_pack fp16 row", lambda: ops.quantize_pack(x16, 4, -1), x16.numel() * 2 + qa.numel() + rows_ * 2),
        ("dequantize -> fp16 g128", lambda: ops.dequantize(qa, sa, None, 128), x16.numel() * 2 + qa.numel() + sa.numel() * 2),
    ]
    results = []
    for name, fn, nbytes in cases:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_ours = time_fn(fn, dev)
        t_copy = time_fn(lambda: dst.copy_(src), dev)
        results.append({
            "op": name, "shape": f"{rows_}x{k}", "us": t_ours * 1e6, "GB/s": nbytes / t_ours / 1e9,
            "copy GB/s": nbytes / t_copy / 1e9, "ours/copy": t_copy / t_ours,
        })
    print(f"bisup pack/quantize throughput on {device_name(dev)}")
    print_table(results, ["op", "shape", "us", "GB/s", "copy GB/s", "ours/copy"])
    write_json(args.json, {"bench": "pack", "device": device_name(dev), "torch": torch.__version__,
                           "date": datetime.date.today().isoformat(), "results": results})


if __name__ == "__main__":
    main()
