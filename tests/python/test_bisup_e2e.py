"""BiSup's end-to-end stage (bisup/methods/bisup_e2e.py, BiSupConfig.e2e_epochs) on tiny random models."""
import copy
import dataclasses

import pytest
import torch

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.methods.bisup_e2e import distribution_loss, recomputed_layers
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, random_tokens, tiny_model
from bisup.nn.fake_quant import FakeQuantLinear


def _cfg(method="atom", **bis):
    return QuantConfig(method=method, w_group_size=32, a_group_size=32, kv_bits=4, atom_outliers=16, a_clip=0.9,
                       bisup=BiSupConfig(**{"epochs": 1, "batch_size": 2, "rank": 4, **bis}))


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear) and m.quantized}


@pytest.mark.parametrize("method", ["quarot", "atom"])
def test_end_to_end_moves_only_scales_and_clips_and_lowers_the_kl(method):
    calib = random_tokens(6, 24)
    fp = tiny_model("llama")
    without = bisup.quantize_model(copy.deepcopy(fp), _cfg(method, val_windows=2, e2e_epochs=0), calib_data=calib, progress=False)
    with_e2e = bisup.quantize_model(copy.deepcopy(fp), _cfg(method, val_windows=2, e2e_epochs=8, e2e_lr=2e-2),
                                    calib_data=calib, progress=False)
    entry = with_e2e.bisup_log[-1]
    assert entry["stage"] == "end-to-end" and entry["e2e_kl_last_epoch"] < entry["e2e_kl_first_epoch"]
    assert entry["e2e_val_kl_after"] != entry["e2e_val_kl_before"]
    a, b = _linears(without), _linears(with_e2e)
    assert a.keys() == b.keys() and len(a) == 7 * len(fp.model.layers)
    moved = 0
    for name in a:  # the block-wise stage is the same; the end-to-end stage keeps every code
        ca, cb = a[name].weight_codes(), b[name].weight_codes()
        assert torch.equal(ca.codes, cb.codes)
        assert cb.scales.dtype == torch.float16
        moved += int(not torch.equal(ca.scales, cb.scales))
        if ca.has_outliers:
            assert torch.equal(ca.outlier_codes, cb.outlier_codes)
        assert torch.equal(b[name].weight, cb.dequantize(b[name].in_features, b[name].weight.dtype))
    assert moved == len(a)
    clips_a = [float(m.act_quantizer.clip) for m in a.values()]
    clips_b = [float(m.act_quantizer.clip) for m in b.values()]
    assert clips_a != clips_b and all(0 < c <= 1 for c in clips_b)
    train = calib[:4]  # the training windows (the last 2 are validation): KL against the FP model is lower
    with torch.no_grad():
        ref = fp(train).logits
        kl_a = distribution_loss(without(train).logits, ref).item()
        kl_b = distribution_loss(with_e2e(train).logits, ref).item()
    assert kl_b < kl_a


def test_end_to_end_model_saves_and_runs_real_mode_as_fake(tmp_path):
    """mode="real" defers each layer's conversion to after the end-to-end stage; the real model runs the
    same codes and scales as the fake one (save/load exact, real within the kernels' tolerance)."""
    calib, ids = random_tokens(4, 24), random_tokens(1, 16, seed=3)
    cfg = _cfg("quarot", e2e_epochs=2, e2e_lr=1e-2)
    fake = bisup.quantize_model(tiny_model("llama"), cfg, calib_data=calib, progress=False)
    real = bisup.quantize_model(tiny_model("llama"), cfg.replace(mode="real"), calib_data=calib, progress=False)
    assert not _linears(real)  # every linear became a QuantLinear
    bisup.save_quantized(fake, tmp_path / "q")
    loaded = bisup.load_quantized(tmp_path / "q")
    with torch.no_grad():
        ref = fake(ids).logits
        assert torch.equal(loaded(ids).logits, ref)
        out = real(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_runs_on_every_family(family):
    """The teacher (final norm + head of the last layer's FP outputs) and the student (the decoder's
    normed output + head) are the same function on the unquantized model: the KL starts at the
    quantization's, and the stage lowers it on its own windows."""
    calib = random_tokens(4, 24)
    m = bisup.quantize_model(tiny_model(family), _cfg("quarot", e2e_epochs=6, e2e_lr=2e-2), calib_data=calib,
                             progress=False)
    entry = m.bisup_log[-1]
    assert 0 < entry["e2e_kl_last_epoch"] < entry["e2e_kl_first_epoch"]


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_the_full_precision_model(family):
    """Nothing quantized (QuaRot's rotations only): the quantized model's distribution is the teacher's."""
    cfg = QuantConfig(method="quarot", w_bits=16, a_bits=16, kv_bits=16,
                      bisup=BiSupConfig(epochs=0, batch_size=2, e2e_epochs=1, val_windows=2))
    m = bisup.quantize_model(tiny_model(family), cfg, calib_data=random_tokens(4, 24), progress=False)
    assert m.bisup_log[-1]["e2e_val_kl_before"] == pytest.approx(0.0, abs=1e-6)


def test_recomputed_layers_give_the_same_gradients():
    model, ids = tiny_model("qwen3"), random_tokens(2, 20)
    adapter = get_adapter(model)
    model.requires_grad_(False)
    scale = torch.nn.Parameter(torch.ones(model.config.hidden_size))
    grads, calls = [], []
    adapter.layers()[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    for recompute in (False, True):
        hook = adapter.layers()[1].register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * scale,) + args[1:], kwargs),
                                                             with_kwargs=True)
        ctx = recomputed_layers(adapter.layers()) if recompute else torch.enable_grad()
        with ctx:
            loss = model(ids).logits.square().mean()
        loss.backward()
        hook.remove()
        grads.append(scale.grad.clone())
        calls.append(0)
        scale.grad = None
    torch.testing.assert_close(grads[0], grads[1])
    assert calls == [1, 0, 1, 1, 0]  # recomputed: the layer ran again in the backward pass
    assert grads[0].abs().sum() > 0
    assert all("forward" not in vars(layer) for layer in adapter.layers())  # the class's forward again
    hooked = adapter.layers()[0]
    hooked.forward = own = hooked.forward  # an instance forward, as accelerate's device hooks install
    with recomputed_layers(adapter.layers()):
        assert hooked.forward is not own
    assert hooked.forward is own


