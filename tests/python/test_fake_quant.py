import pytest
import torch
from torch import nn

from bisup.models.adapters import get_adapter
from bisup.models.tiny import random_tokens, tiny_model
from bisup.nn.attention import KVQuantSpec, fake_quant_kv, set_kv_quant, set_kv_rotation
from bisup.nn.fake_quant import ActQuantizer, FakeQuantLinear
from bisup.quant.codes import quantize_weight
from bisup.quant.quantizer import fake_quantize


def _linear(n, k, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[:, 3] *= 20  # an outlier input channel
        lin.weight[1, :] = 0  # an all-zero row -> zero groups
    return lin


@pytest.mark.parametrize("bits, group, sym", [(4, 16, True), (3, 32, True), (4, -1, True), (4, 16, False), (8, 48, True)])
def test_weight_matches_the_group_quantizer(bits, group, sym):
    lin = _linear(24, 96)
    fq = FakeQuantLinear(lin, bits, group, w_sym=sym)
    ref = fake_quantize(lin.weight.detach(), bits, group, sym, scale_dtype=torch.float16)
    assert torch.equal(fq.weight, ref)
    assert torch.equal(fq.bias, lin.bias)
    levels = fq.weight[0].reshape(-1, 96 if group == -1 else group)
    assert all(row.unique().numel() <= 2**bits for row in levels)
    assert torch.equal(fq.weight[1], torch.zeros(96))


def test_forward_is_linear_of_quantized_activation_and_weight():
    lin = _linear(24, 96)
    aq = ActQuantizer(4, 16)
    fq = FakeQuantLinear(lin, 4, 16, act_quantizer=aq, input_transform=lambda t: 2 * t)
    x = torch.randn(2, 5, 96)
    xq = fake_quantize(2 * x, 4, 16, True, scale_dtype=torch.float16)
    torch.testing.assert_close(fq(x), xq @ fq.weight.T + fq.bias, rtol=0, atol=1e-5)
    assert not torch.equal(xq, 2 * x)


def test_act_quantizer_is_identity_at_16_bits_and_per_token():
    x = torch.randn(3, 7, 64)
    assert ActQuantizer(16)(x) is x
    y = ActQuantizer(4, -1)(x)
    # per token: scaling one token does not change the others
    x2 = x.clone()
    x2[0, 0] *= 100
    y2 = ActQuantizer(4, -1)(x2)
    assert torch.equal(y[1:], y2[1:]) and torch.equal(y[0, 1:], y2[0, 1:])


def test_outlier_channels_keep_8_bits_and_rest_in_ragged_groups():
    torch.manual_seed(0)
    x = torch.randn(4, 40)
    idx = torch.tensor([3, 17, 30])
    x[:, idx] *= 50
    y = ActQuantizer(4, 16, outlier_idx=idx, outlier_bits=8)(x)
    main = [i for i in range(40) if i not in idx.tolist()]  # 37 channels: groups 16, 16, 5
    ref_main = torch.cat([fake_quantize(x[:, main][:, a:b], 4, -1, True, scale_dtype=torch.float16)
                          for a, b in [(0, 16), (16, 32), (32, 37)]], 1)
    torch.testing.assert_close(y[:, main], ref_main, rtol=0, atol=0)
    torch.testing.assert_close(y[:, idx], fake_quantize(x[:, idx], 8, -1, True, scale_dtype=torch.float16), rtol=0, atol=0)
    # the outliers at 8 bits are much more accurate than they would be in 4-bit groups
    err8 = (y[:, idx] - x[:, idx]).abs().mean()
    err4 = (fake_quantize(x, 4, -1, True)[:, idx] - x[:, idx]).abs().mean()
    assert err8 < err4 / 4


def test_weight_outliers_dequantize_exactly_from_codes():
    lin = _linear(16, 64, bias=False)
    idx = torch.tensor([3, 9])
    fq = FakeQuantLinear(lin, 4, 16, outlier_idx=idx, outlier_bits=8)
    wc = fq.weight_codes()
    assert wc.codes.shape == (16, 62) and wc.scales.shape == (16, 4)  # groups 16,16,16,14
    assert wc.outlier_codes.shape == (16, 2) and int(wc.outlier_codes.abs().max()) > 7
    assert torch.equal(wc.dequantize(64, torch.float32), fq.weight)
    torch.testing.assert_close(fq.weight[:, idx], lin.weight[:, idx], rtol=0, atol=float(lin.weight[:, idx].detach().abs().max()) / 127)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_set_weight_recovers_codes_with_and_without_scales(dtype):
    lin = _linear(24, 96).to(dtype)
    fq = FakeQuantLinear(lin, 4, 32)
    other = quantize_weight(lin.weight * 0.5 + 0.01, 4, 32)  # a different grid, as GPTQ would produce
    w = other.dequantize(96, dtype)
    fq.set_weight(w, scales=other.scales)
    assert torch.equal(fq.weight_codes().codes, other.codes)
    fq.set_weight(w)  # no scales: codes are inferred from the weight
    assert torch.equal(fq.weight_codes().dequantize(96, dtype), w)
    with pytest.raises(ValueError, match="not on the grid|not on the given"):
        fq.set_weight(w + 1e-3, scales=other.scales)
    with pytest.raises(ValueError, match="shape"):
        fq.set_weight(w[:, :64])


def test_off_grid_weight_without_scales_is_rejected_on_export():
    lin = _linear(8, 32)
    fq = FakeQuantLinear(lin, 4, 16)
    fq.set_weight(lin.weight.detach())  # full precision, not on any 4-bit grid
    with pytest.raises(ValueError, match="cannot recover integer codes"):
        fq.weight_codes()


def test_16_bit_weight_is_kept():
    lin = _linear(8, 32)
    fq = FakeQuantLinear(lin, 16, 16, act_quantizer=ActQuantizer(4, 16))
    assert torch.equal(fq.weight, lin.weight)
    with pytest.raises(ValueError, match="floating point"):
        fq.weight_codes()


def test_kv_fake_quant_keeps_prompt_positions():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 10, 16)
    spec = KVQuantSpec(bits=4, prompt_len=4)
    kq = fake_quant_kv(k, spec)
    assert torch.equal(kq[:, :, :4], k[:, :, :4])
    ref = fake_quantize(k[:, :, 4:], 4, -1, False, scale_dtype=torch.float16)
    assert torch.equal(kq[:, :, 4:], ref) and not torch.equal(ref, k[:, :, 4:])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fakequant_attention_matches_sdpa_when_off_and_changes_logits_when_on(family):
    model = tiny_model(family)
    a = get_adapter(model)
    ids = random_tokens(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
        set_kv_quant(model, [a.attention(l) for l in a.layers()], KVQuantSpec(bits=16))
        assert model.config._attn_implementation == "bisup"
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        set_kv_quant(model, [a.attention(l) for l in a.layers()], KVQuantSpec(bits=4))
        q4 = model(ids).logits
        set_kv_quant(model, [a.attention(l) for l in a.layers()], KVQuantSpec(bits=4, prompt_len=16))
        all_prompt = model(ids).logits
    assert not torch.allclose(q4, ref, atol=1e-4)
    torch.testing.assert_close(all_prompt, ref, rtol=1e-5, atol=1e-5)
    rel = (q4 - ref).norm() / ref.norm()
    assert rel < 0.2  # 4-bit KV perturbs, it does not destroy


def test_rotated_kv_is_exact_without_quantization():
    model = tiny_model("llama")
    a = get_adapter(model)
    ids = random_tokens(1, 12)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        ref = model(ids).logits
        for l in a.layers():
            set_kv_rotation(a.attention(l), q)
        set_kv_quant(model, [a.attention(l) for l in a.layers()], KVQuantSpec(bits=16, rotate=True))
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits, group", [(4, 16), (3, -1), (8, 32), (2, 64)])
def test_inference_fast_path_is_bit_identical_to_the_differentiable_one(bits, group):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 64) * torch.logspace(-3, 2, 64)
    x[0, 0] = 0  # a zero token
    aq = ActQuantizer(bits, group, clip=0.9)
    with torch.no_grad():
        fast = aq(x)
    slow = aq(x.clone().requires_grad_(True))  # takes the STE path
    assert torch.equal(fast, slow.detach())
    assert torch.equal(fast, fake_quantize(x, bits, group, True, 0.9, scale_dtype=torch.float16))


