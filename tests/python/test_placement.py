"""Placement: models quantized in their own dtype (bf16) and place, one decoder layer at a time in fp32."""
import pytest
import torch
import torch.nn.functional as F

import bisup
from bisup import BiSupConfig, QuantConfig
from bisup.methods.calibration import iterate_layers
from bisup.methods.placement import Placement
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, TINY_GROUP, random_tokens, tiny_model

CALIB, EVAL = random_tokens(4, 32, seed=1), random_tokens(4, 32, seed=2)
G = dict(w_group_size=TINY_GROUP, a_group_size=TINY_GROUP, kv_bits=4, kv_group_size=TINY_GROUP)
CONFIGS = {
    "quarot_gptq": QuantConfig(method="quarot", gptq=True, **G),
    "atom_bisup": QuantConfig(method="atom", atom_outliers=16, bisup=BiSupConfig(epochs=1), **G),
}


def _loss(model):
    with torch.no_grad():
        logits = model(EVAL).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), EVAL[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_model_stays_bf16_and_matches_the_fp32_run(family, name):
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(family, dtype=dtype)
        bisup.quantize_model(model, CONFIGS[name], calib_data=CALIB, progress=False)
        assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {dtype}
        losses[dtype] = _loss(model)
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) < 0.01 * losses[torch.float32], losses


def test_layers_compute_in_fp32_and_go_back():
    model = tiny_model("llama", dtype=torch.bfloat16)
    adapter = get_adapter(model)
    seen = []
    for index, layer, inputs in iterate_layers(model, adapter, CALIB, progress=False):
        seen.append({p.dtype for p in layer.parameters()})
        assert all(h.dtype == torch.float32 for h in inputs.hidden)
        for i, other in enumerate(adapter.layers()):  # every other layer stays in the model's dtype
            if i != index:
                assert {p.dtype for p in other.parameters()} == {torch.bfloat16}
    assert seen == [{torch.float32}] * adapter.num_layers
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("cfg", [CONFIGS["quarot_gptq"], QuantConfig(method="rtn", **G)])
def test_offloaded_activations_and_explicit_device_change_nothing(cfg):
    ref = bisup.quantize_model(tiny_model("qwen2"), cfg, calib_data=CALIB, progress=False)
    off = bisup.quantize_model(tiny_model("qwen2"), cfg, calib_data=CALIB, progress=False, device="cpu",
                               offload_activations=True)
    with torch.no_grad():
        assert torch.equal(ref(EVAL).logits, off(EVAL).logits)


def test_real_mode_converts_each_layer_as_it_is_done():
    """mode="real": a layer is real as soon as it leaves; the model equals fake mode converted at the end."""
    cfg = QuantConfig(method="quarot", gptq=True, w_group_size=32, a_group_size=32, kv_bits=4)
    kinds = []

    def spy(layer):
        kinds.append(sorted({type(m).__name__ for m in layer.modules()} & {"QuantLinear", "FakeQuantLinear"}))

    model = tiny_model("llama")
    adapter = get_adapter(model)
    from bisup.methods import quarot
    from bisup.quantize import layer_to_real

    placement = Placement(finish=lambda layer: (layer_to_real(adapter, layer, cfg.replace(mode="real")), spy(layer)))
    quarot.apply(model, adapter, cfg, CALIB, progress=False, placement=placement)
    assert kinds == [["QuantLinear"]] * adapter.num_layers  # no FakeQuantLinear left behind in any layer
    real = bisup.quantize_model(tiny_model("llama"), cfg.replace(mode="real"), calib_data=CALIB, progress=False)
    converted = bisup.quantize_model(tiny_model("llama"), cfg, calib_data=CALIB, progress=False)
    from bisup.quantize import to_real

    to_real(converted, get_adapter(converted), cfg.replace(mode="real"))
    with torch.no_grad():
        assert torch.equal(real(EVAL).logits, converted(EVAL).logits)
