"""The `bisup` command: quantize, eval, generate, diagnose, bench.

  bisup quantize --model default|PATH --method rtn|gptq|atom|quarot --w-bits 4 --a-bits 4 --kv-bits 4 \\
                 --group-size 64 --save DIR [--eval] [--json FILE]
  bisup eval     --model DIR|default|PATH [--dataset embedded|embedded_head|pydoc|wikitext2|c4] [--seq-len 512] [--windows 8] [--json FILE]
                 [--system-prompt TEXT|default [--prompt-kv low-bit|kv-fp|quantized|fp-model] [--fp-model default|PATH]]
  bisup generate --model DIR|default|PATH --prompt TEXT [--system-prompt TEXT [--fp-model default|PATH]
                 [--prompt-activations fp|quantized]]
                 [--max-new-tokens 32]
  bisup diagnose --model default|PATH --compare DIR [DIR ...] --out OUT [--system-prompt P ...]
  bisup bench    [--configs fp32,bf16,real,llamacpp] [--prefill 512] [--decode 128] [--threads 2] [--out PREFIX]
  bisup export   --model DIR --format compressed-tensors --out OUT [--dtype float16] [--drop kv_cache act_quantizer]

--system-prompt: its KV is computed at full precision (unquantized activations; by --fp-model when
given) and kept unquantized in the cache, the tokens after it use the model's KV bits (BiSup).
--mode fake|real (eval, generate): run a bisup-quantized model in that mode instead of as saved.

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

from bisup.cli_bisup import add_bisup_args, bisup_config_from_args
from bisup.config import QuantConfig
from bisup.eval.data import DATASETS
from bisup.eval.perplexity import PROMPT_KV_MODES
from bisup.exporters import DROPPABLE, FORMATS
from bisup.generation import PROMPT_ACTIVATIONS
from bisup.methods import registry
from bisup.quant.formats import ACT_CONVENTIONS


# ------------------------------------------------------------------------------------------------
# model loading
# ------------------------------------------------------------------------------------------------
def load_any(spec: str, device: str = "cpu", mode: Optional[str] = None) -> Tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, kind) for "default", a bisup-quantized dir (run in `mode`, None: as saved),
    or a transformers dir."""
    from bisup.checkpoint import CONFIG_FILE, load_quantized

    if spec == "default":
        from bisup.models.default import load_default_model

        model, tok = load_default_model(device=device)
        return model, tok, "default"
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"bisup: --model {spec!r} is neither 'default' nor a directory")
    if (path / CONFIG_FILE).is_file():
        model, tok = load_quantized(path, device=device, return_tokenizer=True, mode=mode)
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
                       w_clip=a.w_clip, w_clip_search=a.w_clip_search, a_clip=a.a_clip, kv_clip=a.kv_clip,
                       a_convention=a.a_convention, method=a.method, mode=a.mode,
                       gptq=a.gptq, atom_outliers=a.atom_outliers, rotation_seed=a.rotation_seed, prompt_len=a.prompt_len,
                       n_calib=a.n_calib, calib_seq_len=a.calib_seq_len, seed=a.seed,
                       bisup=bisup_config_from_args(a))


def cmd_quantize(a) -> dict:
    import bisup
    from bisup.accounting import weight_bytes
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


def cmd_export(a) -> dict:
    from bisup.checkpoint import CONFIG_FILE, load_quantized
    from bisup.exporters import export

    if not (a.model / CONFIG_FILE).is_file():
        raise ValueError(f"--model {a.model}: not a bisup-quantized model directory (bisup quantize --save)")
    model, tok = load_quantized(a.model, return_tokenizer=True, mode="fake")
    t = time.perf_counter()
    out = export(model, a.out, a.format, tokenizer=tok, dtype=None if a.dtype is None else getattr(torch, a.dtype),
                 drop=a.drop)
    size = sum(f.stat().st_size for f in out.iterdir())
    result = {"command": "export", "model": str(a.model), "format": a.format, "out": str(out), "drop": a.drop,
              "export_s": time.perf_counter() - t, "bytes": size}
    rows = [("model", str(a.model)), ("format", a.format), ("left out", ", ".join(a.drop) or "nothing"),
            ("written to", str(out)), ("size", f"{size / 2**20:.1f} MiB"), ("export time s", result["export_s"])]
    emit(result, rows, a.json)
    return result


