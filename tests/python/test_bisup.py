"""BiSup vertical suppression (bisup/methods/bisup.py, bisup/quant/learnable.py) on tiny random models."""
import json

import pytest
import torch

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.methods import get_method
from bisup.methods import bisup as bisup_method
from bisup.methods import bisup_training
from bisup.methods import quarot
from bisup.methods.calibration import iterate_layers
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, TINY_GROUP, random_tokens, tiny_model
from bisup.nn import KVQuantSpec, set_kv_quant
from bisup.nn.attention import ROTATION_BUFFER
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.learnable import LearnableLinear, lwc_quantize, logit, svd_factors
from bisup.rotation.fuse import RotateAfter

G = TINY_GROUP


def _cfg(method="quarot", group=G, **bis):
    return QuantConfig(method=method, w_group_size=group, a_group_size=group, kv_bits=4, atom_outliers=16,
                       bisup=BiSupConfig(**{"epochs": 2, "batch_size": 2, "rank": 4, "smooth": True, **bis}))


def _first_layer(model, config, calib):
    """(adapter, base, transforms, layer 0, its inputs) after the base method's model-level steps."""
    adapter = get_adapter(model)
    base = get_method(config.method).bisup_base
    transforms = base.prepare(model, adapter, config) or {}
    it = iterate_layers(model, adapter, calib, progress=False, stats=("channel",), targets=True, batch_size=2)
    _, layer, inputs = next(it)
    return adapter, base, transforms, layer, inputs, it


# ------------------------------------------------------------------------------------------------
# smoothing is function-preserving
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["quarot", "rtn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_without_quantization_keeps_the_block_function(family, method):
    model = tiny_model(family, num_layers=1)
    config = QuantConfig(method=method, w_bits=16, a_bits=16, w_group_size=G, a_group_size=G,
                         bisup=BiSupConfig(smooth=True, smooth_alpha=0.5, lowrank=False))
    adapter, base, transforms, layer, inputs, it = _first_layer(model, config, random_tokens(2, 24))
    ref = inputs.run(layer)
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, transforms)
    assert set(block.smoothers) == {"attn", "mlp", "vo", "ud"}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sm in block.smoothers.values():  # far from 1, so a wrong fold cannot pass
            sm.log_s.add_(torch.randn(sm.log_s.shape, generator=gen))
    for out, r in zip(inputs.run(layer), ref):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)
    block.export()
    assert all(isinstance(adapter.get_linear(layer, n), FakeQuantLinear) for n in adapter.linear_names())
    for out, r in zip(inputs.run(layer), ref):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)
    it.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_rotations_keep_the_block_function(family):
    """Random value and Q/K rotations (with smoothing) change nothing without quantization, trained
    or exported: v_proj / o_proj fold them, the Q/K one sits in the attention's rotation buffer."""
    model = tiny_model(family, num_layers=1)
    config = QuantConfig(method="quarot", w_bits=16, a_bits=16, w_group_size=G, a_group_size=G,
                         bisup=BiSupConfig(smooth=True, smooth_alpha=0.5, lowrank=False))
    adapter, base, transforms, layer, inputs, it = _first_layer(model, config, random_tokens(2, 24))
    attn = adapter.attention(layer)
    set_kv_quant(model, [attn], KVQuantSpec(bits=16, rotate=True))  # an unquantized KV that rotates keys
    ref = inputs.run(layer)
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, transforms)
    block._add_head_rotations()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from the identity, so a wrong fold cannot pass
        for p in [sm.log_s for sm in block.smoothers.values()] + [block.value_rotation.generator,
                                                                 block.key_rotation.generator]:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    rot = block.value_rotation.matrix().detach()
    eye = torch.eye(rot.shape[-1]).expand_as(rot)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    assert (rot - eye).abs().max() > 0.1
    for out, r in zip(inputs.run(layer), ref):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)
    key = block.key_rotation.matrix().detach()[0]
    block.export()
    assert torch.equal(getattr(attn, ROTATION_BUFFER), key) and not getattr(attn, ROTATION_BUFFER).requires_grad
    assert not attn._forward_pre_hooks or all("install" not in getattr(h, "__name__", "")
                                              for h in attn._forward_pre_hooks.values())
    for out, r in zip(inputs.run(layer), ref):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)
    it.close()


