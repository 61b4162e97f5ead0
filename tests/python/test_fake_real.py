"""Fake mode computes what the real kernels compute (issue 10).

FakeQuantLinear's inference path runs the integer GEMM's arithmetic (on the CPU the QuantLinear twin itself,
elsewhere bisup.nn.fake_quant.integer_linear),
so a fake-mode linear equals its QuantLinear bit for bit, and a fake-mode model with KV quantization
gives the real-mode logits and greedy tokens. What is not bit-identical is the attention's fp32
summation order (SDPA on fake-quantized K/V vs bisup.ops.attention on the packed cache, ~1e-7
relative): that reaches the logits only through a code on a rounding boundary downstream.
"""
import copy

import pytest
import torch
from torch import nn

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.models.adapters import get_adapter
from bisup.models.tiny import random_tokens, tiny_model
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear, GemmWeight, integer_linear
from bisup.nn.quant_linear import QuantLinear
from bisup.nn.real_kv import make_cache
from bisup.nn.real_linear import fake_to_real
from bisup.quant.codes import quantize_weight
from bisup.quantize import to_real

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _fake_and_real(model, config, calib=None, tokenizer=None):
    """The model quantized in fake mode, and a deep copy of it converted to real mode (same codes)."""
    fake = bisup.quantize_model(model, config, calib_data=calib, tokenizer=tokenizer, progress=False)
    real = copy.deepcopy(fake)
    rcfg = config.replace(mode="real")
    to_real(real, get_adapter(real), rcfg)
    real.bisup_config = rcfg
    return fake, real


# ------------------------------------------------------------------------------------------------
# one linear: bit for bit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, n, w_bits, a_bits, group, outliers, clip, bias", [
    (96, 40, 4, 4, 32, None, 0.9, True),
    (128, 24, 3, 3, 32, None, 1.0, False),
    (96, 40, 4, 4, -1, None, 0.8, True),
    (112, 40, 4, 4, 32, [3, 17, 40, 41, 50, 60, 61, 62, 70, 71, 72, 80, 81, 90, 100, 111], 0.9, True),  # ragged last group
    (160, 48, 3, 4, 64, list(range(0, 160, 10)), 1.0, False),
])
def test_fake_linear_equals_quant_linear_bit_for_bit(dtype, k, n, w_bits, a_bits, group, outliers, clip, bias):
    gen = torch.Generator().manual_seed(k + n)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    lin = lin.to(dtype)
    idx = None if outliers is None else torch.tensor(outliers)
    aq = ActQuantizer(a_bits, group, True, clip, outlier_idx=idx, outlier_bits=8)
    fq = FakeQuantLinear(lin, w_bits, group, True, 1.0, act_quantizer=aq, outlier_idx=idx, outlier_bits=8)
    real = fake_to_real(fq, a_bits, clip)
    assert isinstance(real, QuantLinear)
    x = torch.randn(3, 37, k, generator=gen)
    x[..., 5] *= 30  # a large channel: big groups next to small ones
    x = x.to(dtype)
    with torch.no_grad():
        y_fake, y_real = fq(x), real(x)
        # on the CPU fake mode runs the QuantLinear twin itself; integer_linear (the path of other devices
        # and of layouts the CPU kernel refuses) must agree with it bit for bit too
        y_int = integer_linear(x, GemmWeight(fq.weight_codes(), k, x.device), a_bits, clip, fq.bias)
    assert y_fake.dtype == y_real.dtype == y_int.dtype == dtype
    assert torch.equal(y_fake, y_real)
    assert torch.equal(y_int, y_real)
    # the old simulation (a float matmul of dequantized operands) rounds differently
    float_path = torch.nn.functional.linear(aq(x), fq.weight, fq.bias)
    if dtype == torch.float32:
        assert not torch.equal(float_path, y_real)
        assert _rel(float_path, y_real) < 1e-5


def test_outliers_below_8_bits_take_integer_linear_not_the_int8_kernel():
    """The CPU kernel's outlier segment is INT8: a 4-bit outlier layout (fake mode only) runs integer_linear."""
    gen = torch.Generator().manual_seed(7)
    lin = nn.Linear(96, 24)
    idx = torch.arange(0, 96, 6)
    aq = ActQuantizer(4, 32, True, 1.0, outlier_idx=idx, outlier_bits=4)
    fq = FakeQuantLinear(lin, 4, 32, True, 1.0, act_quantizer=aq, outlier_idx=idx, outlier_bits=4)
    x = torch.randn(5, 96, generator=gen)
    with torch.no_grad():
        want = integer_linear(x, GemmWeight(fq.weight_codes(), 96, x.device), 4, 1.0, fq.bias)
        assert fq._cpu_kernel_twin(x) is None
        assert torch.equal(fq(x), want)


