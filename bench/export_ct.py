"""Export to compressed-tensors on the embedded default (SmolLM2-135M): for each row, quantize (the
calibration split), measure bisup's perplexity (fake mode), export, load the export with transformers +
compressed-tensors (bisup.exporters.client) and measure its perplexity on the same held-out windows
(8 x 512, bisup.eval.perplexity's protocol). KV stays in floating point: the format carries no KV4.

    python bench/export_ct.py [--rows quarot_w4a16,quarot_w4a4,...] [--out bench/results/export_ct]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.eval import perplexity
from bisup.exporters.client import load_compressed_tensors
from bisup.models.default import load_default_model
from bisup.provenance import git_commit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_info, print_table, write_json  # noqa: E402

ENGINE = "compressed-tensors"
BASE = dict(method="quarot", gptq=True, w_bits=4, w_group_size=64, a_group_size=64, kv_bits=16)
ROWS = {
    "quarot_w4a16": (dict(BASE, a_bits=16), ()),
    "quarot_w4a4": (dict(BASE, a_bits=4, a_convention=ENGINE), ()),
    "quarot_w4a4_bisup": (dict(BASE, a_bits=4, a_convention=ENGINE, bisup=BiSupConfig(act_clip=False)), ()),
    # calibrated with bisup's own activation quantizer (clip 0.9, as the BiSup table), served with the engine's
    "quarot_w4a4_bisup_conv": (dict(BASE, a_bits=4, a_clip=0.9), ("act_quantizer",)),
    # other random rotations: how far the rounding of two Hadamard algorithms moves a W4A4 model
    "quarot_w4a4_seed1": (dict(BASE, a_bits=4, a_convention=ENGINE, rotation_seed=1), ()),
    "quarot_w4a4_seed2": (dict(BASE, a_bits=4, a_convention=ENGINE, rotation_seed=2), ()),
}


def label(config: QuantConfig, drop) -> str:
    """The row's name, made from the config that ran and what the export left out."""
    return config.label() + (" served with the engine's activation quantizer" if "act_quantizer" in drop else "")


def run_row(key: str, windows: int, seq_len: int) -> dict:
    fields, drop = ROWS[key]
    config = QuantConfig(**fields)
    model, tok = load_default_model()
    t = time.perf_counter()
    bisup.quantize_model(model, config, tokenizer=tok)
    quant_s = time.perf_counter() - t
    ppl_bisup = perplexity(model, tok, "embedded", seq_len, windows)
    transforms = {n: m.input_transform for n, m in model.named_modules() if getattr(m, "input_transform", None)}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        bisup.export(model, tmp, tokenizer=tok, drop=drop)
        export_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        client = load_compressed_tensors(tmp)
        ppl_client = perplexity(client, tok, "embedded", seq_len, windows)
        # the same client with bisup's online transform arithmetic: isolates the fp32 rounding of the
        # two Hadamard algorithms (everything else is the same computation: tests/python/test_export_ct.py)
        swapped = _use_bisup_transforms(client, transforms)
        ppl_same = perplexity(client, tok, "embedded", seq_len, windows) if swapped else ppl_client
    return dict(key=key, label=label(config, drop), config=config.to_dict(), drop=list(drop), quantize_s=quant_s,
                export_s=export_s, export_bytes=size, ppl_bisup=ppl_bisup, ppl_client=ppl_client,
                gap_pct=100.0 * (ppl_client - ppl_bisup) / ppl_bisup, online_transforms=swapped,
                ppl_client_bisup_transform=ppl_same, gap_same_transform_pct=100.0 * (ppl_same - ppl_bisup) / ppl_bisup)


def _use_bisup_transforms(client, transforms: dict) -> int:
    """Make the client's online transforms compute as bisup's do ({linear name: HadamardTransform});
    returns how many it replaced."""
    from compressed_tensors.transform.factory.hadamard import HadamardTransform as ClientTransform

    count = 0
    for name, module in client.named_modules():
        if isinstance(module, ClientTransform):
            module.forward = transforms[name.rsplit(".", 1)[0]].forward
            count += 1
    return count


def report(payload: dict, out: str) -> None:
    """The table (stdout) and the markdown of a run; labels made from each row's recorded config."""
    meta, rows = payload["meta"], payload["rows"]
    for r in rows:
        r["label"] = label(QuantConfig.from_dict(r["config"]), r["drop"])
    columns = ["label", "ppl_bisup", "ppl_client", "gap_pct", "gap_same_transform_pct", "quantize_s", "export_s"]
    print(f"FP perplexity {meta['ppl_fp']:.3f} ({meta['windows']} x {meta['seq_len']})")
    print_table(rows, columns)
    lines = [f"# bisup export -> compressed-tensors, SmolLM2-135M (commit {meta['commit']}, {meta['cpu']})", "",
             f"Perplexity on {meta['windows']} x {meta['seq_len']} held-out tokens of the embedded corpus; FP "
             f"{meta['ppl_fp']:.2f}. bisup: fake mode; client: the export loaded by transformers + compressed-tensors "
             "(float32); last gap: the client computing the online Hadamard as bisup does. KV in floating point. "
             "Export sizes are of float32 exports (the online Hadamard's +-1 matrix is stored per layer).",
             "", "| row | bisup | client | gap | gap, bisup's Hadamard arithmetic | quantize s | export MiB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['ppl_bisup']:.3f} | {r['ppl_client']:.3f} | {r['gap_pct']:+.2f}% | "
              f"{r['gap_same_transform_pct']:+.3f}% | {r['quantize_s']:.0f} | {r['export_bytes'] / 2**20:.1f} |"
              for r in rows]
    if meta.get("note"):
        lines += ["", meta["note"]]
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="bench/results/export_ct")
    ap.add_argument("--report", action="store_true", help="only re-make the table and markdown from OUT.json")
    args = ap.parse_args()
    if args.report:
        payload = json.loads(Path(args.out + ".json").read_text())
        report(payload, args.out)
        write_json(args.out + ".json", payload)  # the labels as report() made them from the configs
        return
    keys = [k for k in args.rows.split(",") if k]
    unknown = sorted(set(keys) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; expected from {list(ROWS)}")
    commit = git_commit()  # the code that runs (taken before it runs)
    model, tok = load_default_model()
    ppl_fp = perplexity(model, tok, "embedded", args.seq_len, args.windows)
    del model
    rows = [run_row(k, args.windows, args.seq_len) for k in keys]
    meta = dict(commit=commit, cpu=cpu_info()[0], torch=torch.__version__, windows=args.windows,
                seq_len=args.seq_len, ppl_fp=ppl_fp, client="transformers + compressed-tensors (bisup.exporters.client)")
    payload = dict(meta=meta, rows=rows)
    write_json(args.out + ".json", payload)
    report(payload, args.out)


if __name__ == "__main__":
    main()
