import pytest
import torch

import bisup
from bisup.config import QuantConfig
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, TINY_GROUP, random_tokens, tiny_model
from bisup.nn.fake_quant import FakeQuantLinear
from bisup.quant.quantizer import fake_quantize


def _cfg(**kw):
    return QuantConfig(w_group_size=TINY_GROUP, a_group_size=TINY_GROUP, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_replaces_every_decoder_linear_and_keeps_head_fp(family):
    model = tiny_model(family)
    head = model.lm_head.weight.detach().clone()
    ids = random_tokens(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
    bisup.quantize_model(model, _cfg(), progress=False)
    a = get_adapter(model)
    for name, lin in a.named_linears():
        assert isinstance(lin, FakeQuantLinear), name
        assert lin.act_quantizer is not None and lin.act_quantizer.bits == 4
    assert torch.equal(model.lm_head.weight, head)
    with torch.no_grad():
        q = model(ids).logits
    rel = float((q - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.6  # perturbed, not destroyed


def test_rtn_weights_equal_the_group_quantizer():
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    bisup.quantize_model(model, _cfg(w_bits=3, a_bits=16), progress=False)
    lin = model.model.layers[0].mlp.down_proj
    assert lin.act_quantizer is None
    assert torch.equal(lin.weight, fake_quantize(w, 3, TINY_GROUP, True, scale_dtype=torch.float16))


def test_error_shrinks_with_more_bits():
    ids = random_tokens(2, 16)
    errs = []
    for bits in (3, 4, 8):
        model = tiny_model("qwen2")
        with torch.no_grad():
            ref = model(ids).logits
            bisup.quantize_model(model, _cfg(w_bits=bits, a_bits=bits), progress=False)
            errs.append(float((model(ids).logits - ref).norm() / ref.norm()))
    assert errs[0] > errs[1] > errs[2]


def test_w16a16_is_exact_and_kv_quant_switches_attention():
    model = tiny_model("qwen3")
    ids = random_tokens(1, 16)
    with torch.no_grad():
        ref = model(ids).logits
        bisup.quantize_model(model, _cfg(w_bits=16, a_bits=16, kv_bits=4), progress=False)
        out = model(ids).logits
    assert model.config._attn_implementation == "bisup"
    assert not torch.equal(out, ref)  # only the KV cache is quantized
    torch.testing.assert_close(out, ref, rtol=0.2, atol=0.2)


def test_quantize_model_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibrates: pass calib_data"):
        bisup.quantize_model(model, _cfg(method="gptq"), progress=False)
    with pytest.raises(ValueError, match=r"LongTensor \[n, seq_len\]"):
        bisup.quantize_model(model, _cfg(method="gptq"), calib_data=torch.zeros(4, dtype=torch.long), progress=False)
    bisup.quantize_model(model, _cfg(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        bisup.quantize_model(model, _cfg(), progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_real_mode_runs_the_integer_gemm_and_matches_fake_mode(family):
    from bisup.nn.quant_linear import QuantLinear

    ids = random_tokens(2, 16)
    kw = dict(w_group_size=32, a_group_size=32)
    fake = bisup.quantize_model(tiny_model(family), QuantConfig(**kw), progress=False)
    real = bisup.quantize_model(tiny_model(family), QuantConfig(mode="real", **kw), progress=False)
    assert all(isinstance(lin, QuantLinear) for _, lin in get_adapter(real).named_linears())
    with torch.no_grad():
        a, b = fake(ids).logits, real(ids).logits
    assert float((a - b).norm() / a.norm()) < 1e-4  # same codes; only the accumulation order differs


def test_real_mode_rejects_what_the_kernels_cannot_do():
    with pytest.raises(NotImplementedError, match="w_group_size must equal a_group_size"):
        bisup.quantize_model(tiny_model("llama"), QuantConfig(mode="real", w_group_size=32, a_group_size=-1),
                             progress=False)
    with pytest.raises(NotImplementedError, match="must be 3 or 4"):
        bisup.quantize_model(tiny_model("llama"), QuantConfig(mode="real", w_bits=8, w_group_size=32,
                                                              a_group_size=32), progress=False)