def test_skipped_with_a_warning_when_layers_live_off_the_compute_device(monkeypatch):
    """A model kept in CPU RAM and quantized layer by layer on a GPU cannot run the whole-model stage:
    BiSup warns, records it, and the result is the block-wise one."""
    from bisup.methods import bisup as bisup_method

    calib, ids = random_tokens(4, 24), random_tokens(1, 16, seed=3)
    ref = bisup.quantize_model(tiny_model("llama"), _cfg(e2e_epochs=0), calib_data=calib, progress=False)
    monkeypatch.setattr(bisup_method, "module_device", lambda module: torch.device("cuda"))  # "home" != compute
    with pytest.warns(UserWarning, match="end-to-end stage .* is skipped: 2 decoder layers live off the compute"):
        m = bisup.quantize_model(tiny_model("llama"), _cfg(), calib_data=calib, progress=False)
    assert m.bisup_log[-1] == {"stage": "end-to-end", "skipped": "2 layers live off the compute device"}
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("convention,act_clip", [("bisup", False), ("compressed-tensors", False)])
def test_clips_stay_where_they_are_not_learned(convention, act_clip):
    """act_clip off, or an engine's (unclipped) activation quantizer: the stage trains the scales only."""
    cfg = QuantConfig(method="quarot", w_group_size=32, a_group_size=32, a_convention=convention,
                      a_clip=1.0 if convention != "bisup" else 0.9,
                      bisup=BiSupConfig(epochs=1, batch_size=2, rank=4, act_clip=act_clip, e2e_epochs=2, e2e_lr=2e-2))
    calib = random_tokens(4, 24)
    m = bisup.quantize_model(tiny_model("llama"), cfg, calib_data=calib, progress=False)
    ref = bisup.quantize_model(tiny_model("llama"), cfg.replace(bisup=dataclasses.replace(cfg.bisup, e2e_epochs=0)), calib_data=calib,
                               progress=False)
    clips = {float(mod.act_quantizer.clip) for mod in _linears(m).values()}
    assert clips == {cfg.a_clip}
    a, b = _linears(ref), _linears(m)
    assert all(not torch.equal(a[n].weight_codes().scales, b[n].weight_codes().scales) for n in a)


def test_distribution_loss_is_the_mean_token_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    p, log_q = t.softmax(-1), s.log_softmax(-1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(distribution_loss(s, t), expected)
    assert distribution_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field,value", [("e2e_epochs", -1), ("e2e_epochs", 1.5), ("e2e_lr", -1.0)])
def test_bad_end_to_end_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"BiSupConfig.{field}="):
        BiSupConfig(**{field: value})


def test_label_names_the_end_to_end_stage():
    assert "e2e" not in _cfg().label()  # today's defaults
    assert "e2e_epochs=0" in _cfg(e2e_epochs=0).label()
    assert "e2e_lr" not in _cfg(e2e_epochs=0, e2e_lr=1e-3).label()  # read only with the stage on
    assert "e2e_lr=0.001" in _cfg(e2e_lr=1e-3).label()


def test_cli_end_to_end_options():
    from bisup.cli import build_parser, config_from_args

    b = config_from_args(build_parser().parse_args(
        "quantize --method atom --bisup --bisup-e2e-epochs 2 --bisup-e2e-lr 0.005".split())).bisup
    assert (b.e2e_epochs, b.e2e_lr) == (2, 0.005)
    assert config_from_args(build_parser().parse_args("quantize --bisup".split())).bisup.e2e_epochs == BiSupConfig().e2e_epochs
