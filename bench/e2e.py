"""End-to-end speed and memory on the embedded default (SmolLM2-135M-Instruct): prefill + greedy decode.

Configs, each measured in its own subprocess (so peak RSS belongs to that config alone):
  fp32      the model as loaded (transformers, SDPA attention, DynamicCache)
  bf16      the same model cast to bfloat16
  real      bisup real mode: QuaRot RTN W4A4 g64, KV4 (a_clip 0.9): QuantLinear (integer GEMM),
            MixedPrecisionKVCache + bisup.ops.attention
  llamacpp  llama.cpp (llama-cpp-python) on the GGUF file the default model comes from (Q4_1)

Every config runs the same token ids: a forward over `--prefill` held-out tokens, then `--decode`
single-token greedy steps on the cache (a plain loop, not generate(), so that only the model and
its cache are timed). Tokens/s, RSS (after setup, and the peak during the timed run: VmHWM reset
through /proc/self/clear_refs before it), bytes of the weights and of the KV cache after the run.

  python bench/e2e.py [--configs fp32,bf16,real,llamacpp] [--prefill 512] [--decode 128] [--threads 2]
                      [--out bench/results/e2e_cpu]       (writes OUT.json and OUT.md)
  bisup bench ...                                          (the same)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_info, status_mb  # noqa: E402

CONFIGS = ("fp32", "bf16", "real", "llamacpp")
REAL_CONFIG = dict(method="quarot", w_bits=4, a_bits=4, kv_bits=4, w_group_size=64, a_group_size=64, a_clip=0.9,
                   mode="real")


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def peak_rss_fields(reset_worked: bool) -> dict:
    """The peak RSS of the timed run when reset_peak_rss() worked, else only the process's peak."""
    peak = status_mb("VmHWM")
    return dict(peak_rss_run_mb=peak if reset_worked else None, peak_rss_process_mb=None if reset_worked else peak)


