"""MixedPrecisionKVCache under model.generate() on a tiny random Llama (and Qwen3), CPU."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bisup.nn import MixedPrecisionKVCache, enable_bisup_attention

# `past_key_values` (transformers <= 5.1x) was renamed `cache` in 5.2x, which still accepts it.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=256, attn_implementation="sdpa")
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy decoding is not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def ids(n, seed=1, batch=1):
    return torch.randint(0, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, cache=None, new=8):
    kw = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad():
        return model.generate(input_ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def teacher_forced_logits(model, seq, cache, first):
    """Logits of seq[first:] fed one token at a time after a prefill of seq[:first]."""
    with torch.no_grad():
        out = [model(seq[:, :first], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(first, seq.shape[1] - 1):
            out.append(model(seq[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("settings", [dict(prompt_len=10_000, kv_bits=4), dict(prompt_len=0, kv_bits=16)])
def test_fp_equivalent_cache_reproduces_hf_greedy(device, settings, op_calls):
    model = tiny_llama().to(device)
    x = ids(9).to(device)
    want = greedy(model, x)
    enable_bisup_attention(model)
    cache = MixedPrecisionKVCache(**settings, config=model.config)
    got = greedy(model, x, cache)
    assert torch.equal(got, want)
    assert op_calls == [9] * 2 + [1] * 2 * 7  # prefill, then 7 decode steps, 2 layers: all fused
    assert cache.get_seq_length() == want.shape[1] - 1
    assert all(layer.quant_len == 0 for layer in cache.layers)


def test_unsupported_head_dim_uses_sdpa_on_gpu(device, op_calls):
    """head_dim 96: the CPU twin takes it, the CUDA kernels do not, so on CUDA attention uses SDPA."""
    model = tiny_llama(hidden_size=192).to(device)  # 2 query heads of 96
    x = ids(9).to(device)
    want = greedy(model, x, new=4)
    enable_bisup_attention(model)
    assert torch.equal(greedy(model, x, MixedPrecisionKVCache(kv_bits=16, config=model.config), new=4), want)
    assert op_calls == ([] if device.type == "cuda" else [9] * 2 + [1] * 2 * 3)


def test_left_padded_batch_falls_back_to_masked_sdpa(op_calls):
    """A padding mask is not the op's plain causal mask: bisup attention must route it to SDPA."""
    model = tiny_llama()
    x = ids(9, batch=2)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # second sequence left-padded by 3
    with torch.no_grad():
        want = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        enable_bisup_attention(model)
        cache = MixedPrecisionKVCache(kv_bits=16, config=model.config)
        got = model.generate(x, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(got, want)
    assert op_calls == []


def test_precomputed_prompt_from_full_precision_model():
    model = tiny_llama()
    system, full = ids(7, seed=2), None
    full = torch.cat([system, ids(5, seed=3)], 1)
    want = greedy(model, full)
    prompt_cache = DynamicCache()
    with torch.no_grad():
        model(system, past_key_values=prompt_cache, use_cache=True)
    enable_bisup_attention(model)
    cache = MixedPrecisionKVCache.from_prompt_kv(prompt_cache, kv_bits=16)
    assert cache.get_seq_length() == 7 and cache.prompt_len == 7
    assert torch.equal(greedy(model, full, cache), want)
    # 8-bit KV after the FP prompt: the prompt stays untouched, later tokens are packed
    cache8 = MixedPrecisionKVCache.from_prompt_kv(prompt_cache, kv_bits=8)
    out = greedy(model, full, cache8, new=4)
    assert torch.equal(cache8.layers[0].k_prompt, prompt_cache.layers[0].keys)
    assert cache8.layers[0].quant_len == out.shape[1] - 1 - 7


def test_quantized_kv_logits_close_and_fused_path_matches_unfused(op_calls):
    model = tiny_llama()
    seq = ids(30, seed=4)
    with torch.no_grad():
        ref = model(seq).logits[:, 9:-1]  # the positions teacher_forced_logits predicts from
    # (prompt_len, bits): first prompt_len tokens FP, the rest quantized; SDPA on dequantized K/V
    unfused = {(p, bits): teacher_forced_logits(model, seq, MixedPrecisionKVCache(p, bits, config=model.config), 10)
               for p, bits in ((8, 4), (8, 8), (0, 4), (16, 4))}
    err = {key: ((lg - ref).norm() / ref.norm()).item() for key, lg in unfused.items()}
    # measured with these seeds: 4-bit 0.12, 8-bit 0.007 relative logit error
    assert err[8, 8] < 0.02 and err[8, 4] < 0.2, err
    # horizontal suppression: more full-precision prompt tokens, smaller error (0.18 > 0.12 > 0.07)
    assert err[0, 4] > err[8, 4] > err[16, 4], err
    enable_bisup_attention(model)
    fused = teacher_forced_logits(model, seq, MixedPrecisionKVCache(8, 4, config=model.config), 10)
    # bisup.ops.attention on the packed cache == SDPA on the dequantized cache, up to fp32 summation
    # order (which can flip a rounding when the next layer's K/V is quantized; measured 3e-4)
    torch.testing.assert_close(fused, unfused[8, 4], rtol=0, atol=2e-3)
    # the prefill (Tq=10, after which L=10) has a plain causal mask too: every call is fused
    assert op_calls == [10] * 2 + [1] * 2 * 19
    assert (unfused[8, 8].argmax(-1) == ref.argmax(-1)).all()


def test_memory_report():
    model = tiny_llama()
    cache = MixedPrecisionKVCache(prompt_len=6, kv_bits=4, config=model.config)
    enable_bisup_attention(model)
    out = greedy(model, ids(10, batch=2), cache, new=8)
    total = out.shape[1] - 1
    b, h, d, layers = 2, 1, 64, 2
    prompt = 2 * b * h * 6 * d * 4  # K and V, fp32 model
    quant = 2 * b * h * (total - 6) * (d // 2 + 2 + 2)  # codes + fp16 scale + fp16 zero
    mem = cache.memory_bytes()
    assert mem["bytes"] == layers * (prompt + quant)
    assert mem["fp16_bytes"] == layers * 2 * b * h * total * d * 2
    assert mem["ratio"] == pytest.approx(mem["bytes"] / mem["fp16_bytes"])
    # an fp16 model's 4-bit segment costs (32 + 4) / 128 of fp16 per token
    layer = cache.layers[0]
    assert layer.k_q.shape[-1] == 32 and layer.k_scale.dtype == torch.float16


def test_qwen3_generate_fp_equivalent():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                         attn_implementation="sdpa")).eval()
    x = ids(8)
    want = greedy(model, x, new=6)
    enable_bisup_attention(model)
    assert torch.equal(greedy(model, x, MixedPrecisionKVCache(kv_bits=16, config=model.config), new=6), want)


