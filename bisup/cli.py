"""The `bisup` command: quantize, eval, generate.

  bisup quantize --model default|PATH --method rtn|gptq|atom|quarot --w-bits 4 --a-bits 4 --kv-bits 4 \\
                 --group-size 64 --save DIR [--eval] [--json FILE]
  bisup eval     --model DIR|default|PATH [--dataset embedded|wikitext2|c4] [--seq-len 512] [--windows 8] [--json FILE]
  bisup generate --model DIR|default|PATH --prompt TEXT [--max-new-tokens 32]

--model: "default" (the embedded SmolLM2-135M), a directory written by `bisup quantize --save`, or a
transformers model directory. Each command prints a results table; --json also writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from bisup.config import METHODS, QuantConfig


# ------------------------------------------------------------------------------------------------
# model loading
# ------------------------------------------------------------------------------------------------
def load_any(spec: str, device: str = "cpu") -> Tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, kind) for "default", a bisup-quantized dir, or a transformers dir."""
    from bisup.api import CONFIG_FILE, load_quantized

    if spec == "default":
        from bisup.models.default import load_default_model

        model, tok = load_default_model(device=device)
        return model, tok, "default"
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"bisup: --model {spec!r} is neither 'default' nor a directory")
    if (path / CONFIG_FILE).is_file():
        model, tok = load_quantized(path, device=device, return_tokenizer=True)
        return model, tok, "bisup-quantized"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(path)), "transformers"


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def table(rows: List[Tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in rows)


def emit(result: dict, rows: List[Tuple[str, object]], json_path: Optional[Path]) -> None:
    print(table(rows))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"json: {json_path}")


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def config_from_args(a) -> QuantConfig:
    a_group = a.group_size if a.a_group_size is None else a.a_group_size
    return QuantConfig(w_bits=a.w_bits, a_bits=a.a_bits, kv_bits=a.kv_bits, w_group_size=a.group_size,
                       a_group_size=a_group, kv_group_size=a.kv_group_size, w_sym=not a.w_asym,
                       w_clip=a.w_clip, a_clip=a.a_clip, kv_clip=a.kv_clip, method=a.method, mode=a.mode,
                       gptq=a.gptq, atom_outliers=a.atom_outliers, rotation_seed=a.seed, prompt_len=a.prompt_len,
                       n_calib=a.n_calib, calib_seq_len=a.calib_seq_len, seed=a.seed)


def cmd_quantize(a) -> dict:
    import bisup
    from bisup.api import weight_bytes
    from bisup.eval import perplexity

    config = config_from_args(a)
    model, tok, kind = load_any(a.model, a.device)
    t = time.perf_counter()
    bisup.quantize_model(model, config, tokenizer=tok, progress=not a.no_progress)
    quant_s = time.perf_counter() - t
    sizes = weight_bytes(model)
    result = {"command": "quantize", "model": a.model, "config": config.to_dict(), "quantize_s": quant_s,
              "weights": sizes}
    rows = [("model", f"{a.model} ({kind})"), ("method", config.method),
            ("bits", f"W{config.w_bits}A{config.a_bits}KV{config.kv_bits}"),
            ("group size", f"w {config.w_group_size} / a {config.a_group_size}"),
            ("quantize time s", quant_s),
            ("decoder weights", f"{sizes['packed_bytes'] / 2**20:.2f} MiB packed vs {sizes['fp16_bytes'] / 2**20:.2f} MiB FP16")]
    if a.eval:
        t = time.perf_counter()
        ppl = perplexity(model, tok, a.dataset, a.seq_len, a.windows, progress=not a.no_progress)
        result.update(perplexity=ppl, dataset=a.dataset, eval_tokens=a.seq_len * a.windows,
                      eval_s=time.perf_counter() - t)
        rows.append((f"perplexity ({a.dataset}, {a.windows}x{a.seq_len})", ppl))
    if a.save is not None:
        bisup.save_quantized(model, a.save, tokenizer=tok)
        result["saved"] = str(a.save)
        rows.append(("saved to", str(a.save)))
    emit(result, rows, a.json)
    return result


