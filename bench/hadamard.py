"""Fast Hadamard transform (bisup.ops.hadamard) vs a dense torch matmul by the same matrix.

    python bench/hadamard.py [--device cuda|cpu] [--json out.json]

For each width n (powers of two, Paley bases, the Llama/Qwen widths incl. the random-base 13696 on CUDA):
time of y = hadamard(x, base) and of y = x @ H^T with H = hadamard_matrix(n) materialised, same
dtype (fp16 on CUDA, fp32 on CPU). GB/s counts x read + y written; "speedup" = dense / ours.
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
from bisup.rotation import hadamard_base, hadamard_factors, hadamard_matrix  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    # the dense matrix is built in float64 on the host first (n^2 * 8 bytes), so widths stay <= 14336
    widths = [576, 1536, 4096, 11008, 13696, 14336] if cuda else [576, 1536, 4096]
    results = []
    for n in widths:
        rows = (16384 if n <= 4096 else 4096) if cuda else (256 if n <= 4096 else 32)
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(dev, dtype)
        base = hadamard_base(n, device=dev)
        base = base if base.shape[0] > 1 else None
        h = hadamard_matrix(n, dtype=dtype, device=dev)
        ours = lambda: ops.hadamard(x, base)  # noqa: E731
        dense = lambda: x @ h.T  # noqa: E731
        err = (ours().float() - dense().float()).abs().max().item()
        t_ours, t_dense = time_fn(ours, dev), time_fn(dense, dev)
        nbytes = 2 * x.numel() * x.element_size()
        p, m, is_had = hadamard_factors(n)
        results.append({
            "n": n, "base": f"{p}x{m}{'' if is_had else ' (random)'}", "rows": rows, "dtype": str(dtype).split(".")[-1],
            "ours us": t_ours * 1e6, "ours GB/s": nbytes / t_ours / 1e9, "dense us": t_dense * 1e6,
            "dense GB/s": nbytes / t_dense / 1e9, "speedup": t_dense / t_ours, "max|diff|": err,
        })
        del h
    print(f"bisup hadamard vs dense matmul on {device_name(dev)}")
    print_table(results, ["n", "base", "rows", "dtype", "ours us", "ours GB/s", "dense us", "dense GB/s", "speedup",
                          "max|diff|"])
    write_json(args.json, {"bench": "hadamard", "device": device_name(dev), "torch": torch.__version__,
                           "date": datetime.date.today().isoformat(), "results": results})


if __name__ == "__main__":
    main()