def cmd_eval(a) -> dict:
    from bisup.eval import perplexity

    model, tok, kind = load_any(a.model, a.device, a.mode)
    if tok is None:
        raise SystemExit(f"bisup eval: {a.model} has no tokenizer")
    if a.prompt_kv == "fp-model" and (a.fp_model is None or a.system_prompt is None):
        raise ValueError("--prompt-kv fp-model needs --system-prompt and --fp-model")
    fp_model = None if a.fp_model is None else load_any(a.fp_model, a.device)[0]
    t = time.perf_counter()
    ppl = perplexity(model, tok, a.dataset, a.seq_len, a.windows, progress=not a.no_progress,
                     system_prompt=a.system_prompt, prompt_kv=a.prompt_kv, fp_model=fp_model)
    eval_s = time.perf_counter() - t
    cfg = getattr(model, "bisup_config", None)
    result = {"command": "eval", "model": a.model, "kind": kind, "dataset": a.dataset, "seq_len": a.seq_len,
              "windows": a.windows, "system_prompt": a.system_prompt,
              "prompt_kv": None if a.system_prompt is None else a.prompt_kv, "perplexity": ppl, "eval_s": eval_s,
              "config": None if cfg is None else cfg.to_dict()}
    label = "FP" if cfg is None else f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}KV{cfg.kv_bits}"
    prompt = "none" if a.system_prompt is None else f"{a.system_prompt!r}, prompt KV {a.prompt_kv}"
    emit(result, [("model", f"{a.model} ({kind}, {label})"), ("dataset", f"{a.dataset}, {a.windows}x{a.seq_len} tokens"),
                  ("system prompt", prompt), ("perplexity", ppl), ("eval time s", eval_s)], a.json)
    return result


def _prompt_texts(tok, a) -> Tuple[str, str]:
    """(system text, user text): tokenized separately, the system part is the cached prefix."""
    system = a.system_prompt or ""
    if not (a.chat and getattr(tok, "chat_template", None)):
        return system, a.prompt
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": a.prompt}]
    from bisup.generation import split_chat

    return split_chat(tok, msgs, tok.apply_chat_template(msgs[:1], tokenize=False) if system else "")


def _kv_report(cache) -> dict:
    from bisup.nn.kv_cache import MixedPrecisionKVCache

    if not isinstance(cache, MixedPrecisionKVCache):
        return {"kind": "simulated (fake mode) or unquantized"}
    layer = cache.layers[0]
    return {"kind": f"mixed precision, {layer.kv_bits}-bit", "fp_tokens": int(layer.k_prompt.shape[2]),
            "quantized_tokens": int(layer.quant_len), **cache.memory_bytes()}


