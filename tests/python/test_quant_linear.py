"""QuantLinear: packing at construction, forward through quantize_pack + gemm, outliers, state_dict."""
import warnings

import pytest
import torch
from torch import nn

import bisup.nn.quant_linear as ql
from bisup import reference
from bisup.nn import QuantLinear
from bisup.quant.quantizer import fake_quantize


def simulate(layer_fp: nn.Linear, x, w_bits, a_bits, group_size, outlier_idx=()):
    """Fake-quant float64 model of QuantLinear: RTN weight / per-token activation in groups
    (zero-padded last group), outlier channels at INT8 per row / per token."""
    w = layer_fp.weight.detach().double()
    k = w.shape[1]
    idx = torch.tensor(list(outlier_idx), dtype=torch.long)
    keep = torch.tensor([c for c in range(k) if c not in set(outlier_idx)], dtype=torch.long)
    g = group_size if group_size != -1 else len(keep)
    pad = (-len(keep)) % g

    def fq(t, bits, gs):
        t = torch.nn.functional.pad(t.float(), (0, pad)) if gs != -1 else t.float()
        return fake_quantize(t, bits, gs, scale_dtype=torch.float16).double()[..., : len(keep)]

    y = fq(x[:, keep], a_bits, group_size) @ fq(w[:, keep], w_bits, group_size).T
    if len(idx):
        y += fake_quantize(x[:, idx].float(), 8, -1, scale_dtype=torch.float16).double() @ fake_quantize(
            w[:, idx].float(), 8, -1, scale_dtype=torch.float16
        ).double().T
    if layer_fp.bias is not None:
        y += layer_fp.bias.detach().double()
    return y


@pytest.mark.parametrize(
    "k,n,w_bits,a_bits,group_size,outliers,dtype",
    [
        (256, 72, 4, 4, 64, (), torch.float32),
        (200, 40, 3, 3, 32, (), torch.float32),  # 200 channels: zero-padded to the K granularity
        (576, 96, 4, 4, 64, tuple(range(5, 576, 37))[:16], torch.bfloat16),  # 16 Atom outlier channels
        (320, 64, 3, 4, -1, tuple(range(0, 32)), torch.float16),
    ],
)
def test_quant_linear_matches_simulation(device, gen, k, n, w_bits, a_bits, group_size, outliers, dtype):
    fp = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        fp.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        fp.bias.copy_(torch.randn(n, generator=gen))
    x = torch.randn(2, 5, k, generator=gen)
    x[..., list(outliers)] *= 20  # outlier channels really are large
    layer = QuantLinear.from_float(fp, w_bits, a_bits, group_size, outlier_idx=outliers or None).to(device)
    y = layer(x.to(device, dtype))
    assert y.dtype == dtype and y.shape == (2, 5, n)
    expect = simulate(fp, x.reshape(-1, k).to(dtype).double(), w_bits, a_bits, group_size, outliers)
    # Same codes and scales as the simulation; the differences are fp32 accumulation and the output rounding.
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    err = (y.reshape(-1, n).double().cpu() - expect).abs().max()
    assert err <= tol * expect.abs().max(), f"err {err:.3g} vs max {expect.abs().max():.3g}"
    if device.type == "cuda":  # the CUDA path computes the same bits as the CPU twin
        assert torch.equal(y.cpu(), layer.cpu()(x.to(dtype)))


def test_state_dict_round_trip_and_given_codes(gen):
    fp = nn.Linear(256, 48)
    layer = QuantLinear.from_float(fp, 4, 4, 128, outlier_idx=list(range(16)))
    sd = layer.state_dict()
    assert sd["w_q"].dtype == torch.uint8 and sd["w_q"].shape == (48, 128)  # 240 main channels padded to 256
    assert sd["w_outlier"].dtype == torch.int8 and sd["w_outlier"].shape == (48, 16)
    fresh = QuantLinear(256, 48, 4, 4, 128, bias=True, n_outliers=16)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 256, generator=gen)
    assert torch.equal(fresh(x), layer(x))
    # Given integer codes (e.g. from GPTQ) in the fake-quant WeightCodes layout give the same layer.
    codes = reference.unpack_int4(layer.w_q)[:, :240]
    given = QuantLinear.from_float(
        fp, 4, 4, 128, outlier_idx=list(range(16)), weight_q=codes, weight_scale=layer.w_scale,
        w_outlier_q=layer.w_outlier, w_outlier_scale=layer.w_outlier_scale[:, None],
    )
    assert torch.equal(given(x), layer(x))


def test_reference_fallback_warns_once(gen, monkeypatch):
    fp = nn.Linear(128, 16)
    layer = QuantLinear.from_float(fp, 4, 4, 32)
    x = torch.randn(4, 128, generator=gen)
    y_kernel = layer(x)
    monkeypatch.setattr(ql, "_has_kernel", lambda device: False)
    monkeypatch.setattr(ql, "_warned_devices", set())
    with pytest.warns(UserWarning, match="no GEMM kernel"):
        y_ref = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # second call: no new warning
    assert torch.allclose(y_ref, y_kernel, rtol=1e-5, atol=1e-5)


def test_quant_linear_rejects_bad_configs():
    fp = nn.Linear(128, 16)
    with pytest.raises(ValueError, match="must be 3 or 4"):
        QuantLinear.from_float(fp, 2, 4, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantLinear.from_float(fp, 4, 4, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        QuantLinear.from_float(fp, 4, 4, 32, outlier_idx=[1, 2, 3])
    with pytest.raises(ValueError, match="distinct channel indices"):
        QuantLinear.from_float(fp, 4, 4, 32, outlier_idx=[0] * 16)
    with pytest.raises(ValueError, match="expected input"):
        QuantLinear.from_float(fp, 4, 4, 32)(torch.randn(2, 64))