def _orthogonal(d, seed=1):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def test_key_rotation_is_stored_and_matched_on_the_queries(op_calls):
    """A cache layer with a rotation R stores K R; bisup attention multiplies q by the same R."""
    model = tiny_llama()
    seq = ids(12, seed=4)
    with torch.no_grad():
        ref = model(seq).logits
        plain = DynamicCache()
        model(seq[:, :5], past_key_values=plain, use_cache=True)
    rot = _orthogonal(64)
    enable_bisup_attention(model)
    lazy = MixedPrecisionKVCache(kv_bits=16, rotations=[rot, None])  # layers made on first update
    got = teacher_forced_logits(model, seq, lazy, 5)
    torch.testing.assert_close(got, ref[:, 4:-1], rtol=1e-5, atol=1e-5)
    assert lazy.layers[0].rotation is rot and lazy.layers[1].rotation is None
    assert op_calls == [5] * 2 + [1] * 2 * 6
    # a precomputed prompt is rotated on the way in, too
    cache = MixedPrecisionKVCache.from_prompt_kv(plain, kv_bits=16, config=model.config, rotations=[rot, rot])
    torch.testing.assert_close(cache.layers[0].k_prompt, plain.layers[0].keys @ rot)
    with torch.no_grad():
        out = [model(seq[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1] for t in range(5, 11)]
    torch.testing.assert_close(torch.stack(out, 1), ref[:, 5:-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_kv has 2 layers, the model has 3"):
        MixedPrecisionKVCache.from_prompt_kv(plain, config=tiny_llama(num_hidden_layers=3).config)


def test_another_attention_implementation_gets_full_kv_from_the_cache(op_calls):
    """After switching back from bisup attention, `update` must return the whole dequantized K/V."""
    model = tiny_llama()
    x = ids(9)
    want = greedy(model, x, new=4)
    enable_bisup_attention(model)
    model.set_attn_implementation("sdpa")
    assert torch.equal(greedy(model, x, MixedPrecisionKVCache(kv_bits=16, config=model.config), new=4), want)
    assert op_calls == []


def test_cache_errors():
    with pytest.raises(ValueError, match="kv_bits must be one of"):
        MixedPrecisionKVCache(kv_bits=5)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        MixedPrecisionKVCache(group_size=12)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    cfg.layer_types = ["full_attention", "sliding_attention"]
    assert len(MixedPrecisionKVCache(config=cfg).layers) == 2  # sliding layers: the window is a mask
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match=r"supports \['full_attention', 'sliding_attention'\] layers, the config "
                                         r"also has \['chunked_attention'\]"):
        MixedPrecisionKVCache(config=cfg)
    with pytest.raises(ValueError, match="found no attention module"):
        enable_bisup_attention(torch.nn.Linear(2, 2))
