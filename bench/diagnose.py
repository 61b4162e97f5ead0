"""`bisup diagnose` on the embedded default (SmolLM2-135M): RTN, QuaRot+GPTQ, Atom and QuaRot + BiSup
(its defaults), W4A4 g64 KV4: the BiSup curve beside its base shows the accumulation it suppresses.

    python bench/diagnose.py [--models /tmp/bisup-models] [--out bench/results/diagnose]

Quantizes the four models with `bisup quantize` (8 calibration sequences of 512 tokens) into
--models unless they are there, then runs `bisup diagnose` on 4 held-out windows of 512 tokens
with FP system prompts of 16, 64 and 128 tokens and writes report.json / report.md / linears.md
and the PNGs to --out. The exact commands: bench/results/diagnose/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bisup.cli import main as bisup

COMMON = ["--model", "default", "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4", "--group-size", "64",
          "--n-calib", "8", "--eval", "--no-progress"]
MODELS = {
    "rtn-w4a4kv4-g64": ["--method", "rtn"],
    "quarot-gptq-w4a4kv4-g64": ["--method", "quarot", "--gptq", "--a-clip", "0.9"],
    "atom-w4a4kv4-g64": ["--method", "atom"],
    "quarot-bisup-w4a4kv4-g64": ["--method", "quarot", "--a-clip", "0.9", "--bisup"],
}


def run(argv) -> None:
    print("+ bisup " + " ".join(argv), flush=True)
    if bisup(argv) != 0:
        sys.exit(f"bisup {argv[0]} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/bisup-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diagnose")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    for name, args in MODELS.items():
        target = a.models / name
        if not target.is_dir():
            run(["quantize", *COMMON, *args, "--save", str(target), "--json", str(a.models / f"{name}.json")])
    run(["diagnose", "--model", "default", "--compare", *[str(a.models / n) for n in MODELS],
         "--seq-len", str(a.seq_len), "--windows", str(a.windows), "--system-prompt", "16", "64", "128",
         "--out", str(a.out), "--no-progress"])


if __name__ == "__main__":
    main()