def test_training_keeps_the_differentiable_float_path():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 16)
    fq = FakeQuantLinear(lin, 4, 32, act_quantizer=ActQuantizer(4, 32))
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    y = fq(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(fq(x), y.detach(), rtol=1e-5, atol=1e-5)


def test_codes_follow_in_place_edits_of_the_weight():
    """The integer path runs the codes of the CURRENT weight: an in-place edit onto another grid point
    is seen (codes recovered again), an edit off every grid falls back to the float path."""
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 8, bias=False)
    fq = FakeQuantLinear(lin, 4, 32, act_quantizer=ActQuantizer(4, 32))
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        before = fq(x)
        wc = quantize_weight(torch.randn(8, 64, generator=gen), 4, 32)
        fq.weight.copy_(wc.dequantize(64, torch.float32))
        after = fq(x)
        ref = fake_to_real(FakeQuantLinear.from_codes(wc, 64, None, ActQuantizer(4, 32)), 4, 1.0)(x)
        assert not torch.equal(before, after) and torch.equal(after, ref)
        fq.weight.mul_(1.0001)  # off the grid: no codes, the float simulation
        torch.testing.assert_close(fq(x), torch.nn.functional.linear(ActQuantizer(4, 32)(x), fq.weight),
                                   rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# a tiny model: logits and greedy tokens
# ------------------------------------------------------------------------------------------------
def _record_linears(model):
    """{name: (input, output)} of every decoder linear's first call (forward hooks stay on the model)."""
    adapter = get_adapter(model)
    seen = {}
    for i, layer in enumerate(adapter.layers()):
        for name in adapter.linear_names():
            def hook(module, args, out, key=f"model.layers.{i}.{name}"):
                seen.setdefault(key, (args[0].detach().clone(), out.detach().clone()))
            adapter.get_linear(layer, name).register_forward_hook(hook)
    return seen


TINY = dict(w_bits=4, a_bits=4, kv_bits=4, w_group_size=32, a_group_size=32, a_clip=0.9)


# gemma3: sliding-window layers (window 8 < the 40 tokens and 32 generated ones: the window slides
# over the FP prompt segment and the low-bit one); its widths (48) take per-channel groups only.
GEMMA3 = dict(w_group_size=-1, a_group_size=-1)


@pytest.mark.parametrize("family, method, extra", [
    ("llama", "quarot", {}), ("llama", "atom", dict(atom_outliers=16)),
    ("llama", "quarot", dict(prompt_len=5, kv_group_size=16)),
    ("gemma3", "quarot", GEMMA3), ("gemma3", "quarot", dict(prompt_len=5, kv_group_size=16, **GEMMA3)),
    ("gemma3", "rtn", dict(prompt_len=3, **GEMMA3)),
    # BiSup's learned head rotations: the learned Q/K rotation in the cache, the value one in the weights
    ("llama", "quarot", dict(prompt_len=5, bisup=BiSupConfig(epochs=1, rank=4, head_rotation=True, rotation_lr=1e-2)))])
def test_tiny_model_fake_equals_real_with_kv_quantization(family, method, extra):
    cfg = QuantConfig(method=method, **{**TINY, **extra})
    fake, real = _fake_and_real(tiny_model(family), cfg, calib=random_tokens(4, 48, seed=5))
    ids = random_tokens(2, 40, seed=3)
    seen_fake, seen_real = _record_linears(fake), _record_linears(real)
    with torch.no_grad():
        lf = fake(ids).logits
        lr = real(ids, cache=make_cache(real)).logits
    assert _rel(lr, lf) < 1e-5, _rel(lr, lf)
    assert torch.equal(lf, lr)  # bit for bit: the same codes, GEMM arithmetic and attention op
    # every linear that got the same input gave the same output, bit for bit
    same_input = [name for name in seen_fake if torch.equal(seen_fake[name][0], seen_real[name][0])]
    assert "model.layers.0.self_attn.q_proj" in same_input and len(same_input) >= len(seen_fake) // 2
    for name in same_input:
        assert torch.equal(seen_fake[name][1], seen_real[name][1]), name
    prompt = random_tokens(1, 8, seed=9)
    kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        gf, gr = fake.generate(prompt, **kw), real.generate(prompt, **kw)
    assert torch.equal(gf.sequences, gr.sequences)
    if cfg.prompt_len == 0:  # (fake mode's prompt positions assume no eviction: see nn/kv_cache.py)
        assert all(torch.equal(a, b) for a, b in zip(gf.logits, gr.logits))


# ------------------------------------------------------------------------------------------------
# SmolLM2 (model-sized: BISUP_SLOW=1)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["quarot", "atom"])
def test_smollm2_fake_and_real_perplexity_and_generation_agree(method):
    from bisup.eval.perplexity import perplexity
    from bisup.models.default import is_available, load_default_model

    if not is_available():
        pytest.skip("the embedded default model is not installed")
    model, tok = load_default_model()
    cfg = QuantConfig(method=method, w_bits=4, a_bits=4, kv_bits=4, w_group_size=64, a_group_size=64, a_clip=0.9,
                      n_calib=8, calib_seq_len=256)
    fake, real = _fake_and_real(model, cfg, tokenizer=tok)
    ppl_fake = perplexity(fake, tok, max_windows=8, progress=False)
    ppl_real = perplexity(real, tok, max_windows=8, progress=False)
    assert abs(ppl_real / ppl_fake - 1) < 2e-3, (ppl_fake, ppl_real)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gf = fake.generate(ids, max_new_tokens=32, do_sample=False)
        gr = real.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(gf, gr)
