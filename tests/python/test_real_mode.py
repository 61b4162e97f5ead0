"""mode="real" end to end on tiny models: QuantLinear + MixedPrecisionKVCache / bisup.ops.attention,
QuaRot's K rotation, Atom outliers, save/load across modes, generation with an FP system prompt."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import bisup
from bisup.checkpoint import CONFIG_FILE, TENSOR_FILE
from bisup.config import QuantConfig
from bisup.models.adapters import get_adapter
from bisup.models.tiny import random_tokens, tiny_model
from bisup.nn.attention import KVQuantSpec, fake_quant_kv, get_kv_spec, set_kv_quant, set_kv_rotation
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.nn.kv_cache import MixedPrecisionKVCache, MixedPrecisionKVLayer
from bisup.nn.quant_linear import QuantLinear
from bisup.nn.real_kv import enable_real_kv, make_cache

G = 32  # QuantLinear groups are multiples of 32
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")


def _quantize(family="llama", mode="real", calib=None, **kw):
    cfg = QuantConfig(mode=mode, **{**dict(w_group_size=G, a_group_size=G), **kw})
    return bisup.quantize_model(tiny_model(family), cfg, calib_data=calib, progress=False)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _per_token_rel(a, b):
    """Relative logit error of every position [B*T]."""
    return ((a - b).norm(dim=-1) / a.norm(dim=-1)).flatten()


def _close_except_rounding_ties(a, b, tol=1e-4, share=0.75):
    """Real and fake mode share every code, but K/V and activations come from different GEMMs: a
    value that sits on a rounding boundary may take the neighbouring code and perturb the
    positions after it. Most positions must agree to fp32 accuracy."""
    err = _per_token_rel(a, b)
    assert float((err < tol).float().mean()) >= share, err
    assert float(err.max()) < 0.2, err


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_real_kv_cache_holds_the_fake_quantized_keys_and_values(family, monkeypatch):
    model = _quantize(family, kv_bits=4, prompt_len=3)
    assert model.config._attn_implementation == "bisup"
    seen = {}
    update = MixedPrecisionKVLayer.update

    def spy(self, k, v, *a, **kw):
        seen[id(self)] = (k.clone(), v.clone())
        return update(self, k, v, *a, **kw)

    monkeypatch.setattr(MixedPrecisionKVLayer, "update", spy)
    cache = make_cache(model)
    _logits(model, random_tokens(2, 19), cache=cache)
    adapter = get_adapter(model)
    for i, layer in enumerate(cache.layers):
        spec = get_kv_spec(adapter.attention(adapter.layers()[i]))
        k, v = seen[id(layer)]
        kd, vd = layer.dequantized()
        assert layer.k_prompt.shape[2] == 3 and layer.quant_len == 16
        assert torch.equal(kd, fake_quant_kv(k, spec)) and torch.equal(vd, fake_quant_kv(v, spec))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_real_mode_with_kv_matches_fake_mode_through_the_fused_op(family, op_calls):
    ids = random_tokens(2, 20, seed=1)
    fake = _quantize(family, mode="fake", kv_bits=4, prompt_len=3)
    real = _quantize(family, kv_bits=4, prompt_len=3)
    fake_logits = _logits(fake, ids)
    assert op_calls == [20] * 2  # fake-mode inference runs real mode's attention computation too
    op_calls.clear()
    real_logits = _logits(real, ids)  # no cache given: one is made
    assert op_calls == [20] * 2  # both layers ran bisup.ops.attention on the mixed-precision cache
    assert torch.equal(fake_logits, real_logits)  # same codes, same GEMM arithmetic, same attention op


def test_generate_without_a_cache_uses_the_mixed_precision_cache(op_calls):
    model = _quantize("llama", kv_bits=4)
    ids = random_tokens(1, 9)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    assert op_calls == [9] * 2 + [1] * 2 * 3  # prefill, 3 decode steps, 2 layers: all fused


def test_rotated_real_kv_is_exact_without_quantization():
    """q and K rotated by the same orthogonal matrix (K inside the cache, after RoPE): same logits."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = random_tokens(1, 12)
    ref_cache = DynamicCache(config=model.config)
    ref = _logits(model, ids, cache=ref_cache)
    rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    attns = [adapter.attention(layer) for layer in adapter.layers()]
    for attn in attns:
        set_kv_rotation(attn, rot)
    set_kv_quant(model, attns, KVQuantSpec(bits=16, rotate=True))
    enable_real_kv(model, adapter)
    cache = MixedPrecisionKVCache(0, 16, -1, model.config, [rot] * len(attns))
    torch.testing.assert_close(_logits(model, ids, cache=cache), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.layers[0].k_prompt, ref_cache.layers[0].keys @ rot)  # stored rotated
    # another cache (unrotated keys): the attention rotates both q and k
    torch.testing.assert_close(_logits(model, ids, cache=DynamicCache(config=model.config)), ref, rtol=1e-5, atol=1e-5)
    # a mixed-precision cache without rotations stores the keys as they come: q stays unrotated too
    plain = MixedPrecisionKVCache(0, 16, -1, model.config)
    torch.testing.assert_close(_logits(model, ids, cache=plain), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.layers[0].k_prompt, ref_cache.layers[0].keys)


