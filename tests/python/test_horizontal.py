"""Horizontal suppression: the system prompt's KV at full precision (bisup/generation.py::prompt_kv,
the value basis of nn/attention.py) and the evaluation protocol (bisup/eval/perplexity.py)."""
import pytest
import torch
from transformers import DynamicCache

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.eval.perplexity import (PROMPT_KV_MODES, default_system_prompt, perplexity_on_tokens, position_perplexity,
                                   system_prompt_ids, window_nll)
from bisup.generation import prompt_kv, set_prompt_len, split_chat
from bisup.models.adapters import get_adapter
from bisup.models.tiny import TINY_GROUP, random_tokens, tiny_model, tiny_tokenizer
from bisup.nn.attention import value_basis
from bisup.nn.real_kv import cache_argument, make_cache

G = TINY_GROUP


def _config(method, **kw):
    base = dict(method=method, w_group_size=G, a_group_size=G, kv_bits=4, atom_outliers=16)
    return QuantConfig(**{**base, **kw})


def _fp_cache(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_argument(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pairs(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_fp_model_prompt_kv_is_bit_identical_to_the_fp_models(family="llama"):
    """RTN leaves the K/V basis alone: the prompt segment is exactly the FP model's K/V, in the
    DynamicCache (fake mode) and in the real-mode cache's FP16 segment."""
    sys_ids = random_tokens(1, 12, seed=5)
    fp = tiny_model(family)
    q = bisup.quantize_model(tiny_model(family), _config("rtn", w_group_size=32, a_group_size=32, mode="real"),
                             progress=False)
    want = _fp_cache(fp, sys_ids)
    got = prompt_kv(q, sys_ids, fp_model=fp)
    for (k, v), (k0, v0) in zip(_pairs(got), want):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    cache = make_cache(q, prompt_kv=got)
    for layer, (k0, v0) in zip(cache.layers, want):
        assert torch.equal(layer.k_prompt, k0) and torch.equal(layer.v_prompt, v0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_quarot_value_basis_maps_the_fp_models_values(family):
    """QuaRot without quantization computes the FP function in a rotated basis: V is the FP model's
    V times the recorded per-head Hadamard (and K is unchanged)."""
    sys_ids = random_tokens(1, 12, seed=5)
    fp = tiny_model(family)
    rot = bisup.quantize_model(tiny_model(family), _config("quarot", w_bits=16, a_bits=16, kv_bits=16),
                               progress=False)
    adapter = get_adapter(rot)
    assert all(value_basis(adapter.attention(layer)) is not None for layer in adapter.layers())
    raw = _fp_cache(fp, sys_ids)
    ref = prompt_kv(rot, sys_ids)  # the rotated model's own K/V
    mapped = prompt_kv(rot, sys_ids, fp_model=fp)
    for (k, v), (km, vm), (k0, v0) in zip(_pairs(ref), _pairs(mapped), raw):
        torch.testing.assert_close(km, k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vm, v, rtol=1e-4, atol=1e-5)
        assert (v0 - v).abs().max() > 10 * (vm - v).abs().max() + 1e-3  # unmapped V is in another basis


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_bisup_smoothing_is_recorded_in_the_value_basis(method):
    """BiSup's v -> o smoothing (alone on RTN, after the Hadamard on QuaRot): the FP model's V mapped
    into the basis is close to the quantized model's own full-precision V (only weight quantization
    error left), unmapped it is not."""
    calib, sys_ids = random_tokens(4, 24), random_tokens(1, 12, seed=5)
    fp = tiny_model("llama")
    cfg = _config(method, w_bits=8, bisup=BiSupConfig(epochs=1, batch_size=2, rank=4, smooth=True))  # W8: little weight error
    q = bisup.quantize_model(tiny_model("llama"), cfg, calib_data=calib, progress=False)
    own, mapped, raw = _pairs(prompt_kv(q, sys_ids)), _pairs(prompt_kv(q, sys_ids, fp_model=fp)), _fp_cache(fp, sys_ids)
    for (_, v), (_, vm), (_, v0) in zip(own, mapped, raw):
        err_mapped = ((vm - v).norm() / v.norm()).item()
        err_raw = ((v0 - v).norm() / v.norm()).item()
        assert err_mapped < 0.05 and err_raw > 3 * err_mapped, (err_mapped, err_raw)


def test_value_basis_survives_save_load(tmp_path):
    q = bisup.quantize_model(tiny_model("llama"), _config("quarot", w_group_size=32, a_group_size=32),
                             progress=False)
    bisup.save_quantized(q, tmp_path / "q")
    loaded = bisup.load_quantized(tmp_path / "q")
    a, b = get_adapter(q), get_adapter(loaded)
    for la, lb in zip(a.layers(), b.layers()):
        assert torch.equal(value_basis(a.attention(la)), value_basis(b.attention(lb)))


def test_protocol_scores_the_same_tokens_in_every_mode():
    """On an unquantized model the prompt's KV is the same however it is made: all four modes agree,
    and they differ from the run without a prompt (the prompt is really there)."""
    fp = tiny_model("llama")
    tokens, sys_ids = random_tokens(1, 3 * 32, seed=1).flatten(), random_tokens(1, 10, seed=2)
    plain = window_nll(fp, tokens, 32, 3, progress=False)
    rows = {mode: window_nll(fp, tokens, 32, 3, sys_ids, mode, fp_model=fp, progress=False)
            for mode in PROMPT_KV_MODES}
    assert plain.shape == rows["low-bit"].shape == (3, 31)
    for mode in PROMPT_KV_MODES:
        torch.testing.assert_close(rows[mode], rows["low-bit"], rtol=1e-4, atol=1e-4)
    assert (plain - rows["low-bit"]).abs().max() > 1e-3
    curve = position_perplexity(rows["low-bit"], bucket=8)
    assert curve.shape == (4,) and torch.isfinite(curve).all()


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_fp_prompt_kv_changes_only_the_prompt_segment(mode):
    """KV4: low-bit and FP16 prompt KV (computed with unquantized or quantized activations) give
    different NLLs; fake and real mode agree on all three."""
    tokens, sys_ids = random_tokens(1, 2 * 32, seed=1).flatten(), random_tokens(1, 10, seed=2)
    cfg = _config("quarot", w_group_size=32, a_group_size=32, mode=mode)
    q = bisup.quantize_model(tiny_model("llama"), cfg, progress=False)
    low = window_nll(q, tokens, 32, 2, sys_ids, "low-bit", progress=False)
    fp16 = window_nll(q, tokens, 32, 2, sys_ids, "quantized", progress=False)
    kv_fp = window_nll(q, tokens, 32, 2, sys_ids, "kv-fp", progress=False)
    assert (low - fp16).abs().max() > 1e-4 and (low - kv_fp).abs().max() > 1e-4 and (kv_fp - fp16).abs().max() > 1e-4
    fake = bisup.quantize_model(tiny_model("llama"), cfg.replace(mode="fake"), progress=False)
    for prompt_mode, got in (("low-bit", low), ("quantized", fp16), ("kv-fp", kv_fp)):
        ref = window_nll(fake, tokens, 32, 2, sys_ids, prompt_mode, progress=False)
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_kv_fp_prompt_is_what_prompt_aware_training_computes(mode):
    """prompt_kv="kv-fp" (the prompt's KV precomputed with quantized activations) scores the window as
    one joint run of prompt + window does with QuantConfig.prompt_len = P (BiSup's prompt-aware training)."""
    tokens, sys_ids = random_tokens(1, 2 * 32, seed=1).flatten(), random_tokens(1, 10, seed=2)
    q = bisup.quantize_model(tiny_model("llama"), _config("quarot", w_group_size=32, a_group_size=32, mode=mode),
                             progress=False)
    kv_fp = window_nll(q, tokens, 32, 2, sys_ids, "kv-fp", progress=False)
    set_prompt_len(q, sys_ids.shape[1])
    for w in range(2):
        ids = torch.cat([sys_ids, tokens[None, w * 32:(w + 1) * 32]], dim=1)
        cache = make_cache(q)
        logits = q(ids, **({} if cache is None else {cache_argument(q): cache})).logits[0, 10:10 + 31].float()
        joint = torch.nn.functional.cross_entropy(logits, ids[0, 11:], reduction="none")
        torch.testing.assert_close(kv_fp[w], joint, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fp_model computes the prompt at full precision"):
        prompt_kv(q, sys_ids, tiny_model("llama"), activations="quantized")


def test_default_system_prompt_and_ids():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        default_system_prompt(tok)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{% if loop.first and m['role'] != 'system' %}"
                         "be brief\n{% endif %}{{ m['content'] }}\n{% endfor %}")
    assert default_system_prompt(tok) == "<user>be brief\n"
    assert system_prompt_ids(tok, "default").shape == (1, len("<user>be brief\n"))
    assert system_prompt_ids(None, [3, 4, 5]).tolist() == [[3, 4, 5]]
    with pytest.raises(ValueError, match="empty"):
        system_prompt_ids(None, [])


def test_split_chat_cuts_the_rendered_conversation_after_the_system_prompt():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{% if loop.first and m['role'] != 'system' %}"
                         "be brief\n{% endif %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    prefix = default_system_prompt(tok)
    assert split_chat(tok, [{"role": "user", "content": "hi"}], prefix) == ("<user>be brief\n", "hi\n<a>")
    with pytest.raises(ValueError, match="as a prefix"):
        split_chat(tok, [{"role": "user", "content": "hi"}], "<system>")


def test_protocol_errors():
    fp = tiny_model("llama")
    tokens, sys_ids = random_tokens(1, 64).flatten(), random_tokens(1, 4)
    with pytest.raises(ValueError, match="prompt_kv"):
        perplexity_on_tokens(fp, tokens, 32, 2, False, sys_ids, "fp16")
    with pytest.raises(ValueError, match="fp_model"):
        perplexity_on_tokens(fp, tokens, 32, 2, False, sys_ids, "fp-model")


def test_prompt_aware_calibration_and_set_prompt_len():
    from bisup.generation import prompt_aware_calibration, set_prompt_len
    from bisup.nn.attention import get_kv_spec

    calib, sys_ids = random_tokens(3, 16), random_tokens(1, 4, seed=7)
    windows, p = prompt_aware_calibration(calib, sys_ids)
    assert p == 4 and windows.shape == (3, 16)
    assert torch.equal(windows[:, :4], sys_ids.expand(3, -1)) and torch.equal(windows[:, 4:], calib[:, :12])
    with pytest.raises(ValueError, match="leaves nothing"):
        prompt_aware_calibration(calib, random_tokens(1, 16))
    q = bisup.quantize_model(tiny_model("llama"), _config("rtn", prompt_len=p), progress=False)
    adapter = get_adapter(q)
    set_prompt_len(q, 0)
    assert q.bisup_config.prompt_len == 0
    assert all(get_kv_spec(adapter.attention(layer)).prompt_len == 0 for layer in adapter.layers())