def test_smoothing_moves_the_scales_it_was_initialised_with():
    model = tiny_model("llama", num_layers=1)
    with torch.no_grad():  # an outlier channel in the attention input
        model.model.layers[0].input_layernorm.weight[3] = 20.0
    config = QuantConfig(method="rtn", w_group_size=G, a_group_size=G, bisup=BiSupConfig(smooth=True, smooth_alpha=0.5))
    adapter, _, tr, layer, inputs, it = _first_layer(model, config, random_tokens(2, 24))
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, tr)
    s = block.smoothers["attn"].scale()
    s = s.detach()
    assert int(s.argmax()) == 3 and float(s[3]) > 2 * float(s.median())
    it.close()


# ------------------------------------------------------------------------------------------------
# clipping and low-rank pieces
# ------------------------------------------------------------------------------------------------
def test_lwc_at_full_clip_is_rtn_and_clip_gets_gradients():
    from bisup.quant.codes import quantize_weight

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    full = torch.full((8, 64 // G), logit(1.0), requires_grad=True)
    dq, codes, scales, _ = lwc_quantize(w, 4, G, True, full, full)
    ref = quantize_weight(w, 4, G, True, 1.0)
    assert torch.equal(codes.to(torch.int8), ref.codes) and torch.equal(scales.half(), ref.scales)
    hi = torch.full((8, 64 // G), logit(0.8), requires_grad=True)
    lo = torch.full((8, 64 // G), logit(0.8), requires_grad=True)
    lwc_quantize(w, 4, G, True, hi, lo)[0].square().sum().backward()
    assert hi.grad.abs().sum() + lo.grad.abs().sum() > 0


def test_learnable_linear_reads_a_bf16_weight_in_place():
    """The frozen latent weight is the linear's own bf16 storage (no fp32 copy), read as fp32."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    mods = [LearnableLinear(v, None, 4, G, True, 4, G, True, 1.0, 0.9, learn_rounding=True) for v in (w, w.float())]
    assert mods[0].weight.data_ptr() == w.data_ptr() and mods[0].weight.dtype == torch.bfloat16
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    outs = []
    for m in mods:
        with torch.enable_grad():
            m(x).square().sum().backward()
        outs.append((m(x), m.w_round.grad, m.w_hi.grad, m.export()[0].codes))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _trained_linear():
    """A LearnableLinear with every piece of the weight path: smoothing in and out, low rank, the
    online Hadamard (K = 80: base 20), learned rounding."""
    from bisup.quant.learnable import LowRank, Smoothing
    from bisup.rotation.fuse import HadamardTransform

    gen = torch.Generator().manual_seed(8)
    m = LearnableLinear(torch.randn(48, 80, generator=gen), torch.randn(48, generator=gen), 4, G, False, 4, G, True,
                        1.0, 0.9, learn_rounding=True)
    m.in_smooth, m.divide_input = Smoothing(torch.rand(80, generator=gen) + 0.5), True
    m.out_smooth = Smoothing(torch.rand(48, generator=gen) + 0.5)
    m.lowrank = LowRank(torch.randn(48, 4, generator=gen), torch.randn(4, 80, generator=gen) * 0.01, 1.0)
    m.transform = HadamardTransform(80)
    with torch.no_grad():
        m.w_round.copy_(torch.rand(48, 80, generator=gen) - 0.5)
    return m, torch.randn(2, 80, generator=gen)


def test_weight_path_is_recomputed_in_backward(monkeypatch):
    """While training, a LearnableLinear keeps only its quantized weight (F.linear's) of the weight path;
    the gradients are those of the plain graph."""
    import bisup.quant.learnable as learnable

    def saved_bytes_and_grads():
        m, x = _trained_linear()
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(x)
        y.square().sum().backward()
        return sum(seen.values()), [p.grad for p in m.parameters() if p.requires_grad]

    weight_bytes = 48 * 80 * 4
    kept, grads = saved_bytes_and_grads()
    monkeypatch.setattr(learnable, "checkpoint", lambda f, use_reentrant: f())
    plain, plain_grads = saved_bytes_and_grads()
    assert kept < 1.5 * weight_bytes and plain > 4 * weight_bytes, (kept, plain)
    assert len(grads) == 8 and all(g is not None for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("outliers", [None, [3, 40]])
def test_searched_clip_init_lowers_every_groups_weight_error(sym, outliers):
    w = torch.randn(8, 72, generator=torch.Generator().manual_seed(4))  # K = 72: a ragged last group
    w[:, 5] *= 12
    idx = None if outliers is None else torch.tensor(outliers)
    mods = [LearnableLinear(w, None, 4, G, sym, 4, G, True, 1.0, 1.0, idx) for _ in range(2)]
    mods[1].search_weight_clip()
    assert torch.equal(mods[1].w_hi, mods[1].w_lo) and not torch.equal(mods[1].w_hi, mods[0].w_hi)
    assert float(torch.sigmoid(mods[1].w_hi.detach()).max()) <= 0.99 + 1e-6
    main = w if idx is None else w[:, [j for j in range(72) if j not in outliers]]
    errs = []
    for m in mods:
        dq = lwc_quantize(main, 4, G, sym, m.w_hi.detach(), m.w_lo.detach())[0]
        errs.append(torch.stack([b.sum(-1) for b in torch.split((dq - main).square(), G, -1)], -1))
    assert bool((errs[1] <= errs[0] * (1 + 1e-6)).all()) and float(errs[1].sum()) < float(errs[0].sum())


def test_searched_clip_init_lowers_the_initial_block_loss():
    losses = []
    for search in (False, True):
        model = tiny_model("llama", num_layers=1)
        config = _cfg("quarot", weight_clip_search=search)
        adapter, base, tr, layer, inputs, it = _first_layer(model, config, random_tokens(4, 32))
        bisup_method.Block(adapter, layer, config, inputs.stats, {}, tr)
        chunks = list(range(len(inputs.hidden)))
        losses.append(bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks))
        it.close()
    assert losses[1] < losses[0], losses


def test_learned_rounding_moves_codes_by_at_most_one():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    full = torch.full((8, 64 // G), logit(1.0))
    _, base, _, _ = lwc_quantize(w, 4, G, True, full, full)
    zero = torch.zeros(8, 64, requires_grad=True)
    assert torch.equal(lwc_quantize(w, 4, G, True, full, full, zero)[1], base)
    lwc_quantize(w, 4, G, True, full, full, zero)[0].square().sum().backward()
    assert zero.grad.abs().sum() > 0  # straight-through: the offsets get gradients
    big = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 4  # clamped to [-0.5, 0.5]
    moved = lwc_quantize(w, 4, G, True, full, full, big)[1]
    assert (moved - base).abs().max() == 1 and (moved != base).any()


@pytest.mark.parametrize("method", ["quarot", "atom"])
def test_gptq_rounding_start_lowers_the_initial_block_loss(method):
    """rounding_init="gptq": offsets within [-0.5, 0.5] that start the block below its RTN-rounded start
    (on this tiny layer GPTQ moves a third of the codes, some by 2-4 steps, which the offsets cut to one)."""
    model = tiny_model("llama", num_layers=1)
    config = _cfg(method, rounding_init="gptq", lowrank=False)
    adapter, base, tr, layer, inputs, it = _first_layer(model, config, random_tokens(4, 32))
    outliers = base.outliers(adapter, inputs.stats, config) if base.outliers else {}
    block = bisup_method.Block(adapter, layer, config, inputs.stats, outliers, tr)
    chunks = list(range(len(inputs.hidden)))
    rtn = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks)
    bisup_method.gptq_rounding_start(block, inputs, chunks)
    moved = [m.w_round.detach() for m in block.mods.values()]
    assert all(o.abs().max() <= 0.5 for o in moved) and sum(int((o != 0).sum()) for o in moved) > 0
    gptq = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks)
    assert gptq < rtn, (rtn, gptq)
    it.close()


def test_lowrank_init_lowers_the_weight_reconstruction_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen) * 0.02
    w[:, :3] *= 10
    full = torch.full((48, 96 // G), logit(1.0))
    q = lwc_quantize(w, 4, G, True, full, full)[0]
    err = w - q
    prev = err.norm()
    for rank in (1, 4, 16):
        a, b = svd_factors(err, rank)
        now = (w - (q + a @ b)).norm()
        assert now < prev  # each extra rank removes more of the error
        prev = now


def test_randomized_svd_is_as_good_as_the_exact_one_and_deterministic():
    gen = torch.Generator().manual_seed(5)
    n, k, rank = 192, 320, 8
    u = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(k, k, generator=gen)).Q
    spectrum = 0.85 ** torch.arange(n, dtype=torch.float32)  # decaying, no gap after rank 8
    err = (u * spectrum) @ v[:, :n].T
    exact = float(spectrum[rank:].norm())
    a, b = svd_factors(err, rank)
    assert a.shape == (n, rank) and b.shape == (rank, k) and a.dtype == b.dtype == torch.float32
    assert float((err - a @ b).norm()) <= 1.01 * exact
    state = torch.get_rng_state()
    again = svd_factors(err, rank)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])  # seeded locally: the same factors
    assert torch.equal(state, torch.get_rng_state())  # and the global generator untouched
    a1, b1 = svd_factors(err, rank, power_iters=0, oversample=0)  # what the power iterations buy
    assert float((err - a1 @ b1).norm()) > 1.01 * exact


def test_merged_lowrank_starts_at_the_base_weight():
    model = tiny_model("llama", num_layers=1)
    config = _cfg("rtn", smooth=False, weight_clip=False)
    adapter, _, tr, layer, inputs, it = _first_layer(model, config, random_tokens(2, 24))
    lin = adapter.get_linear(layer, "mlp.up_proj")
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, tr)
    mod = block.mods["mlp.up_proj"]
    assert mod.lowrank is not None and mod.lowrank.a.abs().sum() > 0
    assert torch.equal(mod.lowrank.delta(), torch.zeros_like(lin.weight))  # lowrank_init=0: B = 0
    block.export()
    base = FakeQuantLinear(lin, 4, G, True, 1.0)
    assert torch.equal(adapter.get_linear(layer, "mlp.up_proj").weight, base.weight)  # nothing trained: RTN
    it.close()


class _Dense(torch.nn.Module):
    """x -> x M and its inverse as dense products: what the fast transforms must compute."""

    def __init__(self, transform):
        super().__init__()
        self.m = transform.matrix(torch.float64).to(torch.float32)

    def forward(self, x):
        return x @ self.m

    def inverse(self, x):
        return x @ self.m.T


def test_lowrank_init_is_the_svd_of_the_error_in_the_latent_basis():
    """QuaRot's down_proj makes its error in the rotated basis W M; A @ B is stored unrotated (err M^T)."""
    model = tiny_model("llama", num_layers=1)  # intermediate 160: base 20, M is not symmetric
    config = _cfg("quarot", smooth=False, lowrank_init=1.0, rank=4)
    adapter, _, tr, layer, inputs, it = _first_layer(model, config, random_tokens(2, 24))
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, tr)
    mod = block.mods["mlp.down_proj"]
    with torch.no_grad():
        w_eff = _Dense(mod.transform)(mod.weight)
        err = w_eff - mod.quantize_weight(w_eff)[0]
        left = (err - _Dense(mod.transform)(mod.lowrank.delta())).norm()
        s = torch.linalg.svdvals(err.double())
    assert float(left) == pytest.approx(float(s[4:].norm()), rel=1e-2)
    it.close()


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: the norm readers rotated online too
def test_block_gradients_match_dense_rotations(family):
    """The fast transforms (down_proj's online Hadamard; on Gemma3 the readers' online rotation after
    their norms) give the loss and the gradients that dense rotation matrices give."""
    model = tiny_model(family, num_layers=1)
    config = _cfg("quarot", lowrank_init=0.5)
    adapter, _, tr, layer, inputs, it = _first_layer(model, config, random_tokens(2, 24))
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, tr)
    params = [p for g in block.param_groups(config.bisup) for p in g["params"]]
    with_transform = sorted(name for name, m in block.mods.items() if m.transform is not None)
    readers = sorted(quarot.READERS) if family == "gemma3" else []
    assert with_transform == sorted(readers + ["mlp.down_proj"])
    assert not any(isinstance(c, RotateAfter) for c in layer.children())

    def loss_and_grads():
        for p in params:
            p.grad = None
        with torch.enable_grad():
            out = layer(inputs.hidden[0], **inputs.kwargs[0])[0]
            loss = (out - inputs.targets[0]).square().mean()
            loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    fast, fast_grads = loss_and_grads()
    for m in block.mods.values():
        if m.transform is not None:
            m.transform = _Dense(m.transform)
    dense, dense_grads = loss_and_grads()
    assert fast == pytest.approx(dense, rel=1e-4)
    assert all(g.abs().sum() > 0 for g in fast_grads[:3])
    for f, d in zip(fast_grads, dense_grads):
        assert float((f - d).norm()) <= 1e-3 * float(d.norm()) + 1e-9
    it.close()


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,rounding,rotation,loss", [
    ("quarot", False, False, "mse"), ("atom", False, False, "mse"), ("quarot", True, False, "mse"),
    ("quarot", True, True, "mse"), ("atom", False, True, "mse"), ("quarot", True, False, "token")])
def test_training_lowers_the_block_loss(method, rounding, rotation, loss):
    model = tiny_model("llama", num_layers=1)
    # from the flat clip init: the searched init (on by default) leaves too little to train on a tiny layer
    config = _cfg(method, epochs=15, lr=1e-2, lowrank_lr=1e-3, rounding=rounding, weight_clip_search=False,
                  head_rotation=rotation, loss=loss)
    adapter, base, tr, layer, inputs, it = _first_layer(model, config, random_tokens(4, 32))
    outliers = base.outliers(adapter, inputs.stats, config) if base.outliers else {}
    block = bisup_method.Block(adapter, layer, config, inputs.stats, outliers, tr)
    chunks = list(range(len(inputs.hidden)))
    before = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks, loss)
    log = bisup_training.train_block(block, inputs, config.bisup, chunks, 0, "t", False)
    after = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks, loss)
    assert after < 0.9 * before, (before, after, log)
    if rotation:  # values always; Q/K only where the KV spec rotates keys (QuaRot)
        assert block.value_rotation.generator.detach().abs().max() > 0
        assert (block.key_rotation is not None) == (method == "quarot")
    block.export()  # the exported ordinary layer computes what was trained
    exported = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks, loss)
    assert exported == pytest.approx(after, rel=1e-3)
    it.close()


