"""Atom: outlier channels chosen from calibration, shared by linears reading the same input, kept at
INT8 (weights per row, activations per token), the rest in 4-bit groups; KV quantized; GPTQ option."""
import pytest
import torch

from bisup.config import QuantConfig
from bisup.methods import atom
from bisup.methods.calibration import iterate_layers
from bisup.models.adapters import get_adapter
from bisup.models.tiny import random_tokens, tiny_model
from bisup.nn.attention import get_kv_spec
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.groups import fake_quant_channels

HOT = [7, 50, 81]  # hidden channels made into activation outliers


def _model_with_outliers(num_layers=2, seed=0):
    """Tiny Llama whose norms blow up channels HOT (like the massive activations of real LLMs)."""
    model = tiny_model("llama", seed=seed, num_layers=num_layers)
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.layers():
            adapter.attn_norm(layer).weight[HOT] *= 40
            adapter.mlp_norm(layer).weight[HOT] *= 40
    return model, adapter


def _config(**kw):
    base = dict(method="atom", w_bits=4, a_bits=4, w_group_size=16, a_group_size=16, atom_outliers=8, kv_bits=4)
    base.update(kw)
    return QuantConfig(**base)


def _calib():
    return random_tokens(4, 32, seed=7)


def test_outlier_sets_found_and_shared():
    model, adapter = _model_with_outliers()
    atom.apply(model, adapter, _config(), _calib(), progress=False)
    for layer in adapter.layers():
        lin = {n: adapter.get_linear(layer, n) for n in adapter.linear_names()}
        assert all(isinstance(m, FakeQuantLinear) for m in lin.values())
        qkv = [lin[f"self_attn.{p}_proj"].outlier_idx for p in "qkv"]
        gu = [lin["mlp.gate_proj"].outlier_idx, lin["mlp.up_proj"].outlier_idx]
        assert all(torch.equal(qkv[0], t) for t in qkv) and torch.equal(gu[0], gu[1])
        for idx in qkv + gu + [lin["self_attn.o_proj"].outlier_idx, lin["mlp.down_proj"].outlier_idx]:
            assert idx.numel() == 8 and idx.unique().numel() == 8
        # the injected channels dominate the norm outputs, so they must be among the chosen ones
        assert set(HOT) <= set(qkv[0].tolist()) and set(HOT) <= set(gu[0].tolist())
        for name, m in lin.items():  # activation quantizers carry the same set as the weights
            assert torch.equal(m.act_quantizer.outlier_idx, m.outlier_idx), name
            perm = atom.reorder_index(m)
            assert torch.equal(perm.sort().values, torch.arange(m.in_features))
            assert torch.equal(perm[-8:], m.outlier_idx)
    for layer in adapter.layers():
        spec = get_kv_spec(adapter.attention(layer))
        assert spec.bits == 4 and not spec.sym


def test_outliers_follow_calibration_statistics():
    """The chosen set is the top-k of the mean square input, computed on the calibration inputs."""
    model, adapter = _model_with_outliers(num_layers=1)
    (_, layer, inputs), = list(iterate_layers(model, adapter, _calib(), progress=False, stats=("channel",)))
    chosen = atom.choose_outliers(adapter, inputs.stats, 8)
    for name, idx in chosen.items():
        ms = inputs.stats[name].mean_square()
        assert ms[idx].min() >= ms[atom.complement(idx, ms.numel())].max()
    assert atom.choose_outliers(adapter, inputs.stats, 0) == {}


@pytest.mark.parametrize("use_gptq", [False, True])
def test_outlier_channels_have_int8_resolution(use_gptq):
    """Weight columns and activation channels in the outlier set carry 8-bit error; the rest 4-bit."""
    model, adapter = _model_with_outliers(num_layers=1)
    fp = {n: adapter.get_linear(adapter.layers()[0], n).weight.detach().clone() for n in adapter.linear_names()}
    atom.apply(model, adapter, _config(gptq=use_gptq, kv_bits=16), _calib(), progress=False)
    layer = adapter.layers()[0]
    for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        m = adapter.get_linear(layer, name)
        idx = m.outlier_idx
        rest = atom.complement(idx, m.in_features)
        codes = m.weight_codes()
        assert codes.outlier_bits == 8 and codes.outlier_codes.abs().max() <= 127
        # outlier columns: exactly code * per-row INT8 scale
        torch.testing.assert_close(m.weight[:, idx], codes.outlier_codes.float() * codes.outlier_scales.float(),
                                   rtol=0, atol=0)
        if not use_gptq:  # RTN: error within half an INT8 step of the row's outlier max
            w = fp[name]
            step = w[:, idx].abs().amax(1, keepdim=True) / 127
            assert ((m.weight[:, idx] - w[:, idx]).abs() <= 0.5 * step * 1.001 + 1e-7).all()
            rel = lambda c: ((m.weight[:, c] - w[:, c]).norm() / w[:, c].norm()).item()
            assert rel(idx) < 0.01 < rel(rest)
        # activations: the outlier channels at 8 bits per token, the rest at 4 bits in groups
        x = torch.randn(64, m.in_features, generator=torch.Generator().manual_seed(1))
        x[:, idx] *= 50
        xq = m.act_quantizer(x)
        step_x = x[:, idx].abs().amax(1, keepdim=True) / 127
        assert ((xq[:, idx] - x[:, idx]).abs() <= 0.5 * step_x * 1.001 + 1e-6).all()
        torch.testing.assert_close(xq[:, rest], fake_quant_channels(x[:, rest], 4, 16), rtol=0, atol=0)


def test_atom_beats_plain_groups_on_outlier_model():
    """Same 4-bit groups with and without the INT8 outlier channels: keeping them lowers the logit error."""
    ids = random_tokens(2, 32, seed=9)
    ref_model, _ = _model_with_outliers()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    errs = {}
    for k in (0, 8):
        model, adapter = _model_with_outliers()
        atom.apply(model, adapter, _config(atom_outliers=k, kv_bits=16), _calib(), progress=False)
        with torch.no_grad():
            errs[k] = (model(input_ids=ids).logits - ref).pow(2).mean().item()
    assert errs[8] < 0.5 * errs[0], errs


def test_gptq_weights_lower_layer_error_than_rtn():
    """Atom with GPTQ weights vs RTN weights, activations FP: GPTQ's layer output error is lower."""
    ids = _calib()
    outs = {}
    for use_gptq in (False, True):
        model, adapter = _model_with_outliers(num_layers=1)
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        atom.apply(model, adapter, _config(gptq=use_gptq, a_bits=16, kv_bits=16), ids, progress=False)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        outs[use_gptq] = (out - ref).norm().item()
    assert outs[True] < outs[False], outs
