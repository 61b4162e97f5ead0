"""BiSup's first measurement on the embedded default (SmolLM2-135M-Instruct, W4A4 g64).

Each row runs in its own subprocess (so peak RSS is that row's): load the model, quantize with
bisup.quantize_model (calibration: the first n_calib windows of the embedded corpus's calibration
split), evaluate perplexity on the held-out windows (bisup.eval.perplexity's default: 8 x 512) and
on VALIDATION windows, the last windows of the calibration split (bisup.eval.data.validation_batches:
the same windows whatever --n-calib; what the defaults are chosen on; never the held-out evaluation
windows; rows before 2026-12-07 used the windows right after the calibration ones). Writes JSON + a
markdown table.

  python bench/bisup_grid.py [--rows quarot_rtn,quarot_rtn_bisup,...] [--n-calib 16] [--val-windows 16]
                             [--set rows.FIELD=VALUE ...] [--out bench/results/bisup_first]
  python bench/bisup_grid.py --list
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bisup.config import BiSupConfig, QuantConfig
from bisup.provenance import git_commit

BASE = dict(w_bits=4, a_bits=4, kv_bits=4, w_group_size=64, a_group_size=64, a_clip=0.9, method="quarot")
ROWS = {
    "quarot_rtn": dict(BASE),
    "quarot_rtn_bisup": dict(BASE, bisup={}),
    "quarot_gptq": dict(BASE, gptq=True),
    "quarot_gptq_bisup": dict(BASE, gptq=True, bisup={}),
    "quarot_w4a16": dict(BASE, a_bits=16, kv_bits=16, a_clip=1.0),
    "quarot_w4a16_bisup": dict(BASE, a_bits=16, kv_bits=16, a_clip=1.0, bisup={}),
}


VAL_SOURCE = "calibration split tail"  # where val_ppl's windows come from (older rows: after the calib windows)


def run_one(name: str, overrides: dict, n_calib: int, val_windows: int, windows: int, seq_len: int) -> dict:
    import torch

    import bisup
    from bisup.eval.data import calibration_batches, validation_batches
    from bisup.eval.perplexity import perplexity, perplexity_on_tokens
    from bisup.models.default import load_default_model

    torch.manual_seed(0)
    spec = dict(ROWS[name])
    bis = spec.pop("bisup", None)
    if bis is not None:
        bis = dict(bis, **overrides.get("bisup", {}))
    spec.update({k: v for k, v in overrides.items() if k != "bisup"})
    cfg = bisup.QuantConfig(**spec, n_calib=n_calib, calib_seq_len=seq_len,
                            bisup=None if bis is None else bisup.BiSupConfig(**bis))
    model, tok = load_default_model()
    calib = calibration_batches(tok, n_calib, seq_len)
    t = time.perf_counter()
    bisup.quantize_model(model, cfg, calib_data=calib, progress=True)
    quant_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl = perplexity(model, tok, "embedded", seq_len, windows, progress=False)
    val_ppl = None if not val_windows else perplexity_on_tokens(
        model, validation_batches(tok, val_windows, seq_len).reshape(-1), seq_len, val_windows, False)
    eval_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    log = getattr(model, "bisup_log", None)
    return dict(row=name, config=cfg.to_dict(), ppl=ppl, val_ppl=val_ppl, quantize_s=quant_s, eval_s=eval_s,
                peak_rss_mib=rss, eval_windows=windows, seq_len=seq_len, n_calib=n_calib, val_windows=val_windows,
                val_source=VAL_SOURCE, torch_threads=torch.get_num_threads(), commit=git_commit(), label=cfg.label(), layer_log=log)


def lowrank_probe(rank: int = 8) -> dict:
    """Weight reconstruction error on the QuaRot-rotated default model's layer-0 and layer-15
    linears: RTN error, side branch Q(W) + E_r, and merged Q(W + g E_r) (E_r: rank-r SVD of W - Q(W))."""
    import torch

    import bisup
    from bisup.methods.quarot import rotate_model
    from bisup.models.adapters import get_adapter
    from bisup.models.default import load_default_model
    from bisup.quant.learnable import logit, lwc_quantize, svd_factors

    model, _ = load_default_model()
    adapter = get_adapter(model)
    rotate_model(model, adapter, bisup.QuantConfig(method="quarot"))
    out = {}
    for li in (0, 15):
        for name in adapter.linear_names():
            w = adapter.get_linear(adapter.layers()[li], name).weight.detach().float()
            full = torch.full((w.shape[0], w.shape[1] // 64), logit(1.0))
            q = lwc_quantize(w, 4, 64, True, full, full)[0]
            a, b = svd_factors(w - q, rank)
            e_r = a @ b
            row = {"rtn": (w - q).norm().item(), "side": (w - q - e_r).norm().item()}
            for g in (0.25, 0.5, 1.0):
                row[f"merged_{g}"] = (w - lwc_quantize(w + g * e_r, 4, 64, True, full, full)[0]).norm().item()
            out[f"{li}.{name}"] = row
    return out


def energy_probe(windows: int = 2) -> dict:
    """Per decoder layer of the default model (FP): the share of the layer output's energy sum_t |h_t|^2
    held by token 0 and by the 3 largest tokens, on the first calibration windows (why BiSupConfig.loss
    is per token: with the all-token MSE these few tokens own the block loss)."""
    import torch

    from bisup.eval.data import calibration_batches
    from bisup.models.default import load_default_model

    model, tok = load_default_model()
    with torch.no_grad():
        hidden = model(calibration_batches(tok, windows, 512), output_hidden_states=True).hidden_states
    out = {}
    for i, h in enumerate(hidden[1:]):  # output of decoder layer i (the last one after the final norm)
        e = h.double().square().sum(-1)
        total = e.sum(-1)
        out[i] = {"token0": float((e[:, 0] / total).mean()), "top3": float((e.topk(3, -1).values.sum(-1) / total).mean())}
    return out


def bisup_settings(b: dict) -> str:
    """The parameter spaces on, then every other BiSupConfig field that differs from today's default."""
    default = BiSupConfig().to_dict()
    spaces = "+".join(s for s in BiSupConfig.SPACES if b.get(s)) or "no space"
    rest = [f"{k}={b[k]}" for k in default if k not in BiSupConfig.SPACES and k in b and b[k] != default[k]]
    return spaces + (f" ({', '.join(rest)})" if rest else "")