@torch.no_grad()
def cmd_generate(a) -> dict:
    import bisup

    model, tok, kind = load_any(a.model, a.device, a.mode)
    if tok is None:
        raise SystemExit(f"bisup generate: {a.model} has no tokenizer")
    if a.fp_model is not None and not a.system_prompt:
        raise ValueError("--fp-model computes the system prompt's KV: give --system-prompt too")
    sys_text, user_text = _prompt_texts(tok, a)
    encode = lambda text: tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(a.device)  # noqa: E731
    ids = encode(user_text)
    sys_ids = encode(sys_text) if sys_text else None
    fp_model = None if a.fp_model is None else load_any(a.fp_model, a.device)[0]
    t = time.perf_counter()
    out, cache = bisup.generate(model, ids, system_ids=sys_ids, fp_model=fp_model, return_cache=True,
                                prompt_activations=a.prompt_activations,
                                max_new_tokens=a.max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    gen_s = time.perf_counter() - t
    start = ids.shape[1] + (0 if sys_ids is None else sys_ids.shape[1])
    new = out[0, start:]
    completion = tok.decode(new, skip_special_tokens=True)
    print(a.prompt + completion)
    n_sys = 0 if sys_ids is None else int(sys_ids.shape[1])
    result = {"command": "generate", "model": a.model, "prompt": a.prompt, "system_prompt": a.system_prompt,
              "system_tokens": n_sys, "completion": completion, "new_tokens": int(new.numel()),
              "generate_s": gen_s, "kv_cache": _kv_report(cache)}
    rows = [("new tokens", int(new.numel())), ("tokens/s", new.numel() / max(gen_s, 1e-9))]
    if n_sys:
        rows.append(("system prompt tokens (FP KV)", n_sys))
    emit(result, rows, a.json)
    return result


def cmd_diagnose(a) -> dict:
    """Where the quantization error of each --compare model comes from and where it goes (bisup.eval.diagnose)."""
    from bisup.eval import diagnose, eval_tokens

    fp, tok, kind = load_any(a.model, a.device)
    if getattr(fp, "bisup_config", None) is not None:
        raise ValueError(f"--model {a.model} is a bisup-quantized model: give the full-precision model the "
                         "--compare models were quantized from")
    if tok is None:
        raise SystemExit(f"bisup diagnose: {a.model} has no tokenizer")
    if a.names is not None and len(a.names) != len(a.compare):
        raise ValueError(f"--names gives {len(a.names)} names for {len(a.compare)} --compare models")
    models = list(a.compare) if a.names is None else dict(zip(a.names, a.compare))
    tokens = eval_tokens(tok, a.dataset, a.seq_len * a.windows)
    t = time.perf_counter()
    report = diagnose(fp, models, tokens, seq_len=a.seq_len, max_windows=a.windows, prompt_lens=a.system_prompt,
                      inject_positions=a.inject_positions, inject_bits=a.inject_bits, tokenizer=tok, mode=a.mode,
                      progress=not a.no_progress)
    diagnose_s = time.perf_counter() - t
    files = report.save(a.out, plots=not a.no_plots)
    rows = [("FP model", f"{a.model} ({kind}), perplexity {report.fp['ppl']:.4g}"),
            ("tokens", f"{a.dataset}, {report.settings['windows']}x{report.settings['seq_len']}")]
    for m in report.models:
        s = m["summary"]
        rows += [(f"{m['name']}: perplexity", m["ppl"]),
                 (f"{m['name']}: last-layer error end to end / layer alone",
                  f"{s['accumulated_last_layer']:.4g} / {s['local_last_layer']:.4g}"),
                 (f"{m['name']}: NLL increase first / last 10% positions",
                  f"{s['nll_increase_first_positions']:.4g} / {s['nll_increase_last_positions']:.4g}"),
                 (f"{m['name']}: worst linear", "layer {layer} {linear} ({output_error:.3g})".format(**m["linears"][0]))]
    rows += [("diagnose time s", diagnose_s), ("written to", str(a.out))]
    result = {"command": "diagnose", "model": a.model, "compare": [str(c) for c in a.compare], "diagnose_s": diagnose_s,
              "files": {k: str(v) for k, v in files.items()}, **report.to_dict()}
    emit(result, rows, a.json)
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
        p.add_argument("--dataset", default="embedded", choices=list(DATASETS))
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--windows", type=int, default=8, help="evaluation windows of --seq-len tokens")


def cmd_bench(args) -> None:
    """End-to-end prefill / decode speed and memory (bench/e2e.py of the source tree: table + JSON)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "bench" / "e2e.py"
    if not script.is_file():
        raise FileNotFoundError(f"bisup bench runs {script}, which is missing (it ships with the source tree)")
    spec = importlib.util.spec_from_file_location("bisup_bench_e2e", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--configs", args.configs, "--prefill", str(args.prefill), "--decode", str(args.decode),
            "--threads", str(args.threads)] + ([] if args.out is None else ["--out", str(args.out)])
    module.main(argv)


def _add_mode(p) -> None:
    p.add_argument("--mode", default=None, choices=["fake", "real"],
                   help="run a bisup-quantized model in this mode (default: the mode it was saved in)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bisup", description="W4A4 / W3A3 LLM quantization")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (and save it)")
    _add_common(q)
    q.add_argument("--method", default="rtn", choices=list(registry()))
    q.add_argument("--mode", default="fake", choices=["fake", "real"])
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--a-bits", type=int, default=4)
    q.add_argument("--kv-bits", type=int, default=16, help="16 = KV cache not quantized")
    q.add_argument("--group-size", type=int, default=64, help="weight (and default activation) group size; -1 = per channel")
    q.add_argument("--a-group-size", type=int, default=None, help="activation group size (default: --group-size); -1 = per token")
    q.add_argument("--kv-group-size", type=int, default=-1)
    q.add_argument("--w-asym", action="store_true", help="asymmetric weights")
    q.add_argument("--w-clip", type=float, default=1.0)
    q.add_argument("--w-clip-search", action="store_true",
                   help="per weight group, the least-squared-error clip ratio in w_clip * [1.0 .. 0.5]")
    q.add_argument("--a-clip", type=float, default=1.0)
    q.add_argument("--a-convention", default="bisup", choices=list(ACT_CONVENTIONS),
                   help="activation quantizer: bisup's kernels', or the one a compressed-tensors engine (vLLM) "
                        "runs on an export (then fake mode, a_clip 1, no learned activation clip)")
    q.add_argument("--kv-clip", type=float, default=1.0)
    q.add_argument("--gptq", action="store_true", help="GPTQ weights under atom / quarot")
    q.add_argument("--atom-outliers", type=int, default=None)
    q.add_argument("--prompt-len", type=int, default=0, help="system-prompt tokens kept FP16 in the KV cache")
    q.add_argument("--n-calib", type=int, default=32)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration run (torch.manual_seed)")
    q.add_argument("--rotation-seed", type=int, default=0, help="QuaRot: seed of the random Hadamard signs")
    add_bisup_args(q)
    q.add_argument("--eval", action="store_true", help="also report perplexity of the quantized model")
    q.add_argument("--save", type=Path, default=None, help="directory to save the quantized model to")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model")
    _add_common(e)
    _add_mode(e)
    e.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="precede every window by this system prompt ('default': the chat template's system "
                        "message); only the window's tokens are scored")
    e.add_argument("--prompt-kv", default="quantized", choices=list(PROMPT_KV_MODES),
                   help="the system prompt's KV: low-bit like every token, or kept at full precision, computed "
                        "by the quantized model with quantized activations (kv-fp) or unquantized ones "
                        "(quantized), or by --fp-model (default: quantized)")
    e.add_argument("--fp-model", default=None, help="'default' or a model dir: the unquantized model for --prompt-kv fp-model")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy generation")
    _add_common(g, eval_opts=False)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--system-prompt", default=None,
                   help="system prompt: its KV is computed at full precision and kept unquantized (BiSup)")
    g.add_argument("--fp-model", default=None,
                   help="'default' or a model dir: compute the system prompt's KV with this unquantized model "
                        "(default: the quantized model with unquantized activations)")
    g.add_argument("--prompt-activations", choices=PROMPT_ACTIVATIONS, default="fp",
                   help="how the quantized model runs the system prompt whose KV it keeps: activations "
                        "unquantized (fp) or quantized as for every token (quantized: as BiSup trains)")
    _add_mode(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("diagnose", help="see the quantization error propagate through layers and tokens (plots + tables)")
    _add_common(d)
    d.set_defaults(seq_len=256, windows=4)
    d.add_argument("--compare", nargs="+", required=True, metavar="DIR",
                   help="quantized model directories (bisup quantize --save), compared with --model")
    d.add_argument("--names", nargs="+", default=None, help="labels of the --compare models (default: from their configs)")
    d.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md, linears.md and the PNGs")
    d.add_argument("--system-prompt", type=int, nargs="*", default=[16, 64], metavar="P",
                   help="lengths (tokens) of the full-precision system prompt for the horizontal curves; none: P=0 only")
    d.add_argument("--inject-positions", type=int, default=16, help="rows of the one-token KV injection heat map")
    d.add_argument("--inject-bits", type=int, default=4, help="bits of the injected one-token K/V quantization")
    d.add_argument("--no-plots", action="store_true", help="write the tables only (no matplotlib)")
    _add_mode(d)
    d.set_defaults(func=cmd_diagnose)
    b = sub.add_parser("bench", help="end-to-end prefill/decode tokens/s and memory: FP32, BF16, real W4A4 KV4, llama.cpp")
    b.add_argument("--configs", default="fp32,bf16,real,llamacpp")
    b.add_argument("--prefill", type=int, default=512)
    b.add_argument("--decode", type=int, default=128)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--out", type=Path, default=None, help="results prefix (writes PREFIX.json and PREFIX.md; "
                   "default bench/results/e2e_cpu)")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", help="write a quantized model as a checkpoint a serving engine loads (vLLM)")
    x.add_argument("--model", type=Path, required=True, help="a directory written by `bisup quantize --save`")
    x.add_argument("--format", default="compressed-tensors", choices=list(FORMATS))
    x.add_argument("--out", type=Path, required=True, help="the Hugging Face model directory to write")
    x.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="dtype of the floating-point tensors and weight scales (default: the model's)")
    x.add_argument("--drop", nargs="*", default=[], choices=sorted(DROPPABLE),
                   help="what the export may leave out: " + "; ".join(f"{k}: {v}" for k, v in DROPPABLE.items()))
    x.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    x.set_defaults(func=cmd_export)
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
