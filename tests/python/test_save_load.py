import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bisup
from bisup.api import CONFIG_FILE, TENSOR_FILE, FormatError
from bisup.config import QuantConfig
from bisup.models.tiny import TINY_GROUP, random_tokens, tiny_model
from bisup.nn.fake_quant import FakeQuantLinear


def _quantized(family="llama", **kw):
    cfg = QuantConfig(w_group_size=TINY_GROUP, a_group_size=TINY_GROUP, **kw)
    return bisup.quantize_model(tiny_model(family), cfg, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family, kw", [
    ("llama", dict(kv_bits=4, prompt_len=3)),
    ("qwen2", dict(w_bits=3, a_bits=3)),         # INT3 words (K=64) and int8 codes (K=... not /32)
    ("qwen3", dict(w_sym=False, w_bits=4)),      # asymmetric weights: zeros saved
    ("gemma3", dict(w_group_size=-1, a_group_size=-1, kv_bits=3)),
])
def test_round_trip_gives_bit_identical_logits(tmp_path, family, kw):
    cfg_kw = dict(kw)
    model = bisup.quantize_model(tiny_model(family), QuantConfig(**{**dict(w_group_size=TINY_GROUP,
                                 a_group_size=TINY_GROUP), **cfg_kw}), progress=False)
    ids = random_tokens(2, 20)
    bisup.save_quantized(model, tmp_path / "q")
    loaded = bisup.load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded.bisup_config == model.bisup_config
    # weights are stored as packed integers + fp16 scales, not as floats
    tensors = load_file(str(tmp_path / "q" / TENSOR_FILE))
    name = "model.layers.0.mlp.up_proj"
    assert f"{name}.weight" not in tensors and tensors[f"{name}.scales"].dtype == torch.float16
    assert tensors[f"{name}.qweight"].dtype in (torch.uint8, torch.int8)


def test_packed_bytes_are_int4_nibbles(tmp_path):
    model = _quantized("llama")
    bisup.save_quantized(model, tmp_path / "q")
    t = load_file(str(tmp_path / "q" / TENSOR_FILE))
    lin = model.model.layers[0].mlp.up_proj
    assert t["model.layers.0.mlp.up_proj.qweight"].shape == (lin.out_features, lin.in_features // 2)
    assert torch.equal(bisup.ops.unpack_int4(t["model.layers.0.mlp.up_proj.qweight"]), lin.weight_codes().codes)


def test_round_trip_with_gptq_style_weights_and_outliers(tmp_path):
    """A weight set by set_weight (GPTQ) and Atom-style outlier channels survive save/load exactly."""
    model = _quantized("llama")
    lin = model.model.layers[1].self_attn.o_proj
    from bisup.nn.fake_quant import ActQuantizer, quantize_weight

    idx = torch.tensor([5, 40, 77])
    base = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    new = FakeQuantLinear(base, 4, TINY_GROUP, act_quantizer=ActQuantizer(4, TINY_GROUP, outlier_idx=idx),
                          outlier_idx=idx, outlier_bits=8)
    other = quantize_weight(base.weight * 0.7, 4, TINY_GROUP, outlier_idx=idx)
    new.set_weight(other.dequantize(lin.in_features, torch.float32), scales=other.scales,
                   outlier_scales=other.outlier_scales)
    model.model.layers[1].self_attn.o_proj = new
    ids = random_tokens(1, 12)
    bisup.save_quantized(model, tmp_path / "q")
    loaded = bisup.load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.outlier_idx, idx)


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    model = _quantized("llama")
    bisup.save_quantized(model, tmp_path / "q")
    bisup.save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    class Boom(Exception):
        pass

    def broken_save(*a, **k):
        raise Boom()

    import bisup.api as api

    orig = api.save_file
    api.save_file = broken_save
    try:
        with pytest.raises(Boom):
            bisup.save_quantized(model, tmp_path / "q")
    finally:
        api.save_file = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # old copy intact, temp removed
    bisup.load_quantized(tmp_path / "q")


def test_save_needs_a_bisup_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized by bisup"):
        bisup.save_quantized(tiny_model("llama"), tmp_path / "q")


@pytest.fixture
def saved(tmp_path):
    bisup.save_quantized(_quantized("llama"), tmp_path / "q")
    return tmp_path / "q"


def _edit_meta(path, fn):
    meta = json.loads((path / CONFIG_FILE).read_text())
    fn(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def _edit_tensors(path, fn):
    t = load_file(str(path / TENSOR_FILE))
    fn(t)
    save_file(t, str(path / TENSOR_FILE))


def test_wrong_version_is_rejected(saved):
    _edit_meta(saved, lambda m: m.update(format_version=99))
    with pytest.raises(FormatError, match="format_version 99 is not supported"):
        bisup.load_quantized(saved)


def test_truncated_json_is_rejected(saved):
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match="invalid JSON"):
        bisup.load_quantized(saved)


def test_corrupted_safetensors_is_rejected(saved):
    data = (saved / TENSOR_FILE).read_bytes()
    (saved / TENSOR_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError, match="missing or corrupted"):
        bisup.load_quantized(saved)


def test_mismatched_scale_shape_is_rejected(saved):
    key = "model.layers.0.self_attn.q_proj.scales"
    _edit_tensors(saved, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(FormatError, match=r"q_proj.scales.*expected torch.float16"):
        bisup.load_quantized(saved)


def test_missing_tensor_is_rejected(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.mlp.down_proj.qweight"))
    with pytest.raises(FormatError, match="missing tensor 'model.layers.1.mlp.down_proj.qweight'"):
        bisup.load_quantized(saved)


def test_missing_plain_parameter_is_rejected(saved):
    _edit_tensors(saved, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(FormatError, match=r"missing tensors \['model.norm.weight'\]"):
        bisup.load_quantized(saved)


def test_model_shape_mismatch_is_rejected(saved):
    _edit_meta(saved, lambda m: m["model_config"].update(intermediate_size=192))
    with pytest.raises(FormatError, match="does not match the model"):
        bisup.load_quantized(saved)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bisup-quantized model directory"):
        bisup.load_quantized(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("method, extra", [("gptq", {}), ("atom", dict(kv_bits=4)), ("quarot", dict(gptq=True, kv_bits=4))])
def test_round_trip_of_every_method(tmp_path, family, method, extra):
    """Weights from GPTQ, Atom outliers, QuaRot rotations / online Hadamard / Gemma3 norm wrappers all reload exactly."""
    pytest.importorskip(f"bisup.methods.{method}")
    cfg = QuantConfig(method=method, w_group_size=TINY_GROUP, a_group_size=TINY_GROUP, n_calib=4, calib_seq_len=32,
                      atom_outliers=8, **extra)
    model = bisup.quantize_model(tiny_model(family), cfg, calib_data=random_tokens(4, 32, seed=3), progress=False)
    ids = random_tokens(2, 16)
    bisup.save_quantized(model, tmp_path / "q")
    loaded = bisup.load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