def cmd_eval(a) -> dict:
    from bisup.eval import perplexity

    model, tok, kind = load_any(a.model, a.device)
    if tok is None:
        raise SystemExit(f"bisup eval: {a.model} has no tokenizer")
    t = time.perf_counter()
    ppl = perplexity(model, tok, a.dataset, a.seq_len, a.windows, progress=not a.no_progress)
    eval_s = time.perf_counter() - t
    cfg = getattr(model, "bisup_config", None)
    result = {"command": "eval", "model": a.model, "kind": kind, "dataset": a.dataset, "seq_len": a.seq_len,
              "windows": a.windows, "perplexity": ppl, "eval_s": eval_s,
              "config": None if cfg is None else cfg.to_dict()}
    label = "FP" if cfg is None else f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}KV{cfg.kv_bits}"
    emit(result, [("model", f"{a.model} ({kind}, {label})"), ("dataset", f"{a.dataset}, {a.windows}x{a.seq_len} tokens"),
                  ("perplexity", ppl), ("eval time s", eval_s)], a.json)
    return result


@torch.no_grad()
def cmd_generate(a) -> dict:
    model, tok, kind = load_any(a.model, a.device)
    if tok is None:
        raise SystemExit(f"bisup generate: {a.model} has no tokenizer")
    if a.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = a.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(a.device)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    gen_s = time.perf_counter() - t
    new = out[0, ids.shape[1]:]
    completion = tok.decode(new, skip_special_tokens=True)
    print(a.prompt + completion)
    result = {"command": "generate", "model": a.model, "prompt": a.prompt, "completion": completion,
              "new_tokens": int(new.numel()), "generate_s": gen_s}
    emit(result, [("new tokens", int(new.numel())), ("tokens/s", new.numel() / max(gen_s, 1e-9))], a.json)
    return result


# ------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------
def _add_common(p, eval_opts: bool = True) -> None:
    p.add_argument("--model", default="default", help="'default', a bisup-quantized dir, or a transformers dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    if eval_opts:
        p.add_argument("--dataset", default="embedded", choices=["embedded", "wikitext2", "c4"])
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--windows", type=int, default=8, help="evaluation windows of --seq-len tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bisup", description="W4A4 / W3A3 LLM quantization")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (and save it)")
    _add_common(q)
    q.add_argument("--method", default="rtn", choices=list(METHODS))
    q.add_argument("--mode", default="fake", choices=["fake", "real"])
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--a-bits", type=int, default=4)
    q.add_argument("--kv-bits", type=int, default=16, help="16 = KV cache not quantized")
    q.add_argument("--group-size", type=int, default=64, help="weight (and default activation) group size; -1 = per channel")
    q.add_argument("--a-group-size", type=int, default=None, help="activation group size (default: --group-size); -1 = per token")
    q.add_argument("--kv-group-size", type=int, default=-1)
    q.add_argument("--w-asym", action="store_true", help="asymmetric weights")
    q.add_argument("--w-clip", type=float, default=1.0)
    q.add_argument("--a-clip", type=float, default=1.0)
    q.add_argument("--kv-clip", type=float, default=1.0)
    q.add_argument("--gptq", action="store_true", help="GPTQ weights under atom / quarot")
    q.add_argument("--atom-outliers", type=int, default=None)
    q.add_argument("--prompt-len", type=int, default=0, help="system-prompt tokens kept FP16 in the KV cache")
    q.add_argument("--n-calib", type=int, default=32)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval", action="store_true", help="also report perplexity of the quantized model")
    q.add_argument("--save", type=Path, default=None, help="directory to save the quantized model to")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model")
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy generation")
    _add_common(g, eval_opts=False)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, NotImplementedError, ModuleNotFoundError, FileNotFoundError, RuntimeError) as err:
        print(f"bisup {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
