"""The measurements behind bisup.eval.diagnose (what each one means: the package doc)."""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from bisup.eval.diagnose import hooks as H
from bisup.eval.diagnose.align import check_compatible, check_tokenizers, reference_for
from bisup.eval.diagnose.report import Report
from bisup.models.adapters import get_adapter

ModelEntry = Union[nn.Module, str, Path]
EDGE_FRACTION = 0.1  # "first" / "last" positions in the summaries: 10% of the window each


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _windows(tokens: torch.Tensor, seq_len: int, max_windows: Optional[int]) -> torch.Tensor:
    """[n, T] windows: rows of a 2-D tensor, or consecutive seq_len chunks of a 1-D one."""
    if tokens.dim() == 2:
        w = tokens
    else:
        n = tokens.numel() // seq_len
        w = tokens.flatten()[: n * seq_len].reshape(n, seq_len)
    if max_windows:
        w = w[:max_windows]
    if w.shape[0] == 0 or w.shape[1] < 4:
        raise ValueError(f"diagnose: need at least one window of >= 4 tokens, got tokens of shape {tuple(tokens.shape)} "
                         f"with seq_len={seq_len}")
    return w.long()


def _entries(quantized_models) -> List[Tuple[Optional[str], ModelEntry]]:
    if isinstance(quantized_models, (nn.Module, str, Path)):
        quantized_models = [quantized_models]
    if isinstance(quantized_models, Mapping):
        return list(quantized_models.items())
    return [(None, m) for m in quantized_models]


def _load(entry: ModelEntry, device, mode: Optional[str]):
    """(model, tokenizer or None, source) for a model object or a model directory."""
    if isinstance(entry, nn.Module):
        return entry, None, None
    import bisup

    path = Path(entry)
    try:
        model, tok = bisup.load_quantized(path, device=device, return_tokenizer=True, mode=mode)
    except FileNotFoundError:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"diagnose: {path} is neither a bisup-quantized nor a transformers model directory")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
        model = model.to(device).eval()
        has_tok = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
        tok = AutoTokenizer.from_pretrained(str(path)) if has_tok else None
    return model, tok, str(path)


def model_label(model: nn.Module, fallback: str) -> str:
    """QuantConfig.label() of model.bisup_config, e.g. 'QuaRot+GPTQ W4A4 g64 KV4' (fallback for other models)."""
    cfg = getattr(model, "bisup_config", None)
    if cfg is None:
        return fallback
    return cfg.label() + (" (real)" if cfg.mode == "real" else "")


