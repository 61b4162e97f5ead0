"""bisup at its users' scale: real 7B / 8B / 70B decoder-layer shapes, bf16 weights.

Per shape (random weights, `--layers` decoder layers, a small vocabulary so the layers dominate), each
job in its own subprocess (so its peak RSS is its own):
  fp32_forward  a plain fp32 forward of the model over the calibration tokens (the yardstick)
  base          QuaRot+GPTQ W4A4 g128 KV4 (quantize_model on the bf16 model)
  bisup         the same + BiSup's block-wise stage (BiSupConfig(epochs=--epochs, e2e_epochs=0), the library
                defaults otherwise: the end-to-end stage runs the whole model once per step, not per layer,
                and is skipped anyway for a model that lives off its compute device)
reports seconds per layer, peak RSS, FLOPs per layer, and projections of the full model's time:
on this machine (measured seconds per layer x layers) and on one H100 (FLOP count / an assumed
achieved rate, plus per-column GPTQ launch overhead: a PROJECTION until a GPU run replaces it).

  python bench/scale.py [--shapes llama2-7b,llama3-8b,qwen2.5-7b,llama2-70b] [--layers 1]
                        [--tokens 4x512] [--device cpu] [--json bench/results/scale_cpu.json]
  python bench/scale.py --e2e   # 32-layer Llama-2-7B-shaped bf16 model: quantize, save; reload (real), one forward
  python bench/scale.py --e2e-reload DIR   # only the reload + forward of a saved checkpoint
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from bisup.provenance import git_commit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_info, device_name, print_table, status_mb, write_json  # noqa: E402

# family, hidden, intermediate, q heads, kv heads, layers of the full model, vocabulary
SHAPES = {
    "llama2-7b": dict(family="llama", hidden=4096, inter=11008, heads=32, kv_heads=32, layers=32, vocab=32000),
    "llama3-8b": dict(family="llama", hidden=4096, inter=14336, heads=32, kv_heads=8, layers=32, vocab=128256),
    "qwen2.5-7b": dict(family="qwen2", hidden=3584, inter=18944, heads=28, kv_heads=4, layers=28, vocab=152064),
    "llama2-70b": dict(family="llama", hidden=8192, inter=28672, heads=64, kv_heads=8, layers=80, vocab=32000),
}
BENCH_VOCAB = 1024  # per-layer jobs: the embedding and lm_head stay small
BASE = dict(method="quarot", gptq=True, w_bits=4, a_bits=4, kv_bits=4, w_group_size=128, a_group_size=128)
VARIANTS = ("fp32_forward", "base", "bisup")
# The H100 projection's assumptions (stated in every result): fp32 matmuls (layers compute in fp32)
# at 30 TFLOP/s achieved (FP32 peak 67), ~10 kernel launches of ~8 us per GPTQ column, and BiSup's
# fake weight quantization as ~60 fp32 passes over the layer's weights per step at 2 TB/s.
H100_FLOPS, H100_BYTES_S, GPTQ_COLUMN_S, BISUP_WEIGHT_PASSES = 30e12, 2e12, 10 * 8e-6, 60


def model_config(shape: dict, layers: int, vocab: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape["family"]]
    return cls(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_attention_heads=shape["heads"],
               num_key_value_heads=shape["kv_heads"], num_hidden_layers=layers, vocab_size=vocab,
               max_position_embeddings=4096, tie_word_embeddings=False)


def build_model(shape: dict, layers: int, vocab: int):
    """Random-weight bf16 model (transformers' own init: normal, std 0.02)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(shape, layers, vocab), dtype=torch.bfloat16,
                                            attn_implementation="sdpa").eval()


# ------------------------------------------------------------------------------------------------
# FLOP counts
# ------------------------------------------------------------------------------------------------
def linear_shapes(shape: dict) -> List[tuple]:
    """(N, K) of every decoder linear of one layer."""
    h, i, d = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    kv = shape["kv_heads"] * d
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def forward_flops(shape: dict, n_seq: int, seq_len: int) -> float:
    """One layer's forward over n_seq x seq_len tokens: linears + causal attention (scores and values)."""
    tokens = n_seq * seq_len
    params = sum(n * k for n, k in linear_shapes(shape))
    return 2.0 * tokens * params + 2.0 * tokens * seq_len * shape["hidden"]


def gptq_flops(shape: dict, tokens: int) -> float:
    """Hessians (2 T K^2 per distinct input), GPTQ's lazy updates (N K^2 per linear), one Cholesky and
    one triangular inverse per distinct input (2/3 K^3)."""
    distinct = [shape["hidden"]] * 3 + [shape["inter"]]  # q/k/v, o, gate/up read K = hidden; down reads inter
    hess = sum(2.0 * tokens * k * k for k in distinct)
    updates = sum(n * k * k for n, k in linear_shapes(shape))
    inverse = sum(2.0 / 3.0 * k ** 3 for k in distinct)
    return hess + updates + inverse


