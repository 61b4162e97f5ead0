"""GPTQ: equals RTN with H = I, equals an unblocked textbook implementation, lowers the layer output
error vs RTN, keeps Atom's channels at INT8, and returns codes/scales that rebuild its weight."""
import pytest
import torch

from bisup.methods.calibration import iterate_layers
from bisup.models.adapters import get_adapter
from bisup.models.tiny import random_tokens, tiny_model
from bisup.quant.gptq import gptq_quantize, normal_group_index
from bisup.quant.quantizer import fake_quantize, group_params, qrange

F16 = torch.float16


def _correlated(n_tokens, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, k, generator=g) @ torch.randn(k, k, generator=g)
    return x * (0.1 + 3 * torch.rand(k, generator=g))  # uneven channel scales -> act-order matters


def _textbook_gptq(w, h, bits, group_size, sym, damp, act_order, outlier_idx):
    """Column-at-a-time GPTQ/OBQ in float64 with an explicit inverse Hessian downdated after every
    column (no Cholesky, no lazy blocks); a group's scale comes from the current weights at its
    first column; outlier channels last at 8 bits per row."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    gid, n_groups = normal_group_index(k, group_size, outlier_idx)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    diag = h.diagonal()

    def ordered(cols):
        cols = [int(c) for c in cols]
        return sorted(cols, key=lambda c: -float(diag[c])) if act_order else cols

    order = ordered(torch.nonzero(gid < n_groups).flatten()) + ordered(torch.nonzero(gid == n_groups).flatten())
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    params = {}
    left = list(order)
    for c in order:
        g = int(gid[c])
        b = 8 if g == n_groups else bits
        if g not in params:
            cols = torch.nonzero(gid == g).flatten()
            s, z = group_params(w[:, cols].unsqueeze(1).float(), b, sym, scale_dtype=F16)
            params[g] = (s[:, 0, 0].double(), z[:, 0, 0].double())
        s, z = params[g]
        lo, hi = qrange(b, sym)
        dq = (torch.clamp(torch.round(w[:, c] / s) + z, lo, hi) - z) * s
        out[:, c] = dq
        left.remove(c)
        err = (w[:, c] - dq) / hinv[c, c]
        w[:, left] -= err[:, None] * hinv[c, left][None, :]
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / hinv[c, c]
    return out


@pytest.mark.parametrize("group_size", [16, 32, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_identity_hessian_is_rtn(group_size, sym, act_order, clip, gen):
    w = torch.randn(40, 96, generator=gen) * torch.rand(40, 1, generator=gen)
    w[3, :32] = 0  # an all-zero group
    r = gptq_quantize(w, torch.eye(96), 4, group_size, sym=sym, clip=clip, act_order=act_order, block_size=32)
    torch.testing.assert_close(r.weight, fake_quantize(w, 4, group_size, sym, clip, scale_dtype=F16), rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("block_size", [1, 24, 128])
@pytest.mark.parametrize("group_size,sym,outliers", [(16, True, None), (16, False, None), (-1, True, None),
                                                 (16, True, [5, 70, 2, 33]), (32, False, [90])])
def test_matches_textbook_gptq(act_order, block_size, group_size, sym, outliers, gen):
    """Blocked lazy updates + Cholesky + group scales at first use == the unblocked definition."""
    w = torch.randn(24, 96, generator=gen)
    x = _correlated(400, 96, seed=1)
    h = x.T @ x
    h[11, :] = 0  # a dead channel
    h[:, 11] = 0
    r = gptq_quantize(w, h, 4, group_size, sym=sym, act_order=act_order, block_size=block_size, outlier_idx=outliers)
    ref = _textbook_gptq(w, h, 4, group_size, sym, 0.01, act_order, outliers)
    # the inverse-Hessian factor is float32 (as in GPTQ's own code) and the reference float64: a value
    # within ~1e-6 of a rounding boundary may take the neighbouring code; every other weight agrees
    off = (r.weight.double() - ref).abs() > 1e-5
    assert off.sum() <= max(1, off.numel() // 500), int(off.sum())
    assert (r.weight[:, 11] == 0).all()


@pytest.mark.parametrize("group_size", [16, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_act_order_is_permutation_equivariant(group_size, sym, gen):
    """With act-order the result depends on the channels, not on where they sit: permuting W's columns and
    H consistently permutes the result (exactly for one group per row; with groups, the group layout is
    the original order by design, so we permute within groups)."""
    k = 64
    w = torch.randn(20, k, generator=gen)
    x = _correlated(300, k, seed=2)
    h = x.T @ x
    if group_size == -1:
        perm = torch.randperm(k, generator=gen)
    else:
        perm = torch.cat([g * group_size + torch.randperm(group_size, generator=gen) for g in range(k // group_size)])
    a = gptq_quantize(w, h, 4, group_size, sym=sym, act_order=True)
    b = gptq_quantize(w[:, perm], h[perm][:, perm], 4, group_size, sym=sym, act_order=True)
    torch.testing.assert_close(b.weight, a.weight[:, perm], rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_size,sym,outliers", [(16, True, None), (32, False, None), (16, True, [0, 17, 63]),
                                                 (16, False, [0, 17, 63])])
def test_codes_and_scales_rebuild_weight(group_size, sym, outliers, gen):
    k = 64
    w = torch.randn(12, k, generator=gen)
    x = _correlated(200, k, seed=3)
    r = gptq_quantize(w, x.T @ x, 4, group_size, sym=sym, outlier_idx=outliers)
    gid, n_groups = normal_group_index(k, group_size, outliers)
    wide = outliers is not None and not sym  # asymmetric 8-bit outliers codes reach 255
    assert r.codes.dtype == (torch.int16 if wide else torch.int8)
    assert r.scales.dtype == F16 and r.scales.shape == (12, n_groups)
    is_outlier = gid == n_groups
    lo, hi = qrange(4, sym)
    normal_codes = r.codes[:, ~is_outlier].int()
    assert normal_codes.min() >= lo and normal_codes.max() <= hi
    s = r.scales.float()[:, gid.clamp(max=n_groups - 1)]
    z = r.zeros.float()[:, gid.clamp(max=n_groups - 1)]
    rebuilt = (r.codes.float() - z) * s
    if outliers is not None:
        rebuilt[:, is_outlier] = (r.codes[:, is_outlier].float() - r.outlier_zeros.float()) * r.outlier_scales.float()
    else:
        assert r.outlier_scales is None
    torch.testing.assert_close(rebuilt, r.weight, rtol=0, atol=0)


def test_outlier_channels_are_int8_and_groups_skip_them(gen):
    """H = I: normal channels are RTN in groups of the remaining channels (outlier ones removed), outliers
    channels are RTN at 8 bits with one scale per row."""
    k, outliers = 84, [1, 40, 41, 83]
    w = torch.randn(16, k, generator=gen)
    w[:, outliers] *= 30  # outlier channels
    r = gptq_quantize(w, torch.eye(k), 4, 16, outlier_idx=outliers)
    normal = [c for c in range(k) if c not in outliers]
    torch.testing.assert_close(r.weight[:, normal], fake_quantize(w[:, normal], 4, 16, True, scale_dtype=F16), rtol=0, atol=0)
    torch.testing.assert_close(r.weight[:, outliers], fake_quantize(w[:, outliers], 8, -1, True, scale_dtype=F16), rtol=0, atol=0)
    # 8-bit resolution: error within half an INT8 step of the row scale (max|w|/127)
    step = w[:, outliers].abs().amax(1, keepdim=True) / 127
    assert ((r.weight[:, outliers] - w[:, outliers]).abs() <= 0.5 * step * 1.001).all()
    assert r.codes[:, outliers].abs().max() == 127


def test_lower_output_error_than_rtn_on_correlated_inputs(gen):
    w = torch.randn(64, 128, generator=gen)
    x = _correlated(2048, 128, seed=4)
    h = x.T @ x
    ref = x @ w.T
    for group_size in (32, -1):
        rtn = fake_quantize(w, 4, group_size, True, scale_dtype=F16)
        gptq = gptq_quantize(w, h, 4, group_size).weight
        e_rtn = (x @ rtn.T - ref).norm()
        e_gptq = (x @ gptq.T - ref).norm()
        assert e_gptq < 0.7 * e_rtn, (group_size, float(e_gptq), float(e_rtn))


def test_lower_output_error_than_rtn_on_tiny_model_layer():
    """Every linear of a real (tiny, random-init) decoder layer, Hessians from block-by-block calibration:
    GPTQ's output error on the calibration inputs is below RTN's."""
    model = tiny_model("llama", num_layers=2)
    adapter = get_adapter(model)
    ids = random_tokens(8, 32, seed=5)
    xs = {}
    for index, layer, inputs in iterate_layers(model, adapter, ids, progress=False, sequential=False):
        if index != 1:
            continue
        handles = [adapter.get_linear(layer, n).register_forward_pre_hook(
            lambda m, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
            for n in adapter.linear_names()]
        inputs.run(layer)
        for hd in handles:
            hd.remove()
        for name in adapter.linear_names():
            w = adapter.get_linear(layer, name).weight.detach()
            x = torch.cat(xs[name])
            ref = x @ w.T
            e_rtn = (x @ fake_quantize(w, 4, 16, True, scale_dtype=F16).T - ref).norm()
            e_gptq = (x @ gptq_quantize(w, inputs.stats[name].hessian(), 4, 16).weight.T - ref).norm()
            assert e_gptq < 0.95 * e_rtn, (name, float(e_gptq), float(e_rtn))


def test_column_steps_run_on_one_thread(gen, monkeypatch):
    """The latency-bound column loop runs with one intra-op thread (gptq._one_thread: on 2 shared cores
    a layer's GPTQ took 32 s with 2 threads, 0.6 s with 1); the caller's thread count comes back, also
    after an error, and the result is the same as with any thread count."""
    import bisup.quant.gptq as gptq_mod

    w, x = torch.randn(24, 64, generator=gen), torch.randn(256, 64, generator=gen)
    h = x.T @ x
    seen = []
    real = gptq_mod.group_params

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = gptq_quantize(w, h, 4, 16)
        monkeypatch.setattr(gptq_mod, "group_params", spy)
        got = gptq_quantize(w, h, 4, 16)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        assert torch.equal(got.weight, want.weight) and torch.equal(got.codes, want.codes)

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(gptq_mod, "group_params", boom)
        with pytest.raises(RuntimeError, match="boom"):
            gptq_quantize(w, h, 4, 16)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"hessian must be \[K, K\]"):
        gptq_quantize(w, torch.eye(7), 4, 4)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        gptq_quantize(w.flatten(), torch.eye(8), 4, 4)
    with pytest.raises(ValueError, match="outlier_idx must lie in"):
        gptq_quantize(w, torch.eye(8), 4, 4, outlier_idx=[8])
    with pytest.raises(ValueError, match="repeated"):
        gptq_quantize(w, torch.eye(8), 4, 4, outlier_idx=[1, 1])
    with pytest.raises(ValueError, match="bits must be in"):
        gptq_quantize(w, torch.eye(8), 9, 4)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, torch.eye(8), 4, 4, block_size=0)


@pytest.mark.slow
def test_lower_output_error_than_rtn_on_default_model_layer():
    """A real layer: SmolLM2-135M layer 3, Hessians from 4096 calibration tokens of the embedded corpus.

    On held-out tokens GPTQ beats RTN on the 576-wide inputs (q/k/v/o/gate/up); down_proj (1536 wide)
    only on the calibration tokens: with 4-8k tokens its Hessian overfits (measured: calib 0.079 vs
    RTN 0.107, held-out 0.108 vs 0.107 with 8192 tokens), so it is not asserted on held-out data.
    """
    from bisup.models import default

    if not default.is_available():
        pytest.skip("embedded default model not installed")
    from bisup.eval.data import calibration_batches

    model, tok = default.load_default_model()
    adapter = get_adapter(model)
    batches = calibration_batches(tok, 20, 256)
    calib, held_out = batches[:16], batches[16:]
    for index, layer, inputs in iterate_layers(model, adapter, calib, progress=False, sequential=False):
        if index == 3:
            break
    xs = {}

    def grab(module, args, name):
        xs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [adapter.get_linear(layer, n).register_forward_pre_hook(lambda m, a, n=n: grab(m, a, n))
               for n in adapter.linear_names()]
    with torch.no_grad():
        for part in (calib, held_out):
            model.model(input_ids=part)
    for hd in handles:
        hd.remove()
    n_calib = calib.numel()
    for name in adapter.linear_names():
        w = adapter.get_linear(layer, name).weight.detach()
        x = torch.cat(xs[name])
        rtn = fake_quantize(w, 4, 64, True, scale_dtype=F16)
        gptq = gptq_quantize(w, inputs.stats[name].hessian(), 4, 64).weight
        for part, rows in (("calib", slice(0, n_calib)), ("held-out", slice(n_calib, None))):
            if part == "held-out" and name == "mlp.down_proj":
                continue
            ref = x[rows] @ w.T
            e_rtn = (x[rows] @ rtn.T - ref).norm()
            e_gptq = (x[rows] @ gptq.T - ref).norm()
            assert e_gptq < 0.9 * e_rtn, (name, part, float(e_gptq), float(e_rtn))