@contextlib.contextmanager
def _quiet():
    """No generation-config chatter from transformers while we call generate once per window."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _logits(adapter, normed: torch.Tensor) -> torch.Tensor:
    logits = adapter.lm_head()(normed)
    cap = getattr(adapter.text_config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def _pad_id(model) -> int:
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return eos if isinstance(eos, int) else 0


def _edges(x: torch.Tensor) -> Tuple[float, float]:
    """(mean of the first, mean of the last EDGE_FRACTION of a per-position curve), NaNs skipped."""
    k = max(1, int(round(x.numel() * EDGE_FRACTION)))
    return float(x[:k].nanmean()), float(x[-k:].nanmean())


# ------------------------------------------------------------------------------------------------
# the FP model: NLL per position, activation statistics before any transform, KV injection
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _fp_pass(fp_model: nn.Module, windows: torch.Tensor, progress: bool) -> dict:
    a = get_adapter(fp_model)
    dev = next(fp_model.parameters()).device
    pairs = [((i, n), a.get_linear(layer, n)) for i, layer in enumerate(a.layers()) for n in a.linear_names()]
    stats = {k: (H.Mean(), H.Mean()) for k, _ in pairs}

    def record(key, x, out):
        stats[key][0].add(H.token_kurtosis(x).mean())
        stats[key][1].add(H.token_max_to_mean(x).mean())

    nll = []
    for ids in tqdm(windows, desc="diagnose: FP model", disable=not progress, leave=False):
        with H.linear_hooks(pairs, record):
            logits = fp_model(ids[None].to(dev)).logits
        nll.append(H.token_nll(logits, ids[None]))
    return {"nll": nll, "kurtosis": {k: float(v[0].value()) for k, v in stats.items()},
            "max_to_mean": {k: float(v[1].value()) for k, v in stats.items()}}


def injection_positions(seq_len: int, n: int) -> List[int]:
    n = max(1, min(n, seq_len))
    return sorted({int(round(i * (seq_len - 1) / max(1, n - 1))) for i in range(n)}) if n > 1 else [0]


@torch.no_grad()
def _injection(fp_model: nn.Module, windows: torch.Tensor, n_positions: int, bits: int, progress: bool) -> dict:
    """Quantize K/V of one position s (every layer) in the FP model; error of the last layer's
    output at every position t, per s, averaged over windows."""
    a = get_adapter(fp_model)
    dev = next(fp_model.parameters()).device
    last = {"h": a.layers()[-1]}
    T = windows.shape[1]
    positions = injection_positions(T, n_positions)
    heat = H.Mean()
    bar = tqdm(total=len(windows) * len(positions), desc="diagnose: KV injection", disable=not progress, leave=False)
    for ids in windows:
        ids = ids[None].to(dev)
        with H.record_outputs(last) as got:
            fp_model(ids, logits_to_keep=1)
        base = got["h"][-1]
        rows = []
        for s in positions:
            with H.inject_kv_error(a, s, bits), H.record_outputs(last) as got:
                fp_model(ids, logits_to_keep=1)
            rows.append(H.token_rel_error(got["h"][-1], base))
            bar.update()
        heat.add(torch.stack(rows))
    bar.close()
    heat = heat.value()
    # by distance: positions s > 0 only; the first token (the attention sink every later token reads)
    # is summarised on its own, else its row would dominate the far distances
    by_distance, counts = [], []
    later = [(r, s) for r, s in enumerate(positions) if s > 0] or list(enumerate(positions))
    for d in range(T):
        vals = [heat[r, s + d] for r, s in later if s + d < T]
        by_distance.append(float(torch.stack(vals).mean()) if vals else float("nan"))
        counts.append(len(vals))
    before = [float(heat[r, :s].abs().max()) for r, s in enumerate(positions) if s > 0]
    first = float(heat[0, 1:].mean()) if positions[0] == 0 and T > 1 else float("nan")
    return {"bits": bits, "positions": positions, "error": heat.tolist(), "by_distance": by_distance,
            "by_distance_count": counts, "first_token_mean_error": first, "max_error_before_injection": max(before) if before else 0.0}


# ------------------------------------------------------------------------------------------------
# one quantized model
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _with_fp_prompt(model: nn.Module, adapter, ids: torch.Tensor, p: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(last layer's output, logits) at positions p..T-1 when the first p tokens are a system prompt
    kept at full precision by bisup.generate (the library's own FP16 prompt segment)."""
    import bisup

    mods = {"h": adapter.layers()[-1], "n": adapter.final_norm()}
    with H.record_outputs(mods) as got, _quiet():
        # an explicit all-ones mask: generate would otherwise mask every token equal to the pad id
        bisup.generate(model, ids[:, p:], system_ids=ids[:, :p], max_new_tokens=1, do_sample=False,
                       pad_token_id=_pad_id(model), attention_mask=torch.ones_like(ids))
    h, n = got["h"][-1], got["n"][-1]
    if h.shape[1] != ids.shape[1] - p:
        raise RuntimeError(f"diagnose: with a {p}-token FP prompt the model's last forward saw {h.shape[1]} tokens, "
                           f"expected {ids.shape[1] - p}")
    return h, _logits(adapter, n)


