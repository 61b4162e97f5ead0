import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from bisup.models.adapters import LINEAR_NAMES, get_adapter
from bisup.models.tiny import FAMILIES, random_tokens, tiny_model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_dimensions_match_the_linears(model):
    a = get_adapter(model)
    assert a.family == model.config.model_type.replace("_text", "")
    layer = a.layers()[0]
    h, i, d = a.hidden_size, a.intermediate_size, a.head_dim
    assert a.q_proj(layer).weight.shape == (a.num_heads * d, h)
    assert a.k_proj(layer).weight.shape == (a.num_kv_heads * d, h)
    assert a.v_proj(layer).weight.shape == (a.num_kv_heads * d, h)
    assert a.o_proj(layer).weight.shape == (h, a.num_heads * d)
    assert a.gate_proj(layer).weight.shape == (i, h)
    assert a.up_proj(layer).weight.shape == (i, h)
    assert a.down_proj(layer).weight.shape == (h, i)
    assert len(a.layers()) == a.num_layers
    assert a.embeddings().weight.shape[1] == h and a.lm_head().weight.shape[1] == h
    assert a.final_norm().weight.shape == (h,)
    assert a.attn_norm(layer).weight.shape == (h,) and a.mlp_norm(layer).weight.shape == (h,)
    assert a.linear_names() == list(LINEAR_NAMES)
    assert len(a.named_linears()) == 7 * a.num_layers


def test_family_specifics(model):
    a = get_adapter(model)
    layer = a.layers()[0]
    expected_extra = {"llama": 0, "qwen2": 0, "qwen3": 2, "gemma3": 4}[a.family]
    assert len(a.extra_norms(layer)) == expected_extra
    assert a.norm_offset == (1.0 if a.family == "gemma3" else 0.0)
    assert a.tied_embeddings == (a.family != "qwen2")
    if a.family == "gemma3":
        assert a.embed_scale == pytest.approx(a.hidden_size**0.5)
        assert a.mlp_norm(layer) is layer.pre_feedforward_layernorm
    else:
        assert a.embed_scale == 1.0


def test_layer_runs_alone_with_adapter_position_embeddings(model):
    """Running the decoder layer by layer with adapter.position_embeddings reproduces the model."""
    a = get_adapter(model)
    ids = random_tokens(1, 12)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        pos = torch.arange(ids.shape[1])[None]
        h = a.embeddings()(ids)
        for i, layer in enumerate(a.layers()):
            mask = torch.ones(12, 12, dtype=torch.bool).tril()
            if getattr(layer.self_attn, "sliding_window", None):
                w = layer.self_attn.sliding_window
                mask &= ~torch.ones(12, 12, dtype=torch.bool).tril(-w)
            out = layer(h, attention_mask=mask[None, None], position_embeddings=a.position_embeddings(h, pos, i),
                        position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
            if i < a.num_layers - 1:
                torch.testing.assert_close(h, ref[i + 1], rtol=1e-5, atol=1e-5)


def test_get_set_linear(model):
    a = get_adapter(model)
    layer = a.layers()[1]
    orig = a.get_linear(layer, "mlp.up_proj")
    new = nn.Linear(orig.in_features, orig.out_features)
    a.set_linear(layer, "mlp.up_proj", new)
    assert layer.mlp.up_proj is new and a.up_proj(layer) is new
    a.set_linear(layer, "mlp.up_proj", orig)
    with pytest.raises(KeyError, match="unknown linear 'mlp.fc1'"):
        a.get_linear(layer, "mlp.fc1")


def test_unsupported_model_names_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*Llama.*Qwen2.*Qwen3.*Gemma3"):
        get_adapter(gpt2)
    with pytest.raises(ValueError, match="model_type=None"):
        get_adapter(nn.Linear(2, 2))