def reset_peak_rss() -> bool:
    """Resets VmHWM (the peak RSS) to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prompt_ids(n: int) -> List[int]:
    """n held-out token ids of the embedded corpus (only the tokenizer is loaded)."""
    from transformers import AutoTokenizer

    from bisup.eval.data import eval_tokens
    from bisup.models.default import default_model_dir, load_default_model

    if not (default_model_dir() / "tokenizer_config.json").is_file():
        load_default_model()  # converts the GGUF once
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    return eval_tokens(tok, "embedded", n)[:n].tolist()


def release_freed_memory() -> None:
    """gc, then hand freed heap pages back to the OS (glibc malloc_trim), so RSS shows live memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _module_bytes(model) -> int:
    """Bytes of every parameter and buffer, shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _cache_bytes(cache) -> int:
    from bisup.nn import MixedPrecisionKVCache

    if isinstance(cache, MixedPrecisionKVCache):
        return int(cache.memory_bytes()["bytes"])
    return int(sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers))


def run_torch(config: str, prefill: int, decode: int, threads: int) -> Dict:
    import torch
    from transformers import DynamicCache

    import bisup
    from bisup.accounting import weight_bytes
    from bisup.models.adapters import get_adapter
    from bisup.models.default import load_default_model
    from bisup.nn.real_kv import cache_argument, make_cache

    torch.set_num_threads(threads)
    ids_list = _prompt_ids(prefill)
    rss_start = status_mb("VmRSS")
    t0 = time.perf_counter()
    model, tok = load_default_model()
    if config == "bf16":
        model = model.to(torch.bfloat16)
    elif config == "real":
        model = bisup.quantize_model(model, bisup.QuantConfig(**REAL_CONFIG), tokenizer=tok, progress=False)
    model.eval()
    setup_s = time.perf_counter() - t0
    release_freed_memory()
    arg = cache_argument(model)

    def new_cache():
        cache = make_cache(model)
        return cache if cache is not None else DynamicCache(config=model.config)

    ids = torch.tensor([ids_list])
    with torch.no_grad():  # warm-up: a short prefill and two decode steps on a throwaway cache
        c = new_cache()
        out = model(ids[:, :16], **{arg: c}, use_cache=True)
        for _ in range(2):
            out = model(out.logits[:, -1:].argmax(-1), **{arg: c}, use_cache=True)
        del c, out
    release_freed_memory()
    rss_ready = status_mb("VmRSS")
    peak_ok = reset_peak_rss()
    cache = new_cache()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, **{arg: cache}, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        t_prefill = time.perf_counter() - t0
        tokens = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(decode):
            out = model(nxt, **{arg: cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
        t_decode = time.perf_counter() - t0
    adapter = get_adapter(model)
    wb = weight_bytes(model)
    n_params_linear = wb["params"]
    elsize = {"fp32": 4, "bf16": 2}.get(config)
    linear_bytes = wb["packed_bytes"] if config == "real" else n_params_linear * elsize
    return dict(config=config, prefill_tokens=prefill, decode_tokens=decode, threads=threads,
                prefill_s=t_prefill, decode_s=t_decode,
                prefill_tok_s=prefill / t_prefill, decode_tok_s=decode / t_decode,
                setup_s=setup_s, rss_start_mb=rss_start, rss_ready_mb=rss_ready,
                **peak_rss_fields(peak_ok),
                linear_weight_bytes=int(linear_bytes), linear_fp16_bytes=int(wb["fp16_bytes"]),
                model_bytes=_module_bytes(model), kv_cache_bytes=_cache_bytes(cache),
                layers=len(adapter.layers()), generated=tokens[:16])


def run_llamacpp(prefill: int, decode: int, threads: int) -> Dict:
    import numpy as np

    from bisup.models.default import gguf_path

    try:
        from llama_cpp import Llama
    except ImportError as err:
        return dict(config="llamacpp", error=f"llama-cpp-python is not installed ({err})")
    ids = _prompt_ids(prefill)
    rss_start = status_mb("VmRSS")
    path = gguf_path()
    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=prefill + decode + 32,
                n_batch=prefill, n_ubatch=prefill, verbose=False)
    setup_s = time.perf_counter() - t0
    llm.eval(ids[:16])  # warm-up
    llm.reset()
    release_freed_memory()
    rss_ready = status_mb("VmRSS")
    peak_ok = reset_peak_rss()

    n_vocab = llm.n_vocab()

    def argmax() -> int:  # logits of the last evaluated token (logits_all=False keeps only those)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    t0 = time.perf_counter()
    llm.eval(ids)
    nxt = argmax()
    t_prefill = time.perf_counter() - t0
    tokens = [nxt]
    t0 = time.perf_counter()
    for _ in range(decode):
        llm.eval([nxt])
        nxt = argmax()
        tokens.append(nxt)
    t_decode = time.perf_counter() - t0
    meta = llm.metadata
    n_layer = int(meta.get("llama.block_count", 0))
    n_kv = int(meta.get("llama.attention.head_count_kv", 0))
    n_embd, n_head = int(meta.get("llama.embedding_length", 0)), int(meta.get("llama.attention.head_count", 1))
    head_dim = n_embd // max(n_head, 1)
    used = prefill + decode
    return dict(config="llamacpp", prefill_tokens=prefill, decode_tokens=decode, threads=threads,
                prefill_s=t_prefill, decode_s=t_decode, prefill_tok_s=prefill / t_prefill, decode_tok_s=decode / t_decode,
                setup_s=setup_s, rss_start_mb=rss_start, rss_ready_mb=rss_ready,
                **peak_rss_fields(peak_ok),
                model_bytes=path.stat().st_size, kv_cache_bytes=2 * n_layer * n_kv * head_dim * 2 * used,
                kv_note="f16 K/V of the tokens used (llama.cpp allocates n_ctx)", gguf=path.name,
                generated=tokens[:16])


def worker(args) -> None:
    if args.worker == "llamacpp":
        res = run_llamacpp(args.prefill, args.decode, args.threads)
    else:
        res = run_torch(args.worker, args.prefill, args.decode, args.threads)
    print("E2E_RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def _run_config(config: str, args) -> Dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--prefill", str(args.prefill),
           "--decode", str(args.decode), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(config=config, error=f"exit {proc.returncode}: " + " | ".join(tail))


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mb(b):
    return None if b is None else b / 2**20


def summarize(results: List[Dict], meta: Dict) -> Dict:
    by = {r["config"]: r for r in results if "error" not in r}
    fp32, real = by.get("fp32"), by.get("real")
    ratios = {}
    if fp32 and real:
        ratios["real_vs_fp32_decode"] = real["decode_tok_s"] / fp32["decode_tok_s"]
        ratios["real_vs_fp32_prefill"] = real["prefill_tok_s"] / fp32["prefill_tok_s"]
        ratios["real_linear_weights_vs_fp16"] = real["linear_weight_bytes"] / real["linear_fp16_bytes"]
        ratios["real_kv_vs_fp32_kv"] = real["kv_cache_bytes"] / fp32["kv_cache_bytes"]
        ratios["real_tokens_match_fp32"] = sum(a == b for a, b in zip(real["generated"], fp32["generated"]))
    if "llamacpp" in by and real:
        ratios["real_vs_llamacpp_decode"] = real["decode_tok_s"] / by["llamacpp"]["decode_tok_s"]
        ratios["real_vs_llamacpp_prefill"] = real["prefill_tok_s"] / by["llamacpp"]["prefill_tok_s"]
    targets = {}
    if ratios:
        targets = {"decode >= fp32": ratios["real_vs_fp32_decode"] >= 1.0,
                   "prefill >= 0.7x fp32": ratios["real_vs_fp32_prefill"] >= 0.7,
                   "linear weights <= 0.3x fp16": ratios["real_linear_weights_vs_fp16"] <= 0.3}
    return dict(meta=meta, results=results, ratios=ratios, targets=targets)


def markdown(summary: Dict) -> str:
    m = summary["meta"]
    lines = [f"# End-to-end on CPU: SmolLM2-135M-Instruct, prefill {m['prefill']} + decode {m['decode']} tokens",
             "", f"CPU: {m['cpu']}, {m['threads']} threads; torch {m['torch']}; one subprocess per config; "
             f"bench/e2e.py ({m['date']}).", "",
             "| config | prefill tok/s | decode tok/s | RSS ready (MB) | peak RSS in run (MB) | linear weights (MB) | "
             "all weights+buffers (MB) | KV cache (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['config']} | {_fmt(r['prefill_tok_s'])} | {_fmt(r['decode_tok_s'])} | "
                     f"{_fmt(r['rss_ready_mb'])} | {_fmt(r.get('peak_rss_run_mb'))} | "
                     f"{_fmt(_mb(r.get('linear_weight_bytes')))} | {_fmt(_mb(r['model_bytes']))} | "
                     f"{_fmt(_mb(r['kv_cache_bytes']), 2)} |")
    if summary["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v, 3)} |" for k, v in summary["ratios"].items()]
    if summary["targets"]:
        lines += ["", "Targets: " + "; ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in summary["targets"].items())]
    lines += ["", "real = QuaRot RTN W4A4 g64 KV4 (a_clip 0.9), bisup real mode. linear weights: the decoder "
              "linears (packed codes + fp16 scales for real; fp32/bf16 otherwise). all weights+buffers: every "
              "tensor the torch model holds (real mode keeps embeddings, untied lm_head and norms in fp32); "
              "llama.cpp: the GGUF file. llama.cpp's KV: f16 bytes of the tokens used."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "e2e_cpu")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch
    from tqdm.auto import tqdm

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"e2e: unknown configs {unknown}; expected some of {list(CONFIGS)}")
    results = []
    bar = tqdm(configs, desc="e2e")
    for config in bar:
        bar.set_postfix_str(config)
        results.append(_run_config(config, args))
    meta = dict(cpu=cpu_info()[0], threads=args.threads, prefill=args.prefill, decode=args.decode,
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    summary = summarize(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