def test_quarot_real_mode_quantizes_the_rotated_keys():
    ids = random_tokens(2, 20)
    kw = dict(method="quarot", kv_bits=4)
    real = _logits(_quantize("llama", **kw), ids)
    fake = _logits(_quantize("llama", mode="fake", **kw), ids)
    unrotated = _logits(_quantize("llama", mode="fake", rotate_kv=False, **kw), ids)
    _close_except_rounding_ties(fake, real)
    assert float(_per_token_rel(fake, unrotated).median()) > 100 * float(_per_token_rel(fake, real).median())


def test_real_mode_rejects_what_the_kv_path_cannot_do():
    with pytest.raises(NotImplementedError, match=r"asymmetric and unclipped \(got kv_sym=True"):
        _quantize("llama", kv_bits=4, kv_sym=True)
    with pytest.raises(NotImplementedError, match=r"kv_bits must be one of \[3, 4, 8\] or 16 \(got 2\)"):
        _quantize("llama", kv_bits=2)
    with pytest.raises(NotImplementedError, match="kv_group_size must be -1 or a multiple of 8 dividing head_dim=32"):
        _quantize("llama", kv_bits=4, kv_group_size=24)
    with pytest.raises(NotImplementedError, match="group size must be -1 or a multiple of 32"):
        _quantize("llama", w_group_size=16, a_group_size=16)
    with pytest.raises(NotImplementedError, match=r"outlier count must be a multiple of 16 \(got 8"):
        _quantize("llama", method="atom", atom_outliers=8, calib=random_tokens(2, 16))
    _quantize("gemma3", w_group_size=-1, a_group_size=-1)  # without KV quantization Gemma3 runs


def test_make_cache_is_none_without_real_kv_and_checks_prompt_layers():
    assert make_cache(_quantize("llama", mode="fake", kv_bits=4)) is None
    assert make_cache(_quantize("llama")) is None  # kv_bits 16
    model = _quantize("llama", kv_bits=8, prompt_len=5)
    cache = make_cache(model)
    assert isinstance(cache, MixedPrecisionKVCache) and cache.prompt_len == 5 and len(cache.layers) == 2
    k = torch.zeros(1, 1, 4, 32)
    with pytest.raises(ValueError, match="prompt_kv has 1 layers, the model has 2"):
        make_cache(model, prompt_kv=[(k, k)])


# ------------------------------------------------------------------------------------------------
# Atom outliers: the INT8 channels are not clipped, in either mode
# ------------------------------------------------------------------------------------------------
def test_atom_real_matches_fake_with_clipped_activations():
    calib, ids = random_tokens(4, 32, seed=3), random_tokens(2, 16)
    kw = dict(method="atom", atom_outliers=16, a_clip=0.8)
    fake = _quantize("llama", mode="fake", calib=calib, **kw)
    real = _quantize("llama", calib=calib, **kw)
    lin = real.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QuantLinear) and lin.outlier_idx.numel() == 16 and lin.a_clip == 0.8
    err = _per_token_rel(_logits(fake, ids), _logits(real, ids))
    assert float(err.max()) < 1e-4, err