def pipeline_flops(shape: dict, n_seq: int, seq_len: int, bisup_epochs: int = 0) -> Dict[str, float]:
    """FLOPs per layer of QuaRot+GPTQ (two forwards: statistics, the quantized output passed on) and of
    BiSup on top (one more forward for the full-precision targets, forward + backward per training
    window, the export's Hessian pass); BiSup's codes are its learned rounding, so no GPTQ solve."""
    fwd = forward_flops(shape, n_seq, seq_len)
    base = 2 * fwd + gptq_flops(shape, n_seq * seq_len)
    bisup = 3 * fwd + bisup_epochs * 3 * fwd
    return dict(forward=fwd, base=base, bisup=bisup)


def h100_projection_s(shape: dict, n_seq: int, seq_len: int, epochs: int, batch_size: int) -> Dict[str, float]:
    """Projected seconds per layer on one H100 (assumptions: H100_* constants above)."""
    f = pipeline_flops(shape, n_seq, seq_len, epochs)
    columns = sum(k for _, k in linear_shapes(shape))
    weights = sum(n * k for n, k in linear_shapes(shape))
    steps = epochs * -(-n_seq // batch_size)
    base = f["base"] / H100_FLOPS + columns * GPTQ_COLUMN_S
    bisup = f["bisup"] / H100_FLOPS + steps * BISUP_WEIGHT_PASSES * 4 * weights / H100_BYTES_S
    return dict(base=base, bisup=bisup)


# ------------------------------------------------------------------------------------------------
# one job (in its own process)
# ------------------------------------------------------------------------------------------------
def run_job(shape_name: str, variant: str, layers: int, n_seq: int, seq_len: int, epochs: int, device: str) -> dict:
    import bisup

    shape = SHAPES[shape_name]
    model = build_model(shape, layers, BENCH_VOCAB)
    tokens = torch.randint(0, BENCH_VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(1))
    rss_model = status_mb("VmRSS")
    t0 = time.perf_counter()
    if variant == "fp32_forward":
        model = model.float().to(device)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(input_ids=tokens.to(device), use_cache=False)
    else:
        cfg = bisup.QuantConfig(**BASE, n_calib=n_seq, calib_seq_len=seq_len,
                                bisup=bisup.BiSupConfig(epochs=epochs, e2e_epochs=0) if variant == "bisup" else None)
        bisup.quantize_model(model, cfg, calib_data=tokens, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = dict(shape=shape_name, variant=variant, layers=layers, seconds=seconds, seconds_per_layer=seconds / layers,
               peak_rss_mb=status_mb("VmHWM"), rss_after_model_mb=rss_model)
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def run_subprocess(args: List[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(error=(proc.stderr or proc.stdout)[-2000:])
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# end to end: a 32-layer 7B-shaped model on this machine
# ------------------------------------------------------------------------------------------------
def run_e2e(n_seq: int, seq_len: int, device: str, keep: Path = None) -> dict:
    """Build, quantize (mode="real", layer by layer) and save the 32-layer model in this process; reload
    it in real mode and run one forward in a fresh process (its own peak RSS, as a user's)."""
    import bisup

    shape = SHAPES["llama2-7b"]
    steps = {}
    t = time.perf_counter()
    model = build_model(shape, shape["layers"], shape["vocab"])
    steps["build_s"] = time.perf_counter() - t
    rss_model = status_mb("VmRSS")
    tokens = torch.randint(0, shape["vocab"], (n_seq, seq_len), generator=torch.Generator().manual_seed(1))
    cfg = bisup.QuantConfig(**BASE, n_calib=n_seq, calib_seq_len=seq_len, mode="real")
    t = time.perf_counter()
    bisup.quantize_model(model, cfg, calib_data=tokens, device=device, progress=True)
    steps["quantize_s"] = time.perf_counter() - t
    out_dir = keep or Path(tempfile.mkdtemp(prefix="bisup-7b-"))
    try:
        t = time.perf_counter()
        bisup.save_quantized(model, out_dir)
        steps["save_s"] = time.perf_counter() - t
        size = sum(f.stat().st_size for f in out_dir.iterdir())
        peak_quantize = status_mb("VmHWM")
        del model
        reload = run_subprocess(["--e2e-reload", str(out_dir), "--device", device])
    finally:
        if keep is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    return dict(shape="llama2-7b", layers=shape["layers"], config=cfg.to_dict(), **steps, checkpoint_gb=size / 1e9,
                rss_after_model_mb=rss_model, peak_rss_mb=peak_quantize, reload=reload)


def run_reload(path: str, device: str) -> dict:
    """load_quantized(mode="real") and one forward of 128 tokens, in this (fresh) process."""
    import bisup

    t = time.perf_counter()
    model = bisup.load_quantized(path, mode="real", device=device)
    load_s = time.perf_counter() - t
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(2))
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits
    return dict(load_s=load_s, forward_128_s=time.perf_counter() - t, logits_finite=bool(torch.isfinite(logits).all()),
                peak_rss_mb=status_mb("VmHWM"))


# ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", default="4x512", help="calibration windows x tokens")
    ap.add_argument("--epochs", type=int, default=1, help="BiSup epochs in the measured run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--e2e", action="store_true", help="the 32-layer Llama-2-7B-shaped end-to-end run")
    ap.add_argument("--e2e-keep", default=None, help="with --e2e: save the checkpoint here and keep it")
    ap.add_argument("--e2e-reload", default=None, help="reload this checkpoint (real mode) and run one forward")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # SHAPE:VARIANT, run in this process
    args = ap.parse_args()
    n_seq, seq_len = (int(v) for v in args.tokens.split("x"))
    if args.e2e_reload:
        print(json.dumps(run_reload(args.e2e_reload, args.device)))
        return
    if args.job:
        shape, variant = args.job.split(":")
        print(json.dumps(run_job(shape, variant, args.layers, n_seq, seq_len, args.epochs, args.device)))
        return
    meta = dict(commit=git_commit(short=True), device=device_name(torch.device(args.device)), cpu_flags=cpu_info()[1],
                torch=torch.__version__, tokens=args.tokens, base_config=BASE, bisup_epochs=args.epochs,
                bench_vocab=BENCH_VOCAB, threads=torch.get_num_threads(),
                h100_assumptions=dict(fp32_flops=H100_FLOPS, bytes_per_s=H100_BYTES_S, gptq_column_s=GPTQ_COLUMN_S,
                                      bisup_weight_passes_per_step=BISUP_WEIGHT_PASSES))
    if args.e2e:
        res = run_e2e(n_seq, seq_len, args.device, Path(args.e2e_keep) if args.e2e_keep else None)
        print(json.dumps(res, indent=1))
        write_json(args.json, dict(meta, e2e=res))
        return
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        jobs = {v: run_subprocess(["--job", f"{shape_name}:{v}", "--layers", str(args.layers), "--tokens", args.tokens,
                                   "--epochs", str(args.epochs), "--device", args.device])
                for v in args.variants.split(",")}
        flops = pipeline_flops(shape, n_seq, seq_len, args.epochs)
        defaults = pipeline_flops(shape, 32, 512, 4)  # the library defaults: 32 x 512 calibration, 4 epochs
        proj = h100_projection_s(shape, 32, 512, 4, 2)
        fwd = jobs.get("fp32_forward", {}).get("seconds_per_layer")
        row = dict(shape=shape_name, fwd_gflop=flops["forward"] / 1e9)
        for v, res in jobs.items():
            if "error" in res:
                row[f"{v}_error"] = res["error"].strip().splitlines()[-1][:200]
                continue
            row[f"{v}_s"] = res["seconds_per_layer"]
            row[f"{v}_peak_gb"] = res["peak_rss_mb"] / 1024
            if "peak_gpu_mb" in res:
                row[f"{v}_peak_gpu_gb"] = res["peak_gpu_mb"] / 1024
        if fwd and "base_s" in row:
            row["base_x_fwd"] = row["base_s"] / fwd
        if "base_s" in row and "bisup_s" in row:
            row["bisup_x_base"] = row["bisup_s"] / row["base_s"]
        if "base_s" in row:
            row["model_base_h_here"] = row["base_s"] * shape["layers"] / 3600
        if "bisup_s" in row:
            # the library defaults train 4 epochs on 32 windows: this run's BiSup time scaled by its FLOPs
            # (BiSup's codes are its learned rounding: no GPTQ solve, so not base + something)
            row["model_bisup_defaults_h_here"] = (row["bisup_s"] * defaults["bisup"] / max(flops["bisup"], 1)
                                                  * shape["layers"] / 3600)
        row["h100_base_min_projected"] = proj["base"] * shape["layers"] / 60
        row["h100_bisup_min_projected"] = proj["bisup"] * shape["layers"] / 60
        row["jobs"] = jobs
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "jobs"}), flush=True)
    cols = ["shape", "fwd_gflop", "fp32_forward_s", "base_s", "base_x_fwd", "base_peak_gb", "bisup_s", "bisup_x_base",
            "bisup_peak_gb", "model_base_h_here", "model_bisup_defaults_h_here", "h100_base_min_projected",
            "h100_bisup_min_projected"]
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(rows, [c for c in cols if any(c in r for r in rows)])
    print(table.getvalue())
    write_json(args.json, dict(meta, rows=rows))
    if args.json:  # the table beside the JSON, with what produced it
        Path(args.json).with_suffix(".md").write_text(
            f"# bench/scale.py ({meta['device']}, commit {meta['commit']}, {args.tokens} calibration tokens, "
            f"BiSup {args.epochs} epoch(s) measured)\n\n```\n{table.getvalue()}```\n\n"
            "Columns: seconds per layer (`*_s`), peak RSS of the job's process (`*_peak_gb`), `base_x_fwd` = "
            "QuaRot+GPTQ / plain fp32 forward, `bisup_x_base` = + BiSup / QuaRot+GPTQ; `model_*_h_here` = the full "
            "model on this machine (measured per layer x layers; BiSup at the library defaults, 32 x 512 tokens and "
            "4 epochs, scaled from this run by FLOPs); `h100_*_min_projected` = PROJECTIONS from FLOP counts "
            f"(assumptions: {meta['h100_assumptions']}), not measurements.\n")


if __name__ == "__main__":
    main()