@torch.no_grad()
def _measure_model(fp_model: nn.Module, model: nn.Module, name: str, windows: torch.Tensor, fp: dict,
                   prompt_lens: Sequence[int], progress: bool) -> dict:
    dev = next(model.parameters()).device
    ref, ref_what = reference_for(fp_model, model, windows[:1].to(next(fp_model.parameters()).device), name)
    qa, ra = get_adapter(model), get_adapter(ref)
    q_layers, r_layers = qa.layers(), ra.layers()
    L, T = qa.num_layers, windows.shape[1]
    names = qa.linear_names()
    q_lin = {(i, n): qa.get_linear(layer, n) for i, layer in enumerate(q_layers) for n in names}
    pairs = [((i, n), ra.get_linear(layer, n)) for i, layer in enumerate(r_layers) for n in names]
    lin = {k: (H.Mean(), H.Mean(), H.Mean()) for k in q_lin}

    def probe(key, x, out):  # the quantized linear on exactly the reference linear's input
        qlin = q_lin[key]
        lin[key][0].add(H.token_rel_error(qlin(x), out).mean())
        xq = H.quantizer_input(qlin, x)
        lin[key][1].add(H.token_kurtosis(xq).mean())
        lin[key][2].add(H.token_max_to_mean(xq).mean())

    acc, loc, pos_err, pos_dnll, q_nll = H.Mean(), H.Mean(), H.Mean(), H.Mean(), H.Mean()
    prompt = {p: (H.Mean(), H.Mean()) for p in prompt_lens}
    ref_nll_diff = 0.0
    for w, ids in enumerate(tqdm(windows, desc=f"diagnose: {name}", disable=not progress, leave=False)):
        ids = ids[None].to(dev)
        fp_nll = fp["nll"][w]
        # the reference (FP function, quantized model's bases); each linear of the quantized model probed
        with H.capture_layers(r_layers) as rc, H.linear_hooks(pairs, probe):
            ref_nll = H.token_nll(ref(ids).logits, ids)
        ref_nll_diff = max(ref_nll_diff, float((ref_nll - fp_nll).abs().max()))
        # (a) end to end: the accumulated error
        with H.capture_layers(q_layers) as qc:
            nll = H.token_nll(model(ids).logits, ids)
        acc.add(torch.stack([H.token_rel_error(qc.outputs[l], rc.outputs[l]).mean() for l in range(L)]))
        pos_err.add(H.token_rel_error(qc.outputs[-1], rc.outputs[-1]))
        pos_dnll.add(nll - fp_nll)
        q_nll.add(nll.mean())
        del qc
        # (b) every layer fed the reference's input: the local error
        with H.capture_layers(q_layers, replace=rc.inputs) as lc:
            model(ids, logits_to_keep=1)
        loc.add(torch.stack([H.token_rel_error(lc.outputs[l], rc.outputs[l]).mean() for l in range(L)]))
        del lc
        # horizontal suppression: the first p tokens a full-precision system prompt
        for p in prompt_lens:
            h, logits = _with_fp_prompt(model, qa, ids, p)
            err = torch.full((T,), float("nan"), dtype=torch.float64, device="cpu")  # H.Mean keeps CPU sums
            err[p:] = H.token_rel_error(h, rc.outputs[-1][:, p:])
            dnll = torch.full((T - 1,), float("nan"), dtype=torch.float64, device="cpu")
            dnll[p:] = H.token_nll(logits, ids[:, p:]) - fp_nll[p:]
            prompt[p][0].add(err)
            prompt[p][1].add(dnll)
        del rc
    if ref is not fp_model:
        del ref
    return _model_result(name, model, ref_what, ref_nll_diff, acc, loc, pos_err, pos_dnll, q_nll, prompt, lin, fp)


