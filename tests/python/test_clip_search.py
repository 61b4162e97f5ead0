"""The weight clip search (QuantConfig.w_clip_search): per group, the least-squared-error clip ratio
of clip_grid(w_clip), for RTN (quantize_weight) and GPTQ, exported exactly like any other codes."""
import pytest
import torch

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.models.tiny import random_tokens, tiny_model
from bisup.quant.codes import quantize_weight
from bisup.quant.gptq import gptq_quantize
from bisup.quant.groups import dequantize_ragged
from bisup.quant.quantizer import clip_grid, group_params, mse_clip, qrange, to_groups

F16 = torch.float16


def _group_errors(x, bits, sym, clip):
    """Squared quantize-dequantize error per group of x [..., G, g] at one clip ratio: [..., G]."""
    s, z = group_params(x, bits, sym, clip, scale_dtype=F16)
    lo, hi = qrange(bits, sym)
    return ((torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s - x).square().sum(-1)


def _weight(gen, n=24, k=100):
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    w[:, 7] *= 20  # an outlier in some groups: there clipping pays most
    w[2, :32] = 0  # an all-zero group
    w[5] = -w[5].abs()  # a one-signed row
    return w


def test_clip_grid():
    assert clip_grid(1.0)[0] == 1.0 and clip_grid(1.0)[-1] == pytest.approx(0.5) and len(clip_grid(1.0)) == 21
    assert clip_grid(0.8, steps=4, low=0.5) == pytest.approx((0.8, 0.7, 0.6, 0.5, 0.4))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [16, 32, -1])
def test_mse_clip_picks_each_groups_least_error_ratio(bits, sym, group_size, gen):
    xg = to_groups(_weight(gen, k=96), group_size)
    clips = clip_grid(1.0)
    chosen = mse_clip(xg, bits, sym, clips, F16)
    assert chosen.shape == (*xg.shape[:-1], 1)
    errs = torch.stack([_group_errors(xg, bits, sym, c) for c in clips], -1)  # [N, G, len(clips)]
    best = errs.min(-1).values
    torch.testing.assert_close(_group_errors(xg, bits, sym, chosen), best, rtol=0, atol=0)
    first = torch.tensor(clips)[(errs == best.unsqueeze(-1)).float().argmax(-1)]  # first ratio on ties
    torch.testing.assert_close(chosen.squeeze(-1), first, rtol=0, atol=0)
    if group_size == 16:
        assert bool((chosen[2, :2] == 1.0).all())  # the zero group: every ratio ties, the first wins
        assert bits == 8 or bool((chosen < 1.0).any())  # at 3-4 bits the search moves somewhere


@pytest.mark.parametrize("bits, group_size, outliers", [(4, 32, None), (3, 16, None), (4, 32, [7, 50]), (4, -1, None)])
def test_rtn_clip_search_lowers_every_groups_error(bits, group_size, outliers, gen):
    w = _weight(gen)  # K = 100: a ragged last group at 16 and 32
    idx = None if outliers is None else torch.tensor(outliers)
    plain = quantize_weight(w, bits, group_size, clip=1.0, outlier_idx=idx)
    found = quantize_weight(w, bits, group_size, clip=1.0, outlier_idx=idx, clip_search=True)
    assert found.codes.dtype == torch.int8 and found.scales.dtype == F16
    err = lambda c: (c.dequantize(w.shape[1], torch.float32) - w).square()  # noqa: E731
    assert float(err(found).sum()) < float(err(plain).sum())
    main = w if idx is None else w[:, [j for j in range(w.shape[1]) if j not in outliers]]
    g = main.shape[1] if group_size == -1 else group_size
    per_group = lambda c: torch.stack([b.sum(-1) for b in torch.split(  # noqa: E731
        (dequantize_ragged(c.codes, c.scales, c.zeros, group_size) - main).square(), g, -1)], -1)
    assert bool((per_group(found) <= per_group(plain)).all())
    if idx is not None:  # the INT8 outlier channels are untouched by the search
        assert torch.equal(found.outlier_codes, plain.outlier_codes)


@pytest.mark.parametrize("group_size", [16, 32])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k, outliers", [(96, None), (100, None), (100, [7, 61])])
def test_gptq_with_identity_hessian_and_search_is_rtn_with_search(group_size, sym, k, outliers, gen):
    w = _weight(gen, k=k)
    idx = None if outliers is None else torch.tensor(outliers)
    r = gptq_quantize(w, torch.eye(k), 4, group_size, sym=sym, act_order=False, block_size=32, clip_search=True,
                      outlier_idx=idx)
    rtn = quantize_weight(w, 4, group_size, sym=sym, clip_search=True, outlier_idx=idx)
    torch.testing.assert_close(r.weight, rtn.dequantize(k, torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("family, method, extra", [("llama", "rtn", {}), ("qwen2", "rtn", {}), ("llama", "gptq", {}),
                                                   ("llama", "quarot", dict(gptq=True, kv_bits=4)),
                                                   ("qwen2", "atom", dict(kv_bits=4, atom_outliers=16))])
def test_models_with_clip_search_lower_weight_error_and_reload_exactly(tmp_path, family, method, extra):
    kw = dict(method=method, w_group_size=32, a_group_size=32, n_calib=4, calib_seq_len=32, **extra)  # real mode: g32
    calib = random_tokens(4, 32, seed=3)
    models = {s: bisup.quantize_model(tiny_model(family), QuantConfig(w_clip_search=s, **kw), calib_data=calib,
                                      progress=False) for s in (False, True)}
    if method == "rtn":  # same float weights underneath: the searched codes are closer to them
        ref = tiny_model(family).model.layers[0].mlp.down_proj.weight.detach()
        err = {s: float((m.model.layers[0].mlp.down_proj.weight - ref).square().sum()) for s, m in models.items()}
        assert err[True] < err[False]
    model, ids = models[True], random_tokens(2, 16)
    assert model.bisup_config.w_clip_search is True
    bisup.save_quantized(model, tmp_path / "q")
    loaded = bisup.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert not torch.equal(models[False](ids).logits, model(ids).logits)
    assert loaded.bisup_config == model.bisup_config
    real = bisup.load_quantized(tmp_path / "q", mode="real")  # the packed kernels run the searched codes
    with torch.no_grad():
        assert torch.equal(real(ids).logits, model(ids).logits)
    if method == "rtn" and family == "qwen2":  # Qwen2's q/k/v biases are kept as they were
        ref_bias = tiny_model(family).model.layers[0].self_attn.q_proj.bias
        assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, ref_bias)


def test_config_validates_the_flag():
    with pytest.raises(ValueError, match="w_clip_search"):
        QuantConfig(w_clip_search="yes")
    assert QuantConfig.from_dict(QuantConfig(w_clip_search=True).to_dict()).w_clip_search is True
    old = {k: v for k, v in QuantConfig(bisup=BiSupConfig()).to_dict().items() if k != "w_clip_search"}
    old["bisup"] = {k: v for k, v in old["bisup"].items() if k != "weight_clip_search"}
    loaded = QuantConfig.from_dict(old)  # written before the fields existed: both off
    assert loaded.w_clip_search is False and loaded.bisup.weight_clip_search is False