def test_token_loss_weighs_every_token_alike():
    """A sink token with 1000x the energy owns the "mse" loss; "token" averages relative errors."""
    target = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    target[0, 0] *= 1000.0
    noise = 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    sink_only, rest_only = target.clone(), target.clone()
    sink_only[0, 0] += noise[0, 0] * 1000.0
    rest_only[0, 1:] += noise[0, 1:]
    mse = bisup_training.relative_error
    assert mse(rest_only, target, "mse") < 1e-5 * mse(sink_only, target, "mse")
    torch.testing.assert_close(mse(sink_only, target, "token"), (noise[0, 0].square().sum() * 1e6
                                                                    / target[0, 0].square().sum()) / 4)
    torch.testing.assert_close(mse(rest_only, target, "token"),
                               (noise[0, 1:].square().sum(-1) / target[0, 1:].square().sum(-1)).sum() / 4)
    with pytest.raises(ValueError, match=r"BiSupConfig\.loss='l1': expected one of \['mse', 'token'\]"):
        BiSupConfig(loss="l1")


def test_signsgd_step_and_rounding_option():
    p = torch.nn.Parameter(torch.tensor([0.1, 0.2, -0.3]))
    p.grad = torch.tensor([-2.0, 0.0, 1e-9])
    opt = bisup_training.SignSGD([p], lr=0.05)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.15, 0.2, -0.35]))
    assert not opt.state  # no moments
    bc = BiSupConfig(rounding_optimizer="signsgd", rounding_lr=0.02)
    groups = [dict(params=[p], lr=1e-2), dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=0.02, name="rounding")]
    adam, sign = bisup_training._optimizers(groups, bc)
    assert isinstance(adam, torch.optim.AdamW) and len(adam.param_groups) == 1 and adam.param_groups[0]["params"] == [p]
    assert isinstance(sign, bisup_training.SignSGD) and sign.param_groups[0]["lr"] == 0.02
    assert [type(o) for o in bisup_training._optimizers(groups, BiSupConfig())] == [torch.optim.AdamW]
    with pytest.raises(ValueError, match=r"BiSupConfig\.rounding_optimizer='sgd': expected one of"):
        BiSupConfig(rounding_optimizer="sgd")


