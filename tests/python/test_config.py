import json

import pytest

from bisup.config import QuantConfig


def test_defaults_match_the_interface():
    c = QuantConfig()
    assert (c.w_bits, c.a_bits, c.kv_bits, c.w_group_size, c.a_group_size, c.kv_group_size) == (4, 4, 16, 64, 64, -1)
    assert (c.w_sym, c.a_sym, c.kv_sym, c.method, c.mode) == (True, True, False, "rtn", "fake")
    assert not c.quantizes_kv and c.quantizes_weights and c.quantizes_activations


def test_json_round_trip():
    c = QuantConfig(w_bits=3, a_bits=3, kv_bits=4, method="quarot", gptq=True, atom_outliers=16, w_clip=0.9)
    back = QuantConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("w_bits", 1, r"w_bits=1.*\[2, 8\]"),
        ("a_bits", 12, r"a_bits=12"),
        ("kv_bits", 4.0, r"kv_bits=4.0"),
        ("w_group_size", 0, r"w_group_size=0.*-1"),
        ("a_group_size", -2, r"a_group_size=-2"),
        ("w_clip", 0.0, r"w_clip=0.0.*\(0, 1\]"),
        ("a_clip", 1.5, r"a_clip=1.5"),
        ("method", "awq", r"method='awq'.*'rtn', 'gptq', 'atom', 'quarot'"),
        ("mode", "int", r"mode='int'.*'fake', 'real'"),
        ("w_sym", 1, r"w_sym=1.*True or False"),
        ("gptq_damp", -0.1, r"gptq_damp"),
        ("gptq_block_size", 0, r"gptq_block_size=0"),
        ("atom_outliers", -8, r"atom_outliers=-8"),
        ("atom_outlier_bits", 9, r"atom_outlier_bits=9"),
        ("prompt_len", -1, r"prompt_len=-1"),
        ("n_calib", 0, r"n_calib=0"),
        ("calib_seq_len", 0, r"calib_seq_len=0"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**{field: value})


def test_replace_validates():
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig().replace(w_bits=0)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown fields \['wbits'\]"):
        QuantConfig.from_dict({"wbits": 4})


@pytest.mark.parametrize("hidden, expected", [(4096, 128), (576, 16), (2048, 64), (5120, 160), (64, 8)])
def test_atom_outliers_scale_with_width(hidden, expected):
    assert QuantConfig().outlier_count(hidden) == expected
    assert QuantConfig(atom_outliers=40).outlier_count(hidden) == 40


def test_label_says_what_runs():
    from bisup.config import BiSupConfig, QuantConfig

    assert QuantConfig(method="quarot", gptq=True, kv_bits=4, a_clip=0.9).label() == "QuaRot+GPTQ W4A4 g64 KV4 (a_clip 0.9)"
    # learned rounding makes the codes: no GPTQ runs although gptq=True
    assert QuantConfig(method="quarot", gptq=True, kv_bits=4, bisup=BiSupConfig()).label() == \
        "QuaRot + BiSup (learned rounding) W4A4 g64 KV4"
    assert QuantConfig(method="atom", gptq=True, bisup=BiSupConfig(rounding=False, smooth=False)).label() == \
        "Atom+GPTQ + BiSup[weight_clip, act_clip, lowrank, head_rotation] W4A4 g64"
    assert QuantConfig(method="quarot", bisup=BiSupConfig(smooth=True, loss="mse", rounding_init="gptq")).label() == \
        ("QuaRot + BiSup[weight_clip, act_clip, smooth, lowrank, rounding, head_rotation] W4A4 g64 "
         "(BiSup loss=mse, BiSup rounding_init=gptq)")
    assert QuantConfig(method="gptq", a_bits=16, w_group_size=-1).label() == "GPTQ W4A16 per-channel"
    assert QuantConfig(method="gptq", a_bits=16, bisup=BiSupConfig()).label() == "BiSup (learned rounding) W4A16 g64"
    assert QuantConfig(method="rtn", kv_bits=3, prompt_len=16, a_convention="compressed-tensors").label() == \
        "RTN W4A4 g64 KV3 (FP16 prompt 16) (compressed-tensors activations)"