def markdown(results) -> str:
    lines = ["| row | what ran (label from the config) | BiSup | calib windows | held-out ppl (8x512) | calib-val ppl "
             "| quantize s | peak RSS MiB | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        c = r["config"]
        meth = QuantConfig.from_dict(c).label()  # from the config that ran, against today's defaults
        b = c.get("bisup")
        bis = "-" if b is None else bisup_settings(b)
        where = "tail" if r.get("val_source") == VAL_SOURCE else "after calib"
        vp = "" if r["val_ppl"] is None else f"{r['val_ppl']:.2f} ({r['val_windows']} {where})"
        lines.append(f"| {r['row']} | {meth} | {bis} | {r.get('n_calib', '')} | {r['ppl']:.2f} | {vp} | {r['quantize_s']:.0f} | {r['peak_rss_mib']:.0f} | {(r.get('commit') or 'not recorded')[:12]} |")
    return "\n".join(lines) + "\n"


def parse_sets(items):
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        try:  # numbers, true/false/null, quoted strings; True / False; else the bare word as a string
            val = value == "True" if value in ("True", "False") else json.loads(value)
        except json.JSONDecodeError:
            val = value
        if key.startswith("bisup."):
            out.setdefault("bisup", {})[key[6:]] = val
        else:
            out[key] = val
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="quarot_rtn,quarot_rtn_bisup")
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--set", action="append", default=[], metavar="[bisup.]FIELD=VALUE")
    p.add_argument("--tag", default="", help="suffix of the row name in the table (an ablation)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bisup_first")
    p.add_argument("--append", action="store_true", help="add to the existing JSON instead of replacing it")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true")
    p.add_argument("--lowrank-probe", action="store_true", help="only the low-rank init probe (JSON to --out.lowrank.json)")
    p.add_argument("--energy-probe", action="store_true",
                   help="only the per-layer share of output energy held by token 0 (JSON to --out.energy.json, "
                        "e.g. --out bench/results/bisup_spaces)")
    a = p.parse_args(argv)
    if a.lowrank_probe:
        res = lowrank_probe()
        a.out.with_suffix(".lowrank.json").write_text(json.dumps(res, indent=1) + "\n")
        keys = list(next(iter(res.values())))
        mean = {k: sum(r[k] / r["rtn"] for r in res.values()) / len(res) for k in keys}
        print("mean error relative to RTN over", len(res), "linears:", json.dumps(mean))
        return 0
    if a.energy_probe:
        res = energy_probe()
        a.out.with_suffix(".energy.json").write_text(json.dumps(res, indent=1) + "\n")
        print("\n".join(f"layer {i:2d}: token 0 {r['token0']:.3f}, top 3 {r['top3']:.3f}" for i, r in res.items()))
        return 0
    if a.list:
        print("\n".join(f"{k}: {v}" for k, v in ROWS.items()))
        return 0
    overrides = parse_sets(a.set)
    if a.one is not None:
        print("RESULT " + json.dumps(run_one(a.one, overrides, a.n_calib, a.val_windows, a.windows, a.seq_len)))
        return 0
    json_path = a.out.with_suffix(".json")
    results = json.loads(json_path.read_text())["rows"] if a.append and json_path.is_file() else []
    for name in a.rows.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--n-calib", str(a.n_calib), "--val-windows",
               str(a.val_windows), "--windows", str(a.windows), "--seq-len", str(a.seq_len)]
        for s in a.set:
            cmd += ["--set", s]
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            res = dict(row=name + a.tag, error=f"exit {proc.returncode}: {proc.stdout[-300:]}")
        else:
            res = json.loads(lines[-1][7:])
            res["row"] = name + a.tag
            res["wall_s"] = time.perf_counter() - t
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("config", "layer_log")}), flush=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"rows": results}, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