def test_outlier_channels_are_quantized_without_clipping():
    """a_clip shrinks the low-bit groups only; Atom's INT8 outlier channels keep their full range
    (as QuantLinear's INT8 segment does)."""
    x = torch.randn(5, 66, generator=torch.Generator().manual_seed(2)) * 3
    idx = torch.tensor([60, 4])
    main = torch.tensor([i for i in range(66) if i not in (4, 60)])
    with torch.no_grad():
        y = ActQuantizer(4, 16, clip=0.5, outlier_idx=idx, outlier_bits=8)(x)
    assert torch.equal(y[:, idx], fake_quantize(x[:, idx], 8, -1, True, 1.0, scale_dtype=torch.float16))
    assert torch.equal(y[:, main], fake_quantize(x[:, main], 4, 16, True, 0.5, scale_dtype=torch.float16))


@pytest.mark.parametrize("sym, outliers", [(True, None), (False, None), (True, [3, 17, 40])])
def test_from_codes_runs_exactly_the_given_codes(sym, outliers):
    """FakeQuantLinear.from_codes: weight == codes dequantized, the codes object is what it exports,
    bias and activation quantizer are used, and the codes follow the module across .to()."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=gen)
    idx = None if outliers is None else torch.tensor(outliers)
    wc = quantize_weight(w, 4, 16, sym=sym, outlier_idx=idx)
    bias = torch.randn(24, generator=gen)
    aq = ActQuantizer(4, 16, outlier_idx=idx)
    fq = FakeQuantLinear.from_codes(wc, 64, bias, aq, w_clip=0.9)
    assert torch.equal(fq.weight, wc.dequantize(64, torch.float32))
    assert fq.weight_codes() is wc and fq.w_clip == 0.9 and fq.w_sym == sym
    x = torch.randn(5, 64, generator=gen)
    # the integer GEMM's rounding (bisup.nn.fake_quant.integer_linear), not a float matmul's
    torch.testing.assert_close(fq(x), torch.nn.functional.linear(aq(x), fq.weight, bias), rtol=1e-5, atol=1e-5)
    if idx is not None:
        assert torch.equal(fq.outlier_idx, idx)
    fq.to(torch.float64)
    assert fq.weight_codes().codes.device == fq.weight.device
