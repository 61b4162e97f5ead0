"""Model-level GPU check (scripts/gpu_check.sh): every method and BiSup on the tiny models of every
family with the model on the GPU (bf16), then real-mode generation; and the large-model path (model in
CPU RAM, layers computed on the GPU, activations offloaded) against the all-GPU run. Prints one line
per case and exits non-zero if any failed. Also runs on the CPU (`--device cpu`) as a dry run."""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

import bisup
from bisup import BiSupConfig, QuantConfig
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, random_tokens, tiny_model
from bisup.quantize import check_real, to_real

G = dict(w_group_size=32, a_group_size=32, kv_bits=4, kv_group_size=16)
CASES = {
    "rtn": QuantConfig(method="rtn", **G),
    "gptq": QuantConfig(method="gptq", **G),
    "atom": QuantConfig(method="atom", atom_outliers=16, gptq=True, **G),
    "quarot": QuantConfig(method="quarot", gptq=True, **G),
    "quarot+bisup": QuantConfig(method="quarot", bisup=BiSupConfig(epochs=1), **G),
    "atom+bisup": QuantConfig(method="atom", atom_outliers=16, bisup=BiSupConfig(epochs=1), **G),
}


def run_case(family: str, name: str, device: str) -> str:
    model = tiny_model(family, dtype=torch.bfloat16).to(device)
    cfg = CASES[name]
    bisup.quantize_model(model, cfg, calib_data=random_tokens(4, 64, seed=1), progress=False)
    ids = random_tokens(1, 12, seed=2).to(device)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.device.type == torch.device(device).type and torch.isfinite(logits).all()
    try:
        check_real(cfg.replace(mode="real"), model)
    except NotImplementedError as err:
        return f"fake ok; real refused: {str(err)[:80]}"
    to_real(model, get_adapter(model), cfg.replace(mode="real"))
    model.bisup_config = cfg.replace(mode="real")
    out = bisup.generate(model, ids, max_new_tokens=6)
    return f"fake + real ok, generated {tuple(out.shape)}"


def offload_case(device: str) -> str:
    """The large-model path: the model in CPU RAM (bf16), each layer computed on `device`
    (quantize_model(device=..., offload_activations=True)); same logits as the model run wholly there."""
    cfg = CASES["quarot"]
    calib, ids = random_tokens(4, 64, seed=1), random_tokens(1, 12, seed=2)
    on_device = tiny_model("llama", dtype=torch.bfloat16).to(device)
    bisup.quantize_model(on_device, cfg, calib_data=calib, progress=False)
    offloaded = tiny_model("llama", dtype=torch.bfloat16)
    bisup.quantize_model(offloaded, cfg, calib_data=calib, progress=False, device=device, offload_activations=True)
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    with torch.no_grad():
        a, b = on_device(ids.to(device)).logits.float(), offloaded.to(device)(ids.to(device)).logits.float()
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-2, rel
    return f"offloaded == on-device (relative difference {rel:.2e})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    failed = 0
    for family in FAMILIES:
        for name in CASES:
            t0 = time.perf_counter()
            try:
                msg = run_case(family, name, args.device)
            except Exception:  # report every case, then fail
                failed += 1
                msg = "FAILED\n" + traceback.format_exc(limit=6)
            print(f"{family:7s} {name:13s} {time.perf_counter() - t0:6.1f}s  {msg}", flush=True)
    t0 = time.perf_counter()
    try:
        msg = offload_case(args.device)
    except Exception:
        failed += 1
        msg = "FAILED\n" + traceback.format_exc(limit=6)
    print(f"llama   offload       {time.perf_counter() - t0:6.1f}s  {msg}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