@pytest.mark.parametrize("schedule", BiSupConfig.LR_SCHEDULES)
def test_training_with_signsgd_rounding_lowers_the_block_loss(schedule):
    model = tiny_model("llama", num_layers=1)
    config = _cfg("quarot", epochs=15, lr=1e-2, lowrank_lr=1e-3, rounding_optimizer="signsgd", rounding_lr=1e-2,
                  weight_clip_search=False, lr_schedule=schedule)
    adapter, base, tr, layer, inputs, it = _first_layer(model, config, random_tokens(4, 32))
    block = bisup_method.Block(adapter, layer, config, inputs.stats, {}, tr)
    chunks = list(range(len(inputs.hidden)))
    before = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks)
    start = [m.w_round.detach().clone() for m in block.mods.values()]
    bisup_training.train_block(block, inputs, config.bisup, chunks, 0, "t", False)
    after = bisup_training.block_loss(layer, inputs.hidden, inputs.kwargs, inputs.targets, chunks)
    assert after < 0.9 * before, (before, after)
    steps = 15 * len(chunks)
    for m, s in zip(block.mods.values(), start):
        moved = ((m.w_round.detach() - s) / 1e-2).abs()
        if schedule == "constant":  # sign steps of exactly rounding_lr (a zero gradient: none)
            assert moved.max() <= steps + 1e-3 and torch.allclose(moved, moved.round(), atol=1e-3)
        else:  # step i moves by rounding_lr * (1 - i / steps): at most (steps + 1) / 2 of them in all
            assert moved.max() <= (steps + 1) / 2 + 1e-3 and moved.max() > 1.0
    it.close()


