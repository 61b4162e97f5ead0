"""Block-by-block calibration: layer inputs, collected statistics and memory vs a full-model run."""
import gc
import weakref

import pytest
import torch

from bisup.methods.calibration import capture_layer_inputs, iterate_layers
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, random_tokens, tiny_model


def _direct_inputs(model, adapter, ids):
    """Every decoder linear's input, from hooks during one ordinary model forward."""
    seen = {}
    handles = []
    for i, layer in enumerate(adapter.layers()):
        for name in adapter.linear_names():
            def hook(module, args, key=(i, name)):
                seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            handles.append(adapter.get_linear(layer, name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}, out.hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_and_layer_outputs_match_full_model(family):
    model = tiny_model(family, num_layers=3)
    adapter = get_adapter(model)
    ids = random_tokens(5, 24, seed=1)  # seq 24 > Gemma3's sliding window of 8
    direct, hidden_states = _direct_inputs(model, adapter, ids)

    visited = []
    # batch_size 2 makes an uneven last chunk; stats must still add up over all 5 x 24 tokens
    for index, layer, inputs in iterate_layers(model, adapter, ids, progress=False, stats=("hessian", "channel"),
                                               sequential=False, batch_size=2):
        visited.append(index)
        torch.testing.assert_close(torch.cat(inputs.hidden).double(), hidden_states[index].double(), rtol=1e-5, atol=1e-5)
        for name in adapter.linear_names():
            x = direct[(index, name)]
            st = inputs.stats[name]
            assert st.tokens == x.shape[0] == 5 * 24
            torch.testing.assert_close(st.hessian().double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st.abs_max.double(), x.abs().amax(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st.mean_square().double(), x.square().mean(0), rtol=1e-4, atol=1e-6)
        # linears reading the same tensor share one statistics object (one Hessian per input)
        st = inputs.stats
        assert st["self_attn.q_proj"] is st["self_attn.k_proj"] is st["self_attn.v_proj"]
        assert st["mlp.gate_proj"] is st["mlp.up_proj"]
        assert len({id(v) for v in st.values()}) == 4
    assert visited == list(range(adapter.num_layers))


def test_stat_transforms_take_statistics_of_the_transformed_input():
    """stat_transforms: a linear's Hessian is that of x M (QuaRot's online Hadamard before down_proj)."""
    from bisup.rotation.fuse import HadamardTransform

    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = random_tokens(3, 16, seed=4)
    direct, _ = _direct_inputs(model, adapter, ids)
    t = HadamardTransform(adapter.intermediate_size)
    for index, _, inputs in iterate_layers(model, adapter, ids, progress=False, sequential=False,
                                           stat_transforms={"mlp.down_proj": t}):
        x = direct[(index, "mlp.down_proj")]
        xt = t(x)  # float64: the reference transform
        torch.testing.assert_close(inputs.stats["mlp.down_proj"].hessian().double(), xt.T @ xt / x.shape[0],
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(inputs.stats["mlp.down_proj"].hessian().double(), x.T @ x / x.shape[0], atol=1e-3)
        xq = direct[(index, "self_attn.q_proj")]  # other linears untouched
        torch.testing.assert_close(inputs.stats["self_attn.q_proj"].hessian().double(), xq.T @ xq / xq.shape[0],
                                   rtol=1e-4, atol=1e-5)


def test_sequential_feeds_modified_layer_output():
    """With sequential=True the next layer sees the outputs of the layer as the caller left it."""
    model = tiny_model("llama", num_layers=2)
    adapter = get_adapter(model)
    ids = random_tokens(3, 16, seed=2)
    seen = {}
    for index, layer, inputs in iterate_layers(model, adapter, ids, progress=False, sequential=True):
        seen[index] = torch.cat(inputs.hidden)
        if index == 0:
            with torch.no_grad():
                adapter.o_proj(layer).weight.mul_(0.5)  # "quantize" layer 0
    _, hidden_states = _direct_inputs(model, adapter, ids)  # the model now holds the modified layer 0
    torch.testing.assert_close(seen[1], hidden_states[1], rtol=1e-5, atol=1e-5)

    # and sequential=False would have passed the unmodified output on
    model2 = tiny_model("llama", num_layers=2)
    _, fp_states = _direct_inputs(model2, get_adapter(model2), ids)
    assert not torch.allclose(seen[1], fp_states[1], atol=1e-4)


@pytest.mark.parametrize("sequential", [True, False])
def test_targets_are_the_full_precision_models_layer_outputs(sequential):
    """targets=True: every layer's targets are the unquantized model's outputs (KV quantization off),
    while with sequential=True the inputs are the stream of the layers as the caller changed them."""
    from bisup.config import QuantConfig
    from bisup.methods.common import apply_kv_quant

    ids = random_tokens(3, 16, seed=4)
    fp = tiny_model("llama", num_layers=3)
    _, fp_states = _direct_inputs(fp, get_adapter(fp), ids)
    model = tiny_model("llama", num_layers=3)
    adapter = get_adapter(model)
    apply_kv_quant(model, adapter, QuantConfig(kv_bits=3))  # targets must not see it
    for index, layer, inputs in iterate_layers(model, adapter, ids, progress=False, sequential=sequential,
                                               targets=True):
        if index + 1 < adapter.num_layers:  # (the model's last hidden state is after the final norm)
            torch.testing.assert_close(torch.cat(inputs.targets), fp_states[index + 1], rtol=1e-5, atol=1e-5)
        if index == 0:
            with torch.no_grad():
                adapter.o_proj(layer).weight.mul_(0.5)
        if index == 1:  # layer 1's inputs: the calibration stream (quantized KV; modified layer 0 if sequential)
            assert not torch.allclose(torch.cat(inputs.hidden), fp_states[1], atol=1e-4)
    assert index == adapter.num_layers - 1


def test_memory_bounded_to_one_layer():
    """The inputs of layer i are released by the time layer i+1 is yielded; the model is restored."""
    model = tiny_model("llama", num_layers=3)
    adapter = get_adapter(model)
    ids = random_tokens(4, 16, seed=3)
    refs = []
    for index, layer, inputs in iterate_layers(model, adapter, ids, progress=False, stats=()):
        gc.collect()
        if index > 0:
            assert all(r() is None for r in refs[index - 1]), f"layer {index - 1} inputs still alive at layer {index}"
        refs.append([weakref.ref(h) for h in inputs.hidden])
        del inputs
    # the stubs are gone and the model runs normally again
    assert all("forward" not in layer.__dict__ for layer in adapter.layers())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_capture_records_every_layer_and_rejects_bad_batches():
    model = tiny_model("gemma3", num_layers=2)
    adapter = get_adapter(model)
    cap = capture_layer_inputs(model, adapter, random_tokens(3, 12), batch_size=2)
    assert [h.shape[0] for h in cap.hidden] == [2, 1]
    assert len(cap.layer_kwargs) == 2 and all(len(kw) == 2 for kw in cap.layer_kwargs)
    assert "position_embeddings" in cap.layer_kwargs[0][0]
    with pytest.raises(ValueError, match="LongTensor"):
        capture_layer_inputs(model, adapter, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown statistics"):
        next(iterate_layers(model, adapter, random_tokens(1, 4), progress=False, stats=("bogus",)))
