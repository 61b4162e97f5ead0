"""quantize_model's inputs (calibration data forms), the method registry, and the format rules."""
import pytest
import torch

import bisup
from bisup.config import QuantConfig
from bisup.methods import get_method, registry
from bisup.models.tiny import TINY_GROUP, random_tokens, tiny_model, tiny_tokenizer
from bisup.quant import formats
from bisup.quantize import calibration_batches


def _cfg(**kw):
    return QuantConfig(method="gptq", w_group_size=TINY_GROUP, a_group_size=TINY_GROUP, n_calib=3, calib_seq_len=8, **kw)


@pytest.mark.parametrize("form", ["tensor", "equal lists", "ragged tensors", "text", "list of text"])
def test_every_accepted_calibration_form_gives_token_windows(form):
    tok = tiny_tokenizer()
    ids = random_tokens(3, 8, seed=1)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    data = {"tensor": ids, "equal lists": [row.tolist() for row in ids],
            "ragged tensors": [ids[0, :5], ids[1], ids[2, :7], ids[0]],
            "text": text, "list of text": [text[:60], text[60:]]}[form]
    batches = calibration_batches(data, tok, _cfg())
    assert batches.dtype == torch.long and batches.dim() == 2 and batches.shape[1] == 8
    if form in ("tensor", "equal lists"):
        assert torch.equal(batches, ids)
    elif form == "ragged tensors":  # joined into one stream, cut into n_calib windows
        assert torch.equal(batches.flatten(), torch.cat(data)[:24])
    else:
        assert torch.equal(batches.flatten(), torch.tensor(tok.encode(text if form == "text" else
                                                                      "\n\n".join(data), add_special_tokens=False)[:24]))


@pytest.mark.parametrize("bad, match", [
    ([1.5, 2.5], r"got a list of 2 items \(float\); expected one of"),
    ({"ids": [1, 2]}, r"got a dict; expected one of"),
    (torch.zeros(2, 4), r"a tensor must be a LongTensor \[n, seq_len\]"),
    ([torch.arange(3), torch.arange(2)], "holds 5 tokens, fewer than calib_seq_len=8"),
])
def test_unaccepted_calibration_data_names_what_was_passed(bad, match):
    with pytest.raises(ValueError, match=match):
        calibration_batches(bad, tiny_tokenizer(), _cfg())


def test_text_without_a_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="calib_data is text: pass the model's tokenizer"):
        calibration_batches("some text", None, _cfg())


def test_quantize_model_takes_a_list_of_token_tensors():
    seqs = [random_tokens(1, 8, seed=s)[0] for s in range(3)]
    model = bisup.quantize_model(tiny_model("llama"), _cfg(), calib_data=seqs, progress=False)
    same = bisup.quantize_model(tiny_model("llama"), _cfg(), calib_data=torch.stack(seqs), progress=False)
    ids = random_tokens(1, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, same(ids).logits)


def test_registry_knows_every_method_and_whether_it_calibrates():
    assert list(registry()) == ["rtn", "gptq", "atom", "quarot"]
    base = QuantConfig()
    assert not get_method("rtn").calibrates(base)
    assert get_method("gptq").calibrates(base) and get_method("atom").calibrates(base)
    assert not get_method("quarot").calibrates(base) and get_method("quarot").calibrates(base.replace(gptq=True))
    assert "gptq_damp" in get_method("gptq").options
    with pytest.raises(ValueError, match=r"unknown method 'awq'; expected one of \['rtn', 'gptq', 'atom', 'quarot'\]"):
        get_method("awq")
    with pytest.raises(ValueError, match="QuantConfig.method='awq'"):
        QuantConfig(method="awq")


@pytest.mark.parametrize("bits_or_packing, k, row_bytes", [(4, 64, 32), ("int4", 6, 3), (3, 64, 24), ("int3", 32, 12),
                                                           (8, 7, 7), ("int8", 5, 5)])
def test_packed_row_bytes_and_back(bits_or_packing, k, row_bytes):
    assert formats.packed_row_bytes(bits_or_packing, k) == row_bytes
    assert formats.unpacked_row_values(bits_or_packing, row_bytes) == k


@pytest.mark.parametrize("args, match", [((3, 40), "multiple of 32"), ((4, 5), "even length"), ((5, 64), "no packed format for 5"),
                                         (("int2", 8), "no packed format for 'int2'")])
def test_packed_row_bytes_rejects_what_has_no_format(args, match):
    with pytest.raises(ValueError, match=match):
        formats.packed_row_bytes(*args)


def test_group_rules():
    assert formats.effective_group(96, -1) == 96 and formats.effective_group(96, 128) == 96
    assert formats.effective_group(96, 32) == 32
    assert formats.num_groups(100, 32) == 4 and formats.num_groups(64, -1) == 1
    assert formats.packing_of(3, 64) == "int3" and formats.packing_of(3, 48) == "int4" and formats.packing_of(4, 7) == "int8"


def test_kv_ops_reject_a_bad_bit_width_when_traced():
    """The fake (meta) implementation used by torch.compile must not accept kv bits it has no format for."""
    x = torch.randn(2, 64, device="meta")
    with pytest.raises(ValueError, match=r"kv bits must be one of \(3, 4, 8\), got 5"):
        torch.ops.bisup.kv_quantize(x, 5, -1)