def test_deterministic_with_a_seed():
    calib, ids = random_tokens(4, 24), random_tokens(1, 16, seed=3)
    logits = []
    for _ in range(2):
        m = bisup.quantize_model(tiny_model("qwen2"), _cfg("quarot"), calib_data=calib, progress=False)
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("method,rotation", [("quarot", False), ("atom", False), ("gptq", False), ("quarot", True)])
def test_save_load_is_exact_and_real_mode_runs(tmp_path, method, rotation):
    calib, ids = random_tokens(4, 24), random_tokens(1, 16, seed=3)
    config = _cfg(method, group=32, val_windows=2, head_rotation=rotation, rotation_lr=1e-2)  # the real kernels take groups of 32
    m = bisup.quantize_model(tiny_model("llama"), config, calib_data=calib, progress=False)
    layers, e2e = m.bisup_log[:-1], m.bisup_log[-1]  # one entry per layer, then the end-to-end stage's
    assert len(layers) == 2 and all("val_after" in e for e in layers) and e2e["stage"] == "end-to-end"
    clips = {float(mod.act_quantizer.clip) for mod in m.modules() if isinstance(mod, FakeQuantLinear)}
    assert len(clips) > 1  # learned per linear
    bisup.save_quantized(m, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "bisup_config.json").read_text())
    assert meta["quant_config"]["bisup"]["rank"] == 4
    loaded = bisup.load_quantized(tmp_path / "q")
    assert loaded.bisup_config == config
    with torch.no_grad():
        ref = m(ids).logits
        assert torch.equal(loaded(ids).logits, ref)
        real = bisup.load_quantized(tmp_path / "q", mode="real")
        out = real(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bisup_none_is_the_base_method():
    calib, ids = random_tokens(4, 24), random_tokens(1, 16, seed=3)
    cfg = QuantConfig(method="quarot", w_group_size=G, a_group_size=G)
    assert cfg.bisup is None
    a = bisup.quantize_model(tiny_model("llama"), cfg, calib_data=calib, progress=False)
    b = bisup.quantize_model(tiny_model("llama"), cfg, progress=False)  # QuaRot RTN does not calibrate
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert not any(isinstance(mod, LearnableLinear) for mod in a.modules())


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("rank", 0), ("rank", 2.5), ("epochs", -1), ("batch_size", 0),
                                         ("lr", -1.0), ("lr", "fast"), ("lowrank_scale", 0.0),
                                         ("smooth_alpha", 1.5), ("weight_clip_init", 0.0), ("smooth", "yes"),
                                         ("weight_clip_search", 1),
                                         ("val_windows", -2), ("lowrank_init", 2.0)])