def _model_result(name, model, ref_what, ref_nll_diff, acc, loc, pos_err, pos_dnll, q_nll, prompt, lin, fp) -> dict:
    cfg = getattr(model, "bisup_config", None)
    acc, loc = acc.value(), loc.value()
    curves = {"0": {"error": pos_err.value().tolist(), "nll_increase": pos_dnll.value().tolist()}}
    for p, (e, d) in prompt.items():
        curves[str(p)] = {"error": e.value().tolist(), "nll_increase": d.value().tolist()}
    p_max = max([0] + list(prompt))
    fp_mean = float(torch.stack(fp["nll"]).mean())
    dnll0 = pos_dnll.value()
    first, last = _edges(dnll0)
    e_first, e_last = _edges(pos_err.value())
    rows = []
    for (i, n), (err, k_after, mm_after) in lin.items():
        rows.append({"layer": i, "linear": n.rsplit(".", 1)[-1], "output_error": float(err.value()),
                     "kurtosis_before": fp["kurtosis"][(i, n)], "kurtosis_after": float(k_after.value()),
                     "max_to_mean_before": fp["max_to_mean"][(i, n)], "max_to_mean_after": float(mm_after.value())})
    rows.sort(key=lambda r: -r["output_error"])
    prompt_summary = {}
    for key, c in curves.items():
        tail_d = torch.tensor(c["nll_increase"][p_max:], dtype=torch.float64, device="cpu")
        tail_e = torch.tensor(c["error"][p_max:], dtype=torch.float64, device="cpu")
        prompt_summary[key] = {"nll_increase": float(tail_d.nanmean()), "error": float(tail_e.nanmean())}
    return {
        "name": name,
        "config": None if cfg is None else cfg.to_dict(),
        "reference": ref_what,
        "reference_max_nll_diff": ref_nll_diff,
        "ppl": math.exp(float(q_nll.value())),
        "nll_increase": float(q_nll.value()) - fp_mean,
        "vertical": {"accumulated": acc.tolist(), "local": loc.tolist()},
        "horizontal": curves,
        "linears": rows,
        "summary": {
            "accumulated_last_layer": float(acc[-1]), "local_last_layer": float(loc[-1]),
            "local_mean": float(loc.mean()), "accumulated_over_local_last_layer": float(acc[-1] / max(float(loc[-1]), 1e-30)),
            "nll_increase_first_positions": first, "nll_increase_last_positions": last,
            "error_first_positions": e_first, "error_last_positions": e_last,
            "positions_from": p_max, "with_fp_prompt": prompt_summary,
        },
    }


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def diagnose(fp_model: nn.Module, quantized_models, tokens: torch.Tensor, seq_len: int = 256,
             max_windows: Optional[int] = 4, prompt_lens: Sequence[int] = (16, 64), inject_positions: int = 16,
             inject_bits: int = 4, tokenizer=None, mode: Optional[str] = None, progress: bool = True) -> Report:
    """Where the quantization error of each model in `quantized_models` comes from and where it goes.

    fp_model: the full-precision model the others were quantized from. quantized_models: models,
    directories (bisup-quantized, or transformers; loaded one at a time, in `mode` when given), a
    list of them or a {name: model or directory} dict. tokens: held-out token ids, 1-D (cut into
    windows of seq_len) or [n, T]; at most max_windows windows are used, one at a time.
    prompt_lens: lengths P of the full-precision system prompt for the horizontal curves.
    inject_positions / inject_bits: rows of the KV-injection heat map (FP model, one token's K/V at
    inject_bits). tokenizer: the FP model's; directories with another tokenizer are refused.
    Returns a Report (.to_json(), .to_markdown(), .save(out_dir) with the plots).
    """
    windows = _windows(tokens, seq_len, max_windows)
    T = windows.shape[1]
    prompt_lens = sorted({int(p) for p in prompt_lens if int(p) > 0})
    if prompt_lens and prompt_lens[-1] > T - 2:
        raise ValueError(f"diagnose: FP prompt lengths {prompt_lens} must leave at least 2 tokens of a {T}-token window")
    was_training = fp_model.training
    fp_model.eval()
    vocab = get_adapter(fp_model).embeddings().weight.shape[0]
    if int(windows.max()) >= vocab:
        raise ValueError(f"diagnose: token id {int(windows.max())} is outside the FP model's vocabulary ({vocab})")
    fp = _fp_pass(fp_model, windows, progress)
    injection = _injection(fp_model, windows, inject_positions, inject_bits, progress)
    dev = next(fp_model.parameters()).device
    results, seen = [], set()
    for i, (name, entry) in enumerate(_entries(quantized_models)):
        model, tok, source = _load(entry, dev, mode)
        label = name or model_label(model, Path(source).name if source else f"model {i}")
        if label in seen:
            label = f"{label} ({Path(source).name if source else i})"
        seen.add(label)
        check_compatible(fp_model, model, label)
        check_tokenizers(tokenizer, tok, label)
        model.eval()
        res = _measure_model(fp_model, model, label, windows, fp, prompt_lens, progress)
        res["source"] = source
        results.append(res)
        del model
    fp_model.train(was_training)
    fp_mean = float(torch.stack(fp["nll"]).mean())
    settings = {"windows": int(windows.shape[0]), "seq_len": int(T), "prompt_lens": prompt_lens,
                "inject_positions": injection["positions"], "inject_bits": inject_bits,
                "error": "per-token ||h_q - h_ref|| / ||h_ref||, averaged over tokens and windows",
                "num_layers": get_adapter(fp_model).num_layers}
    return Report(settings=settings, fp={"ppl": math.exp(fp_mean), "nll": fp_mean}, models=results,
                  injection=injection)
