"""BiSup's results table on the embedded default (SmolLM2-135M-Instruct; --model gemma3-270m: the same
protocol on a second real model family, in its own table): base, +vertical,
+horizontal, +both, for Atom and QuaRot, at W4A4 g64 KV4, W4A4 per-channel KV4, W3A3 g64 KV4 and
W4A4 / W3A3 g128 KV4 (the paper's setting; 576 = 4.5 x 128 is a ragged last group),
plus an ablation of BiSup's parameter spaces.

Each job (a cell = base config, and a variant = base | bisup | one parameter space) runs in its own
subprocess, so its peak RSS is its own: load the model, quantize (calibration: the first n_calib
windows of the embedded corpus's calibration split; BiSup's defaults were chosen on validation
windows of that split, bench/results/bisup_first.md), then evaluate in real mode on the held-out
windows:
- "8w": no system prompt, 8 x 512 (the issue's target protocol, bisup.eval.perplexity's default);
- "other text": the same protocol on other held-out text (bisup.eval.data): the START of the held-out
  documents ("embedded_head") and CPython's reference topics ("pydoc"), 8 x 512 each;
- "32w": every window behind the default system prompt (the chat template's system message),
  only the window's tokens scored (bisup.eval.perplexity), prompt KV low-bit ("all low-bit") or
  kept at full precision, computed by the quantized model with its activations quantized
  ("kv-fp") or unquantized ("quantized"), or by the FP model ("fp-model"); the same 32 x 512
  windows for every row. Also the per-position NLL (the curve).

The weights-only row (gptq_w4a16) runs in fake mode: there is no real-mode GEMM for 16-bit activations.
Ablation rows (--only-8w) are evaluated on the 8-window protocol only.

    python bench/bisup_table.py --jobs quarot_g64:base,quarot_g64:bisup,... [--only-8w] [--out bench/results/bisup_table]
    python bench/bisup_table.py --model gemma3-270m --jobs ... --out bench/results/bisup_table_gemma3
    python bench/bisup_table.py --report       # table, JSON, PNGs from the stored jobs
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bisup.config import BiSupConfig
from bisup.provenance import git_commit

G64 = dict(w_bits=4, a_bits=4, kv_bits=4, w_group_size=64, a_group_size=64, a_clip=0.9, gptq=True)
PER_CHANNEL = dict(G64, w_group_size=-1, a_group_size=-1)
W3 = dict(G64, w_bits=3, a_bits=3)
G128 = dict(G64, w_group_size=128, a_group_size=128)  # 576 = 4.5 x 128: a ragged last group
W3_G128 = dict(G128, w_bits=3, a_bits=3)  # the paper's headline setting
CELLS = {
    "quarot_g64": dict(G64, method="quarot"),
    "atom_g64": dict(G64, method="atom", atom_outliers=16),
    "quarot_pc": dict(PER_CHANNEL, method="quarot"),
    "atom_pc": dict(PER_CHANNEL, method="atom", atom_outliers=16),
    "quarot_w3": dict(W3, method="quarot"),
    "atom_w3": dict(W3, method="atom", atom_outliers=16),
    "quarot_g128": dict(G128, method="quarot"),
    "atom_g128": dict(G128, method="atom", atom_outliers=16),
    "quarot_w3_g128": dict(W3_G128, method="quarot"),
    "atom_w3_g128": dict(W3_G128, method="atom", atom_outliers=16),
    "quarot_rtn_g64": dict(G64, method="quarot", gptq=False),  # the ablation's base (larger effects)
    # weights only, against AutoRound W4A16 g64 (8-window protocol only: no activation / KV quantization)
    "gptq_w4a16": dict(G64, method="gptq", a_bits=16, kv_bits=16, a_clip=1.0),
}
def only(*names: str) -> dict:
    """BiSup's block-wise stage with exactly these parameter spaces on (the ablation's variants)."""
    return dict({space: space in names for space in BiSupConfig.SPACES}, e2e_epochs=0)


# Every variant is BiSupConfig() as the job's commit defines it, with these fields changed.
VARIANTS = {
    "base": None,
    "bisup": {},  # the defaults
    "clip_only": only("weight_clip", "act_clip"),
    "smooth_only": only("smooth"),
    "lowrank_only": only("lowrank"),
    "rounding_only": only("rounding"),
    "rotation_only": only("head_rotation"),
    "no_rounding": dict(rounding=False),
    "no_e2e": dict(e2e_epochs=0),  # the block-wise stage alone
    # the defaults of 2026-12-07 morning (all-token MSE, smoothing on, no head rotations): where today's
    # defaults, chosen on SmolLM2, do worse on another model
    "bisup_morning": dict(loss="mse", smooth=True, head_rotation=False),
    # +both with prompt-aware training: every calibration window starts with the system prompt and
    # its KV stays unquantized while BiSup trains (QuantConfig.prompt_len = P), as at inference
    "bisup_prompt": {},
    # the defaults, trained with the first token's KV (the attention sink) unquantized (prompt_len 1),
    # so that the layers do not learn to compensate a low-bit sink that an FP prompt would not have
    "bisup_sink": {},
}
PROMPT_AWARE = ("bisup_prompt",)
SINK_AWARE = ("bisup_sink",)
SEQ_LEN, WINDOWS_8, WINDOWS_32, N_CALIB = 512, 8, 32, 16
OTHER_TEXT = ("embedded_head", "pydoc")  # re-measured on other held-out text (8 x 512 each)
OUT = Path(__file__).resolve().parent / "results" / "bisup_table"
# the models a table can be made of: name -> (module, loader returning (model, tokenizer))
MODELS = {"smollm2-135m": ("bisup.models.default", "load_default_model"),
          "gemma3-270m": ("bisup.models.gemma3_270m", "load_gemma3_270m")}
DEFAULT_MODEL = "smollm2-135m"


def load_model(name: str):
    """(model, tokenizer) of MODELS[name]."""
    module, function = MODELS[name]
    return getattr(importlib.import_module(module), function)()


def run_job(cell: str, variant: str, fp_prompt_from_fp_model: bool, only_8w: bool = False,
            model_name: str = DEFAULT_MODEL, n_calib: int = N_CALIB) -> dict:
    import torch

    import bisup
    from bisup.eval.data import calibration_batches, eval_tokens
    from bisup.eval.perplexity import position_perplexity, system_prompt_ids, window_nll
    from bisup.generation import prompt_aware_calibration, set_prompt_len

    torch.manual_seed(0)
    model, tok = load_model(model_name)
    res = dict(model=model_name, cell=cell, variant=variant)
    sys_ids = None  # (a tokenizer without a chat template has no default system prompt: --only-8w)
    if not only_8w or variant in PROMPT_AWARE:
        sys_ids = system_prompt_ids(tok, "default")
        res["system_prompt_tokens"] = int(sys_ids.shape[1])
    if cell != "fp":
        bis = VARIANTS[variant]
        # evaluated in real mode (packed weights, the integer GEMM, the mixed-precision KV cache):
        # what the kernels deliver (fake mode computes the same bits, tests/python/test_fake_real.py)
        calib, p = calibration_batches(tok, n_calib, SEQ_LEN), 0
        if variant in PROMPT_AWARE:  # the same calibration tokens, behind the system prompt
            calib, p = prompt_aware_calibration(calib, sys_ids)
        if variant in SINK_AWARE:
            p = 1
        # weights only (A16): no real-mode GEMM for 16-bit activations, so fake mode (the same weights)
        mode = "fake" if CELLS[cell]["a_bits"] == 16 else "real"
        cfg = bisup.QuantConfig(**CELLS[cell], n_calib=n_calib, calib_seq_len=SEQ_LEN, mode=mode, prompt_len=p,
                                bisup=None if bis is None else bisup.BiSupConfig(**bis))
        res["config"] = cfg.to_dict()
        res["label"] = cfg.label()  # what ran, made from the config
        res["seed"] = cfg.seed
        t = time.perf_counter()
        bisup.quantize_model(model, cfg, calib_data=calib, progress=True)
        res["quantize_s"] = time.perf_counter() - t
        if p:  # evaluated like every other row: no full-precision positions unless a prompt is given
            set_prompt_len(model, 0)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FP copy below
    t = time.perf_counter()
    # the 8-window protocol's own windows: the LAST 8 x 512 held-out tokens (the last 8 of the 32)
    nll8 = window_nll(model, eval_tokens(tok, "embedded", SEQ_LEN * WINDOWS_8), SEQ_LEN, WINDOWS_8, progress=False)
    res["ppl_8w"] = float(nll8.double().mean().exp())
    for dataset in OTHER_TEXT:
        nll = window_nll(model, eval_tokens(tok, dataset, SEQ_LEN * WINDOWS_8), SEQ_LEN, WINDOWS_8, progress=False)
        res[f"ppl_8w_{dataset}"] = float(nll.double().mean().exp())
    weights_only = cell != "fp" and CELLS[cell]["a_bits"] == 16 and CELLS[cell]["kv_bits"] == 16
    modes = [] if weights_only or only_8w else ["low-bit", "kv-fp", "quantized"] + (
        ["fp-model"] if fp_prompt_from_fp_model and cell != "fp" else [])
    fp_model = load_model(model_name)[0] if "fp-model" in modes else None
    tokens = eval_tokens(tok, "embedded", SEQ_LEN * WINDOWS_32)
    for mode in modes:
        nll = window_nll(model, tokens, SEQ_LEN, WINDOWS_32, sys_ids, mode, fp_model, progress=True)
        res[f"ppl_32w_{mode}"] = float(nll.double().mean().exp())
        res[f"curve_32w_{mode}"] = position_perplexity(nll, 32).tolist()
        res["first_tokens_32w_" + mode] = float(nll[:, :16].double().mean().exp())
    res["eval_s"] = time.perf_counter() - t
    res["torch_threads"] = torch.get_num_threads()
    res["commit"] = git_commit()
    return res


def load_jobs(out: Path) -> dict:
    path = out.with_suffix(".json")
    return json.loads(path.read_text())["jobs"] if path.is_file() else {}


def save_jobs(out: Path, jobs: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"jobs": jobs, "protocol": __doc__}, indent=1) + "\n")


def _row_label(r: dict, cell: str) -> str:
    """What the job ran: the label of its recorded config (older jobs: the cell's)."""
    from bisup.config import QuantConfig

    return QuantConfig.from_dict(r["config"]).label() if "config" in r else _cell_label(cell)


def _commit_of(r: dict) -> str:
    return (r.get("commit") or "not recorded")[:12]


def _cell_label(cell: str) -> str:
    c = CELLS[cell]
    g = "per-channel" if c["w_group_size"] == -1 else f"g{c['w_group_size']}"
    if c["method"] == "gptq":
        return f"GPTQ W{c['w_bits']}A{c['a_bits']} {g} (weights only)"
    w = "GPTQ" if c["gptq"] else "RTN"
    method = {"quarot": "QuaRot", "atom": "Atom"}[c["method"]]
    return f"{method}+{w} W{c['w_bits']}A{c['a_bits']} {g} KV{c['kv_bits']}"


ABLATION_CELL = "quarot_rtn_g64"
ABLATION_VARIANTS = ("clip_only", "smooth_only", "lowrank_only", "rounding_only", "rotation_only", "no_rounding",
                     "no_e2e")


def _f2(v) -> str:
    return "" if v is None else f"{v:.2f}"


def _vs_base(jobs: dict, cell: str, r: dict) -> str:
    base = jobs.get(f"{cell}:base")
    return "" if base is None or r is base else f"{100 * (r['ppl_8w'] / base['ppl_8w'] - 1):+.1f}%"


def _other_text(jobs: dict, cell: str, r: dict) -> str:
    """'head / pydoc' perplexities, each with its change vs the cell's base when both were measured."""
    base = jobs.get(f"{cell}:base")
    cells = []
    for dataset in OTHER_TEXT:
        v = r.get(f"ppl_8w_{dataset}")
        b = None if base is None or base is r else base.get(f"ppl_8w_{dataset}")
        cells.append("" if v is None else f"{v:.2f}" + ("" if b is None else f" ({100 * (v / b - 1):+.1f}%)"))
    return " / ".join(cells) if any(cells) else ""


def markdown(jobs: dict) -> str:
    fp = jobs.get("fp:base")
    calib = sorted({r["config"]["n_calib"] for r in jobs.values() if "config" in r})
    lines = [f"Calibration: the first {' or '.join(map(str, calib))} x {SEQ_LEN} windows of the calibration split "
             "(each row's config records its own).", "",
             "| what ran (label from the job's config) | row | ppl 8w (no prompt) | 8w vs base "
             "| other text 8w: wiki head / Python docs (vs base) | ppl 32w all low-bit "
             "| ppl 32w prompt KV FP (prompt run low-bit) | ppl 32w prompt KV FP (prompt run FP) "
             "| ppl 32w prompt KV FP (FP model) | quantize s | peak RSS MiB | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if fp:
        lines.append(f"| FP (W16A16) | - | {_f2(fp['ppl_8w'])} | | {_other_text(jobs, 'fp', fp)} | {_f2(fp.get('ppl_32w_low-bit'))} "
                     f"| {_f2(fp.get('ppl_32w_kv-fp'))} | {_f2(fp.get('ppl_32w_quantized'))} | | | {fp['peak_rss_mib']:.0f} "
                     f"| {_commit_of(fp)} |")
    names = {"base": "base / +horizontal", "bisup": "+vertical / +both",
             "no_e2e": "+vertical / +both, block-wise stage only",
             "bisup_prompt": "+vertical / +both, prompt-aware training",
             "bisup_sink": "+vertical / +both, trained with the sink token's KV FP",
             "bisup_morning": "+vertical / +both, the defaults of 2026-12-07 morning"}
    for cell in CELLS:
        for variant in names:
            r = jobs.get(f"{cell}:{variant}")
            if r is None or cell == ABLATION_CELL:
                continue
            lines.append(f"| {_row_label(r, cell)} | {names[variant]} | {_f2(r['ppl_8w'])} | {_vs_base(jobs, cell, r)} "
                         f"| {_other_text(jobs, cell, r)} | {_f2(r.get('ppl_32w_low-bit'))} | {_f2(r.get('ppl_32w_kv-fp'))} "
                         f"| {_f2(r.get('ppl_32w_quantized'))} "
                         f"| {_f2(r.get('ppl_32w_fp-model'))} | {r['quantize_s']:.0f} | {r['peak_rss_mib']:.0f} "
                         f"| {_commit_of(r)} |")
    rows = [(cell, v) for cell in CELLS for v in ("base",) + ABLATION_VARIANTS + ("bisup",)
            if f"{cell}:{v}" in jobs and cell == ABLATION_CELL]
    if rows:
        lines += ["", "Ablation of BiSup's parameter spaces (8-window protocol; each space alone, the defaults, "
                  "the defaults without learned rounding):", "",
                  "| what ran | parameter spaces | ppl 8w | vs base | other text 8w: wiki head / Python docs (vs base) "
                  "| quantize s | peak RSS MiB | commit |",
                  "|---|---|---|---|---|---|---|---|"]
        spaces = {"base": "none (base)", "clip_only": "weight + activation clipping", "smooth_only": "smoothing",
                  "lowrank_only": "low-rank compensation", "rounding_only": "learned rounding",
                  "rotation_only": "learned head rotations",
                  "no_rounding": "the defaults but learned rounding",
                  "no_e2e": "the defaults but the end-to-end stage", "bisup": "the defaults of the job's commit"}
        for cell, v in rows:
            r = jobs[f"{cell}:{v}"]
            lines.append(f"| {_row_label(r, cell)} | {spaces[v]} | {_f2(r['ppl_8w'])} | {_vs_base(jobs, cell, r)} "
                         f"| {_other_text(jobs, cell, r)} | {r['quantize_s']:.0f} | {r['peak_rss_mib']:.0f} | {_commit_of(r)} |")
    return "\n".join(lines) + "\n"


def plots(jobs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in CELLS if f"{c}:base" in jobs and f"{c}:bisup" in jobs  # (8w-only cells have no 32w bars)
             and all("ppl_32w_low-bit" in jobs[f"{c}:{v}"] for v in ("base", "bisup"))]
    if cells:
        fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(cells), 4))
        bars = [("base", "base", "low-bit"), ("+horizontal", "base", "quantized"),
                ("+vertical", "bisup", "low-bit"), ("+both", "bisup", "quantized")]
        width = 0.8 / len(bars)
        for i, (label, variant, mode) in enumerate(bars):
            vals = [jobs[f"{c}:{variant}"][f"ppl_32w_{mode}"] for c in cells]
            xs = [j + (i - 1.5) * width for j in range(len(cells))]
            ax.bar(xs, vals, width, label=label)
        if "fp:base" in jobs:
            ax.axhline(jobs["fp:base"]["ppl_32w_low-bit"], color="k", ls="--", lw=1, label="FP")
        ax.set_xticks(range(len(cells)), [_cell_label(c).replace(" W", "\nW") for c in cells], fontsize=8)
        ax.set_ylabel("perplexity (32 x 512, behind the system prompt)")
        ax.legend(fontsize=8)
        model = next((j["model"] for j in jobs.values() if "model" in j), DEFAULT_MODEL)
        ax.set_title(f"BiSup on {model} (embedded corpus, held-out)")
        fig.tight_layout()
        fig.savefig(out.with_name(out.name + "_bars.png"), dpi=120)
        plt.close(fig)
    key = next((k for k in ("quarot_g64", "atom_g64")  # (8w-only jobs have no curves)
                if all("curve_32w_low-bit" in jobs.get(f"{k}:{v}", {}) for v in ("base", "bisup"))), None)
    if key:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in ("base", "bisup"):
            for mode in ("low-bit", "quantized"):
                curve = jobs[f"{key}:{variant}"][f"curve_32w_{mode}"]
                xs = [16 + 32 * i for i in range(len(curve))]
                ax.plot(xs, curve, marker=".", label=f"{variant}, prompt KV {'FP' if mode == 'quantized' else 'low-bit'}")
        if "fp:base" in jobs:
            curve = jobs["fp:base"]["curve_32w_low-bit"]
            ax.plot([16 + 32 * i for i in range(len(curve))], curve, "k--", label="FP")
        ax.set_xlabel("position in the window (tokens after the system prompt; 32-token buckets)")
        ax.set_ylabel("perplexity")
        ax.set_title(_cell_label(key))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_name(out.name + "_positions.png"), dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default="", help="comma-separated CELL:VARIANT (fp:base for the FP row)")
    p.add_argument("--fp-model-prompt", action="store_true", help="also the prompt KV computed by the FP model")
    p.add_argument("--only-8w", action="store_true",
                   help="the 8-window protocol only (ablation rows: no system-prompt evaluation)")
    p.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                   help="the model of the jobs run now (a second table: give it its own --out)")
    p.add_argument("--n-calib", type=int, default=N_CALIB,
                   help="calibration windows of the jobs run now (another count: give them their own --out)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:
        cell, variant = a.one.split(":")
        print("RESULT " + json.dumps(run_job(cell, variant, a.fp_model_prompt, a.only_8w, a.model, a.n_calib)))
        return 0
    jobs = load_jobs(a.out)
    for job in filter(None, a.jobs.split(",")):
        cell, _, variant = job.partition(":")
        if cell != "fp" and (cell not in CELLS or variant not in VARIANTS):
            raise SystemExit(f"unknown job {job!r}: cells {list(CELLS)}, variants {list(VARIANTS)}")
        cmd = [sys.executable, __file__, "--one", job, "--model", a.model, "--n-calib", str(a.n_calib)] + (["--fp-model-prompt"] if a.fp_model_prompt else []) + (
            ["--only-8w"] if a.only_8w else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{job}: failed (exit {proc.returncode}): {proc.stdout[-500:]}", flush=True)
            continue
        res = json.loads(lines[-1][7:])
        res["wall_s"] = time.perf_counter() - t
        jobs[job] = res
        save_jobs(a.out, jobs)
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("curve") and k != "config"}), flush=True)
    md = markdown(jobs)
    a.out.with_suffix(".md").write_text(md)
    plots(jobs, a.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