def test_invalid_bisup_config_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"BiSupConfig\.{field}={value!r}: expected"):
        BiSupConfig(**{field: value})


def test_invalid_nesting_and_unknown_fields():
    with pytest.raises(ValueError, match="QuantConfig.bisup="):
        QuantConfig(bisup="yes")
    with pytest.raises(ValueError, match="unknown fields"):
        QuantConfig.from_dict({"bisup": {"ranks": 3}})
    calib = random_tokens(2, 16)
    with pytest.raises(ValueError, match="val_windows"):
        bisup.quantize_model(tiny_model("llama"), _cfg("rtn", val_windows=2), calib_data=calib, progress=False)


def test_json_round_trip_and_old_configs():
    cfg = QuantConfig(method="atom", bisup=BiSupConfig(rank=3, lr=1e-3, smooth=False))
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.bisup, BiSupConfig)
    old = QuantConfig().to_dict()
    del old["bisup"]
    assert QuantConfig.from_dict(old).bisup is None
    assert BiSupConfig.from_dict(BiSupConfig().to_dict()) == BiSupConfig()


def test_cli_flags():
    from bisup.cli import build_parser, config_from_args

    a = build_parser().parse_args("quantize --method quarot --bisup --bisup-epochs 3 --bisup-rank 2 "
                                  "--bisup-lr 0.01 --bisup-spaces smooth,act_clip".split())
    b = config_from_args(a).bisup
    assert (b.epochs, b.rank, b.lr, b.smooth, b.act_clip, b.weight_clip, b.lowrank) == (3, 2, 0.01, True, True, False, False)
    assert config_from_args(build_parser().parse_args(["quantize"])).bisup is None
    c = config_from_args(build_parser().parse_args("quantize --bisup --no-bisup-clip-search --w-clip-search".split()))
    assert not c.bisup.weight_clip_search and c.w_clip_search and BiSupConfig().weight_clip_search
    assert config_from_args(build_parser().parse_args("quantize --bisup".split())).bisup.weight_clip_search
    d = config_from_args(build_parser().parse_args(
        "quantize --bisup --bisup-loss token --bisup-rounding-init gptq --bisup-spaces rounding,head_rotation".split()))
    assert (d.bisup.loss, d.bisup.rounding_init, d.bisup.head_rotation, d.bisup.smooth) == ("token", "gptq", True, False)
    with pytest.raises(ValueError, match="--bisup-spaces"):
        config_from_args(build_parser().parse_args("quantize --bisup --bisup-spaces smoth".split()))