# ------------------------------------------------------------------------------------------------
# save / load: one format for both modes
# ------------------------------------------------------------------------------------------------
CASES = {
    "rtn-kv4": ("llama", dict(kv_bits=4, prompt_len=3)),
    "quarot-kv4": ("llama", dict(method="quarot", kv_bits=4)),
    "atom": ("qwen2", dict(method="atom", atom_outliers=16, a_clip=0.9)),
    "w3a3-per-channel": ("qwen2", dict(w_bits=3, a_bits=3, w_group_size=-1, a_group_size=-1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_round_trip_and_one_format_for_both_modes(tmp_path, case):
    family, kw = CASES[case]
    calib = random_tokens(4, 32, seed=3)
    ids = random_tokens(2, 16)
    real = _quantize(family, calib=calib, **kw)
    fake = _quantize(family, mode="fake", calib=calib, **kw)
    bisup.save_quantized(real, tmp_path / "real")
    bisup.save_quantized(fake, tmp_path / "fake")
    loaded = bisup.load_quantized(tmp_path / "real")
    assert loaded.bisup_config == real.bisup_config
    kinds = {type(m) for _, m in get_adapter(loaded).named_linears()}
    assert QuantLinear in kinds and FakeQuantLinear not in kinds
    assert torch.equal(_logits(loaded, ids), _logits(real, ids))
    # the same tensors whichever mode saved them
    t_real, t_fake = load_file(str(tmp_path / "real" / TENSOR_FILE)), load_file(str(tmp_path / "fake" / TENSOR_FILE))
    assert sorted(t_real) == sorted(t_fake)
    assert all(torch.equal(t_real[k], t_fake[k]) for k in t_real)
    meta_real = (tmp_path / "real" / CONFIG_FILE).read_text().replace('"mode": "real"', '"mode": "fake"')
    assert meta_real == (tmp_path / "fake" / CONFIG_FILE).read_text()
    # either file runs in either mode
    assert torch.equal(_logits(bisup.load_quantized(tmp_path / "fake", mode="real"), ids), _logits(real, ids))
    as_fake = bisup.load_quantized(tmp_path / "real", mode="fake")
    assert as_fake.bisup_config.mode == "fake"
    assert torch.equal(_logits(as_fake, ids), _logits(fake, ids))


def test_load_mode_errors(tmp_path):
    bisup.save_quantized(_quantize("llama", mode="fake", w_group_size=16, a_group_size=16), tmp_path / "q")
    with pytest.raises(NotImplementedError, match="group size must be -1 or a multiple of 32"):
        bisup.load_quantized(tmp_path / "q", mode="real")
    with pytest.raises(ValueError, match="mode='fast'"):
        bisup.load_quantized(tmp_path / "q", mode="fast")


def test_weight_bytes_of_a_real_model_equal_the_fake_one():
    from bisup.accounting import weight_bytes

    assert weight_bytes(_quantize("llama")) == weight_bytes(_quantize("llama", mode="fake"))


# ------------------------------------------------------------------------------------------------
# generation with a full-precision system prompt
# ------------------------------------------------------------------------------------------------
def _fp_prompt_kv(model, system):
    """Reference: K/V of the system prompt with the fake twin's (quantized) weights, activations unquantized."""
    cache = DynamicCache(config=model.config)
    _logits(model, system, cache=cache)
    return cache


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_system_prompt_kv_is_full_precision_and_later_tokens_low_bit(mode):
    model = _quantize("llama", mode=mode, kv_bits=4)
    twin = _quantize("llama", mode="fake")  # same weights; made FP-activation below
    for m in twin.modules():
        if isinstance(m, FakeQuantLinear):
            m.act_quantizer = None
    system, user = random_tokens(1, 7, seed=5), random_tokens(1, 4, seed=6)
    want = _fp_prompt_kv(twin, system)
    out, cache = bisup.generate(model, user, system_ids=system, return_cache=True, max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16) and torch.equal(out[:, :11], torch.cat([system, user], 1))
    for layer, ref in zip(cache.layers, want.layers):
        if mode == "real":  # the 7 prompt tokens FP (exactly the full-precision K/V), the rest 4-bit
            assert torch.equal(layer.k_prompt, ref.keys) and torch.equal(layer.v_prompt, ref.values)
            assert layer.quant_len == 16 - 1 - 7
        else:  # a DynamicCache that starts with the full-precision prompt K/V
            assert torch.equal(layer.keys[:, :, :7], ref.keys)
    # with quantized activations the model's own prompt K/V would differ; and quantization is back on
    own = DynamicCache(config=model.config)
    _logits(model, system, cache=own)
    assert not torch.allclose(own.layers[1].keys, want.layers[1].keys, atol=1e-3)
    assert all(m.act_quantizer is not None for m in model.modules() if isinstance(m, FakeQuantLinear))
    assert all(get_kv_spec(m) is not None for m in model.modules() if hasattr(m, "layer_idx"))


def test_system_prompt_from_an_fp_model():
    fp = tiny_model("llama")
    model = _quantize("llama", kv_bits=4)
    system, user = random_tokens(1, 6, seed=5), random_tokens(1, 3, seed=6)
    want = _fp_prompt_kv(fp, system)
    _, cache = bisup.generate(model, user, system_ids=system, fp_model=fp, return_cache=True, max_new_tokens=2,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(cache.layers[1].k_prompt, want.layers[1].keys)
    # QuaRot: the FP model's values are mapped into the per-head Hadamard basis (tests/python/test_horizontal.py)
    quarot = _quantize("llama", method="quarot", kv_bits=4)
    _, cache = bisup.generate(quarot, user, system_ids=system, fp_model=fp, return_cache=True, max_new_tokens=2,
                              do_sample=False, pad_token_id=0)
    basis = quarot.model.layers[1].self_attn.bisup_value_basis
    torch.testing.assert_close(cache.layers[1].v_prompt, torch.einsum("bhtd,hde->bhte", want.layers[1].values, basis))


def test_quarot_real_system_prompt_keys_are_rotated_in_the_cache():
    model = _quantize("llama", method="quarot", kv_bits=4)
    system, user = random_tokens(1, 6, seed=5), random_tokens(1, 3, seed=6)
    _, cache = bisup.generate(model, user, system_ids=system, return_cache=True, max_new_tokens=2, do_sample=False,
                              pad_token_id=0)
    from bisup.generation import prompt_kv

    plain = prompt_kv(model, system)
    rot = model.model.layers[0].self_attn.bisup_kv_rotation
    torch.testing.assert_close(cache.layers[0].k_prompt, plain.layers[0].keys @ rot)


# ------------------------------------------------------------------------------------------------
# perplexity
# ------------------------------------------------------------------------------------------------
def test_real_mode_perplexity_uses_a_cache_per_window(op_calls):
    from bisup.eval import perplexity_on_tokens

    tokens = random_tokens(1, 64, seed=2).flatten()
    real = perplexity_on_tokens(_quantize("llama", kv_bits=4), tokens, seq_len=16, max_windows=3, progress=False)
    assert op_calls == [16] * 2 * 3  # 3 windows x 2 layers, each on a fresh cache
    fake = perplexity_on_tokens(_quantize("llama", mode="fake", kv_bits=4), tokens, seq_len=16, max_windows=3,
                                progress=False)
    assert real == pytest.approx(fake, rel=1e-2)


# ------------------------------------------------------------------------------------------------
# on the device (the CUDA kernels when a GPU is visible)
# ------------------------------------------------------------------------------------------------
def _llama_head_dim_64():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_real_mode_model_on_the_device(device, op_calls):
    """A real-mode model (W4A4 g32, KV4, head_dim 64) moved to `device` runs QuantLinear and the fused
    attention there and agrees with the CPU twin; generation with an FP system prompt works there."""
    cfg = QuantConfig(mode="real", w_group_size=G, a_group_size=G, kv_bits=4, prompt_len=2)
    cpu = bisup.quantize_model(_llama_head_dim_64(), cfg, progress=False)
    dev = bisup.quantize_model(_llama_head_dim_64(), cfg, progress=False).to(device)
    ids = random_tokens(2, 24)
    _close_except_rounding_ties(_logits(cpu, ids), _logits(dev, ids.to(device)).cpu(), tol=1e-3)
    assert op_calls == [24] * 4  # two models x two layers, all fused
    system, user = random_tokens(1, 5, seed=5).to(device), random_tokens(1, 3, seed=6).to(device)
    out, cache = bisup.generate(dev, user, system_ids=system, return_cache=True, max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
    assert out.shape == (1, 12) and out.device.type == device.type
    layer = cache.layers[0]
    assert layer.k_prompt.shape[2] == 5 and layer.quant_len == 6 and layer.k_q.device.type == device.type


def test_linears_reading_one_tensor_share_its_quantization(monkeypatch):
    """q/k/v (and gate/up) read the same tensor: one quantize_pack serves them; a different tensor, an
    in-place change or other settings quantize again, and results equal unshared quantization."""
    import bisup.nn.quant_linear as ql

    calls = []
    real_qp = ql.ops.quantize_pack
    monkeypatch.setattr(ql.ops, "quantize_pack", lambda *a, **k: calls.append(1) or real_qp(*a, **k))
    gen = torch.Generator().manual_seed(0)
    lins = [QuantLinear.from_float(torch.nn.Linear(64, 32), 4, 4, 32, a_clip=0.9) for _ in range(3)]
    other_clip = QuantLinear.from_float(torch.nn.Linear(64, 32), 4, 4, 32, a_clip=0.8)
    x = torch.randn(5, 64, generator=gen)
    ys = [lin(x) for lin in lins]
    assert len(calls) == 1
    other_clip(x)
    assert len(calls) == 2
    ql._memo.clear()
    for lin, y in zip(lins, ys):
        ql._memo.clear()
        assert torch.equal(lin(x), y)
    calls.clear()
    lins[0](x)  # x is still the memo's tensor: no new quantization
    assert len(calls) == 0
    x.mul_(2)  # same object, new contents
    y2 = lins[1](x)
    assert len(calls) == 1
    ql._memo.clear()
    assert torch.equal(y2, lins[1](x))
